"""Benchmark: convkit quantize on a full-size SDXL fp32 checkpoint (~14 GB).

Variants, each in its own process (wall time and peak RSS of that process), compared in the same
run with the raw I/O floor (read the whole input, write the same number of bytes as the Q8_0
output, fsync'd):

    fp8-e4m3fn, nf4, gguf:Q8_0, gguf:Q4_K_S   (verification on: reopen + CRC of every tensor)

The GGUF outputs hold the UNet only (as ComfyUI-GGUF expects), fp8/nf4 the whole checkpoint.
``--kquants`` also runs bench/ggml_quants.py (K-quant throughput vs ggml's C reference).

    python bench/quantize.py [--repeat 1] [--targets fp8-e4m3fn,nf4,gguf:Q8_0,gguf:Q4_K_S] [--kquants]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, IO_FLOOR, drop, full_size_checkpoint, report, run_measured  # noqa: E402

CONVKIT = """
import sys, json
from convkit.quantize import quantize
r = quantize(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)
open(sys.argv[2] + '.info.json', 'w').write(json.dumps({'bytes': r.stats.bytes_written, 'verify_s': r.stats.verify_seconds,
                            'quantize_s': r.stats.seconds, 'rel_rmse': r.report.summary(0)['rel_rmse'],
                            'types': r.plan.counts(), 'fallbacks': len(r.plan.fallbacks)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--targets", default="fp8-e4m3fn,nf4,gguf:Q8_0,gguf:Q4_K_S")
    ap.add_argument("--kquants", action="store_true")
    args = ap.parse_args()

    src = full_size_checkpoint("sdxl", "F32")
    from convkit.quantize import quantize

    plans = {}
    for t in args.targets.split(","):
        ext = "gguf" if t.startswith("gguf:") else "safetensors"
        out = DATA / f"bench_q.{ext}"
        plans[t] = (out, quantize(src, out, t, dry_run=True, overwrite=True).plan)
    floor_bytes = plans.get("gguf:Q8_0", next(iter(plans.values())))[1].out_bytes
    print(f"input {src} ({src.stat().st_size / 1e9:.2f} GB)", file=sys.stderr)
    for t, (out, p) in plans.items():
        print(f"  {t}: reads {p.in_bytes / 1e9:.2f} GB, writes {p.out_bytes / 1e9:.2f} GB",
              file=sys.stderr)
    variants = [("io-floor", IO_FLOOR, (str(src), str(DATA / "bench_q.floor"), str(floor_bytes)))]
    variants += [(f"quantize {t}", CONVKIT, (str(src), str(out), t)) for t, (out, _) in plans.items()]
    best: dict[str, dict] = {}
    for rep in range(args.repeat):
        for name, code, a in variants:
            r = run_measured(code, *a)
            info = Path(a[1] + ".info.json")
            if info.exists():
                r["info"] = json.loads(info.read_text())
                drop(info)
            drop(Path(a[1]))
            print(f"  rep {rep}: {name}: {json.dumps(r)}", file=sys.stderr)
            if name not in best or r.get("seconds", 1e9) < best[name].get("seconds", 1e9):
                best[name] = r
    rows = [(n, best[n]) for n, _, _ in variants]
    print(report(rows, "io-floor"))
    print(json.dumps({"bench": "quantize", "rows": dict(rows)}))
    if args.kquants:
        subprocess.run([sys.executable, str(Path(__file__).parent / "ggml_quants.py"),
                        "--types", "Q8_0,Q6_K,Q5_K,Q4_K,Q3_K,Q2_K"])


if __name__ == "__main__":
    main()
