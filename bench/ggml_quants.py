#!/usr/bin/env python3
"""Micro-benchmark: GGML block quantizers, convkit vs ggml's C reference (not a test).

Throughput is GB/s of float32 input.  ggml's reference is ``ggml_quantize_chunk`` (imatrix=NULL,
single-threaded) from a libstable-diffusion.so built by the PyPI package
stable-diffusion-cpp-python (see tools/make_ggml_goldens.py); it is timed in the same run when the
library is found (``--lib`` or the default venv location), and the outputs are compared too.

    python bench/ggml_quants.py [--rows 512] [--n 4096] [--types Q4_K,Q6_K] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from convkit.kernels import QTYPES, quantize  # noqa: E402


def _best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--types", default=",".join(QTYPES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lib", default=None, help="library exporting ggml_quantize_chunk")
    ap.add_argument("--no-ref", action="store_true", help="skip the ggml reference")
    args = ap.parse_args(argv)

    ref = None
    if not args.no_ref:
        try:
            from make_ggml_goldens import GGMLRef, find_library

            ref = GGMLRef(find_library(args.lib))
        except (SystemExit, OSError, ImportError) as exc:
            print(f"# ggml reference unavailable ({exc}); timing convkit only")

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.n)) * 0.02).astype(np.float32)
    gb = x.nbytes / 1e9
    print(f"# input {args.rows}x{args.n} float32 = {x.nbytes / 1e6:.1f} MB; best of "
          f"{args.repeat}")
    nt = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{'type':6} {'convkit GB/s':>13} {f'{nt} threads':>10} {'ggml GB/s':>10} {'ratio':>7}"
          "  identical")
    for qt in args.types.split(","):
        quantize(x[:1], qt)  # JIT warm-up (numba cache)
        t_ours = _best_time(lambda: quantize(x, qt), args.repeat)
        t_par = _best_time(lambda: quantize(x, qt, nthreads=nt), args.repeat)
        line = f"{qt:6} {gb / t_ours:13.3f} {gb / t_par:10.3f}"
        if ref is not None:
            t_ref = _best_time(lambda: ref.quantize(x, qt), args.repeat)
            same = np.array_equal(quantize(x, qt), ref.quantize(x, qt))
            line += f" {gb / t_ref:10.3f} {t_ref / t_ours:6.2f}x  {same}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
