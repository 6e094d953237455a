"""Benchmark: convkit convert --dtype fp16 on a full-size SDXL fp32 checkpoint (~14 GB).

Compared in the same run with
  (a) the raw I/O floor: read the input and write the same number of output bytes (fsync'd);
  (b) the naive script: safetensors.torch.load_file -> .half() -> save_file.
Each variant runs in its own process (peak RSS is that process's VmHWM) and the set is
repeated --repeat times in interleaved order; the best time of each is reported. Two regimes:
cold (the input's pages are evicted from the page cache before every run, as for a file
that was not just read) and warm (input already cached).

    python bench/convert.py [--repeat 2] [--skip-naive] [--regime cold|warm|both]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (DATA, IO_FLOOR, WARM, drop, evict, full_size_checkpoint, report,  # noqa: E402
                     run_measured)

CONVKIT = """
import sys
from convkit.runtime import prefer_io_friendly_threads
prefer_io_friendly_threads()   # what the convkit command does before importing torch
from convkit.convert import convert
convert(sys.argv[1], sys.argv[2], 'fp16', overwrite=True)
"""

NAIVE = """
import os, sys
import safetensors.torch as st
sd = st.load_file(sys.argv[1])
for k in list(sd):            # in place, so the fp32 copy is released as we go
    sd[k] = sd[k].half() if sd[k].is_floating_point() else sd[k]
st.save_file(sd, sys.argv[2])
fd = os.open(sys.argv[2], os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--regime", choices=["cold", "warm", "both"], default="both")
    args = ap.parse_args()

    src = full_size_checkpoint("sdxl", "F32")
    out = DATA / "bench_out.safetensors"
    from convkit.sources import open_source

    with open_source(src) as s:
        out_bytes = sum(i.nbytes // 2 if i.dtype == "F32" else i.nbytes for i in s.infos())
    print(f"input {src} ({src.stat().st_size / 1e9:.2f} GB), output ~{out_bytes / 1e9:.2f} GB",
          file=sys.stderr)
    variants = [("io-floor", IO_FLOOR, (str(src), str(out), str(out_bytes))),
                ("convkit convert fp16", CONVKIT, (str(src), str(out)))]
    if not args.skip_naive:
        variants.append(("naive load/half/save", NAIVE, (str(src), str(out))))
    regimes = ["cold", "warm"] if args.regime == "both" else [args.regime]
    results = {}
    for regime in regimes:
        best: dict[str, dict] = {}
        runs: dict[str, list[float]] = {}
        for rep in range(args.repeat):
            for name, code, a in variants:
                drop(out)
                if regime == "cold":
                    evict(src)
                else:
                    run_measured(WARM, str(src))
                r = run_measured(code, *a)
                print(f"  {regime} rep {rep}: {name}: {json.dumps(r)}", file=sys.stderr)
                if "seconds" in r:
                    runs.setdefault(name, []).append(r["seconds"])
                if name not in best or r.get("seconds", 1e9) < best[name].get("seconds", 1e9):
                    best[name] = r
        drop(out)
        for n in best:
            if n in runs:
                best[n]["median_seconds"] = sorted(runs[n])[len(runs[n]) // 2]
                best[n]["all_seconds"] = [round(x, 2) for x in runs[n]]
        rows = [(n, best[n]) for n, _, _ in variants]
        print(f"[{regime} cache]")
        print(report(rows, "io-floor"))
        results[regime] = dict(rows)
    print(json.dumps({"bench": "convert", "results": results}))


if __name__ == "__main__":
    main()
