"""Benchmark: merge-lora / extract-lora on the full-size SDXL fp32 checkpoint (~14 GB).

A rank-64 kohya LoRA (fp16) over every attention, feed-forward, proj and conv module of the UNet is
generated once (bench/data/sdxl_lora_r64.safetensors). Measured in separate processes:
  io-floor            read the base and write as many bytes as the fp16 output (fsync'd)
  merge-lora fp16     convkit merge-lora BASE LORA -o OUT --dtype fp16
  merge matmuls only  just the merge's ΔW products (row chunks added into a reused buffer with the
                      merge's kernel, convkit.lora.lowrank; no I/O), in one thread: the merge's
                      compute in core-seconds
  extract-lora r64    convkit extract-lora TUNED BASE --rank 64 --conv-rank 64 (TUNED = BASE with
                      the LoRA merged, fp32); its total error and module counts are in the row
Targets: merge <= 1.3x the I/O floor, peak RSS <= 2 GB.

    python bench/lora.py [--repeat 3] [--skip-extract] [--svd-full] [--cold]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (DATA, IO_FLOOR, WARM, drop, evict, full_size_checkpoint, report,  # noqa: E402
                     run_measured)

MERGE = """
import sys
from convkit.runtime import prefer_io_friendly_threads
prefer_io_friendly_threads()   # as the convkit command does
from convkit.lora import merge_lora
merge_lora(sys.argv[1], [sys.argv[2]], sys.argv[3], dtype=sys.argv[4] if sys.argv[4] != 'keep' else None, overwrite=True)
"""

EXTRACT = """
import json, sys
from convkit.runtime import prefer_io_friendly_threads
prefer_io_friendly_threads()   # as the convkit command does
from convkit.lora import extract_lora
r = extract_lora(sys.argv[1], sys.argv[2], sys.argv[3], rank=64, conv_rank=64, overwrite=True,
                 svd=sys.argv[4])
worst = r.worst(1)
with open(sys.argv[3] + '.info.json', 'w') as f:
    json.dump({'modules': r.modules, 'skipped': r.skipped, 'total_error': r.total_error,
               'worst_error': worst[0][1] if worst else 0.0}, f)
"""

MATMULS = """
import sys, torch
torch.set_num_threads(1)
from convkit.lora.formats import read_lora
from convkit.lora.lowrank import LowRank, add_lowrank_
lf = read_lora(sys.argv[1])
fac = [LowRank(lf.load(a, 'up'), lf.load(a, 'down')) for a in lf.adapters]
buf = torch.empty(2 << 20)
import time
t_mm = time.perf_counter()
for lr in fac:   # one thread: the merge runs one single-threaded worker per core
    row = lr.down.shape[1]
    rows = -(-lr.up.shape[0] // -(-lr.up.shape[0] // ((2 << 20) // row)))
    for a in range(0, lr.up.shape[0], rows):
        b = min(lr.up.shape[0], a + rows)
        add_lowrank_(buf[: (b - a) * row].view(b - a, row), lr, 1.0, slice(a, b))
open(sys.argv[2], 'w').write('%.4f' % (time.perf_counter() - t_mm))
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
    ap.add_argument("--svd-full", action="store_true", help="also time extract-lora --svd full")
    ap.add_argument("--cold", action="store_true",
                    help="evict the base and the LoRA from the page cache before every run")
    args = ap.parse_args()
    base = full_size_checkpoint("sdxl", "F32")
    lora = make_lora(base)
    out = DATA / "bench_lora_out.safetensors"
    from convkit.sources import open_source

    with open_source(base) as s:
        out_bytes = sum(i.nbytes // 2 if i.dtype == "F32" else i.nbytes for i in s.infos())
    if not args.cold:
        run_measured(WARM, str(base))
    variants = [("io-floor", IO_FLOOR, (str(base), str(out), str(out_bytes))),
                ("merge-lora fp16", MERGE, (str(base), str(lora), str(out), "fp16")),
                ("merge matmuls only", MATMULS, (str(lora), str(out) + ".mm"))]
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeat):
        for name, code, a in variants:
            drop(out)
            if args.cold:
                evict(base)
                evict(lora)
            r = run_measured(code, *a)
            mm = Path(str(out) + ".mm")
            if mm.exists():    # matmuls only: the timed loop, not the process
                r["process_seconds"], r["seconds"] = r["seconds"], float(mm.read_text())
                drop(mm)
            print(f"  rep {rep}: {name}: {json.dumps(r)}", file=sys.stderr)
            runs.setdefault(name, []).append(r)
    drop(out)
    rows = [(n, _best(runs[n])) for n, _, _ in variants]
    if not args.skip_extract:
        tuned = DATA / "bench_lora_tuned_f32.safetensors"
        if not tuned.exists():
            r = run_measured(MERGE, str(base), str(lora), str(tuned), "keep")
            rows.append(("merge-lora fp32 (tuned)", r))
        for svd in ("auto", "full") if args.svd_full else ("auto",):
            ext = DATA / "bench_lora_extracted.safetensors"
            r = run_measured(EXTRACT, str(tuned), str(base), str(ext), svd)
            info = Path(str(ext) + ".info.json")
            if info.exists():
                r.update(json.loads(info.read_text()))
                drop(info)
            print(f"  extract-lora r64 --svd {svd}: {json.dumps(r)}", file=sys.stderr)
            rows.append((f"extract-lora r64 ({svd})", r))
            drop(ext)
        drop(tuned)
    print(report(rows, "io-floor"))
    for name, r in rows:
        if "total_error" in r:
            print(f"{name}: {r['modules']} modules, {r['skipped']} unchanged, total rel. error "
                  f"{r['total_error']:.3e} (worst module {r['worst_error']:.3e})")
    print(json.dumps({"bench": "lora", "rows": dict(rows)}))


def _best(rs: list[dict]) -> dict:
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return rs[0]
    best = dict(min(ok, key=lambda r: r["seconds"]))
    secs = sorted(r["seconds"] for r in ok)
    best["median_seconds"] = secs[len(secs) // 2]
    return best


if __name__ == "__main__":
    main()
