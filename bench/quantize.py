"""Benchmark: convkit quantize on a full-size SDXL fp32 checkpoint (~14 GB).

Variants, each in its own process (wall time and peak RSS of that process), compared in the same
run with the raw I/O floor (read the whole input, write the same number of bytes as the Q8_0
output, fsync'd):

    fp8-e4m3fn, fp8-scaled, nf4, gguf:Q8_0, gguf:Q4_K_S
    (verification on: reopen + CRC of every tensor; the time of each phase is in "info")

The GGUF outputs hold the UNet only (as ComfyUI-GGUF expects), fp8/nf4 the whole checkpoint.
Then (unless ``--no-kquants``) bench/ggml_quants.py: block-quantizer throughput, convkit vs
ggml's C reference (skipped cleanly when no ggml library is found).

    python bench/quantize.py [--repeat 1] [--targets fp8-e4m3fn,...] [--no-kquants] [--threads N]

Check ``uptime`` first: the ratios mean something only on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, IO_FLOOR, drop, full_size_checkpoint, run_measured  # noqa: E402

CONVKIT = """
import sys, json
from convkit.runtime import prefer_io_friendly_threads
prefer_io_friendly_threads()   # as the convkit command does
from convkit.quantize import quantize
r = quantize(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)
open(sys.argv[2] + '.info.json', 'w').write(json.dumps({'bytes': r.stats.bytes_written, 'verify_s': r.stats.verify_seconds,
                            'quantize_s': r.stats.seconds, 'rel_rmse': r.report.summary(0)['rel_rmse'],
                            'types': r.plan.counts(), 'fallbacks': len(r.plan.fallbacks)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--targets", default="fp8-e4m3fn,fp8-scaled,nf4,gguf:Q8_0,gguf:Q4_K_S")
    ap.add_argument("--no-kquants", action="store_true", help="skip the ggml comparison")
    ap.add_argument("--kquants", action="store_true", help=argparse.SUPPRESS)  # the old default
    ap.add_argument("--threads", type=int, default=None, help="CONVKIT_THREADS for the runs")
    args = ap.parse_args()

    if args.threads:
        import os
        os.environ["CONVKIT_THREADS"] = str(args.threads)
    print(f"load average {open('/proc/loadavg').read().split()[:3]}", file=sys.stderr)
    src = full_size_checkpoint("sdxl", "F32")
    from convkit.quantize import quantize

    plans = {}
    for t in args.targets.split(","):
        ext = "gguf" if t.startswith("gguf:") else "safetensors"
        out = DATA / f"bench_q.{ext}"
        plans[t] = (out, quantize(src, out, t, dry_run=True, overwrite=True).plan)
    print(f"input {src} ({src.stat().st_size / 1e9:.2f} GB)", file=sys.stderr)
    for t, (out, p) in plans.items():
        print(f"  {t}: reads {p.in_bytes / 1e9:.2f} GB, writes {p.out_bytes / 1e9:.2f} GB",
              file=sys.stderr)
    # one I/O floor per output size: reading the whole input and writing (fsync'd) as many bytes
    # as that target writes -- fp8/nf4 write 6-7 GB, the GGUF targets 1.5-2.7 GB
    floors: dict[str, int] = {}
    for t, (_, p) in plans.items():
        floors.setdefault(f"io-floor {p.out_bytes / 1e9:.2f} GB out", p.out_bytes)
    floor_of = {t: f"io-floor {p.out_bytes / 1e9:.2f} GB out" for t, (_, p) in plans.items()}
    variants = [(n, IO_FLOOR, (str(src), str(DATA / "bench_q.floor"), str(b)))
                for n, b in floors.items()]
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
    print(f"{'variant':<32} {'seconds':>8} {'x own floor':>12} {'peak RSS MB':>12}")
    for n, r in rows:
        if "error" in r:
            print(f"{n:<32} failed: {r['error']}")
            continue
        base = best[floor_of[n[len("quantize "):]]]["seconds"] if n.startswith("quantize ") \
            else r["seconds"]
        print(f"{n:<32} {r['seconds']:>8.2f} {r['seconds'] / base:>12.2f} {r['peak_rss_mb']:>12.0f}")
    print(json.dumps({"bench": "quantize", "load_after": open("/proc/loadavg").read().split()[:3],
                      "rows": dict(rows)}))
    for n, r in rows:
        if "info" in r:
            i = r["info"]
            print(f"  {n}: quantize {i['quantize_s']:.2f} s, verify {i['verify_s']:.2f} s, "
                  f"rel RMSE {i['rel_rmse']}, {i['bytes'] / 1e9:.2f} GB", file=sys.stderr)
    if not args.no_kquants:
        subprocess.run([sys.executable, str(Path(__file__).parent / "ggml_quants.py"),
                        "--types", "Q8_0,Q6_K,Q5_K,Q4_K,Q3_K,Q2_K"])


if __name__ == "__main__":
    main()
