"""Benchmark: merge-lora / extract-lora on the full-size SDXL fp32 checkpoint (~14 GB).

A rank-64 kohya LoRA (fp16) over every attention, feed-forward, proj and conv module of the UNet is
generated once (bench/data/sdxl_lora_r64.safetensors). Measured in separate processes:
  io-floor            read the base and write as many bytes as the fp16 output (fsync'd)
  merge-lora fp16     convkit merge-lora BASE LORA -o OUT --dtype fp16
  extract-lora r64    convkit extract-lora TUNED BASE --rank 64 --conv-rank 64 (TUNED = BASE with
                      the LoRA merged, fp32)
Targets: merge <= 1.3x the I/O floor, peak RSS <= 2 GB.

    python bench/lora.py [--repeat 1] [--skip-extract]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, IO_FLOOR, drop, full_size_checkpoint, report, run_measured  # noqa: E402

MERGE = """
import sys
from convkit.lora import merge_lora
merge_lora(sys.argv[1], [sys.argv[2]], sys.argv[3], dtype=sys.argv[4] if sys.argv[4] != 'keep' else None, overwrite=True)
"""

EXTRACT = """
import sys
from convkit.lora import extract_lora
r = extract_lora(sys.argv[1], sys.argv[2], sys.argv[3], rank=64, conv_rank=64, overwrite=True)
print('extract: %d modules, %d skipped, total rel. error %.3e' % (r.modules, r.skipped, r.total_error), file=sys.stderr)
"""


def make_lora(base: Path, rank: int = 64) -> Path:
    path = DATA / f"sdxl_lora_r{rank}.safetensors"
    if path.exists():
        return path
    import torch

    from convkit.lora.extract import extract_units
    from convkit.lora.table import table_for_source
    from convkit.lora.write import OutModule, write_lora
    from convkit.sources import open_source

    g = torch.Generator().manual_seed(0)
    with open_source(base) as src:
        table = table_for_source(src)
    mods = []
    for u in extract_units(table, "kohya", conv=True, components=["unet"]):
        r = min(rank, u.shape[0])
        down = (torch.randn(r, *u.shape[1:], generator=g) * 0.01).half()
        up = (torch.randn(u.shape[0], r, *([1, 1] if len(u.shape) == 4 else []), generator=g) * 0.01).half()
        mods.append(OutModule(u, "lora", {"up": up, "down": down}, float(r)))
    write_lora(path, "sdxl", mods, "kohya")
    print(f"generated {path} ({len(mods)} modules, {path.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args()
    base = full_size_checkpoint("sdxl", "F32")
    lora = make_lora(base)
    out = DATA / "bench_lora_out.safetensors"
    from convkit.sources import open_source

    with open_source(base) as s:
        out_bytes = sum(i.nbytes // 2 if i.dtype == "F32" else i.nbytes for i in s.infos())
    variants = [("io-floor", IO_FLOOR, (str(base), str(out), str(out_bytes))),
                ("merge-lora fp16", MERGE, (str(base), str(lora), str(out), "fp16"))]
    best: dict[str, dict] = {}
    for rep in range(args.repeat):
        for name, code, a in variants:
            drop(out)
            r = run_measured(code, *a)
            print(f"  rep {rep}: {name}: {json.dumps(r)}", file=sys.stderr)
            if name not in best or r.get("seconds", 1e9) < best[name].get("seconds", 1e9):
                best[name] = r
    drop(out)
    rows = [(n, best[n]) for n, _, _ in variants]
    if not args.skip_extract:
        tuned = DATA / "bench_lora_tuned_f32.safetensors"
        if not tuned.exists():
            r = run_measured(MERGE, str(base), str(lora), str(tuned), "keep")
            rows.append(("merge-lora fp32 (tuned)", r))
        r = run_measured(EXTRACT, str(tuned), str(base), str(DATA / "bench_lora_extracted.safetensors"))
        rows.append(("extract-lora r64", r))
        drop(tuned)
    print(report(rows, "io-floor"))
    print(json.dumps({"bench": "lora", "rows": dict(rows)}))


if __name__ == "__main__":
    main()
