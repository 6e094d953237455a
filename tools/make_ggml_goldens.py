#!/usr/bin/env python3
"""Dev tool: produce golden GGML quantization bytes from the real ggml (not run in CI).

convkit's block quantizers (``convkit.kernels``) must be byte-identical to ggml's reference
quantizers (``quantize_row_*_ref`` in ggml/src/ggml-quants.c).  This script quantizes a fixed
set of deterministic inputs with ggml itself and stores inputs + outputs under
``tests/data/ggml_golden/`` so the test-suite can check byte equality without a C build.

Where ggml comes from
---------------------
The PyPI package ``stable-diffusion-cpp-python`` compiles stable-diffusion.cpp + ggml from source
on install and links ggml statically into ``libstable-diffusion.so``, which exports
``ggml_quantize_chunk``.  Install it in a separate venv so convkit's own venv stays clean::

    python3 -m venv /work/ggmlref-venv
    /work/ggmlref-venv/bin/pip install stable-diffusion-cpp-python      # ~5-8 min, builds ggml

(Default CMAKE_ARGS are fine: ggml-quants.c is part of the ``ggml-base`` target, which is built
without ``-march`` flags even when GGML_NATIVE=ON, so no FMA contraction can change the
reference results.)  Then, from the repository root, with any Python that has numpy::

    python tools/make_ggml_goldens.py                       # finds the library in the venv above
    python tools/make_ggml_goldens.py --lib /path/to/libstable-diffusion.so

The library is loaded with ctypes only; nothing is imported from the package.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import json
import os
import sys

import numpy as np

# ggml_type enum values (same numbering as gguf's GGMLQuantizationType)
GGML_TYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
}
# (block_size, type_size)
BLOCK_INFO = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}

DEFAULT_GLOBS = [
    "/work/ggmlref-venv/lib/python3*/site-packages/stable_diffusion_cpp/lib/libstable-diffusion.so",
    os.path.expanduser("~/.local/lib/python3*/site-packages/stable_diffusion_cpp/lib/"
                       "libstable-diffusion.so"),
]
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data",
                       "ggml_golden")


def find_library(explicit: str | None) -> str:
    if explicit:
        return explicit
    for pattern in DEFAULT_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    raise SystemExit("libstable-diffusion.so not found; install stable-diffusion-cpp-python in "
                     "/work/ggmlref-venv or pass --lib")


class GGMLRef:
    """ctypes wrapper around ggml_quantize_chunk (single-threaded, imatrix=NULL)."""

    def __init__(self, path: str):
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_quantize_init.restype = None
        self.lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        for name in ("ggml_version", "ggml_commit"):
            fn = getattr(self.lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                fn.argtypes = []

    def version(self) -> dict:
        info = {}
        for name in ("ggml_version", "ggml_commit"):
            fn = getattr(self.lib, name, None)
            info[name] = fn().decode() if fn is not None else "unavailable"
        return info

    def quantize(self, x: np.ndarray, qtype: str) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        bs, ts = BLOCK_INFO[qtype]
        out = np.zeros((rows, n // bs * ts), dtype=np.uint8)
        t = GGML_TYPES[qtype]
        self.lib.ggml_quantize_init(t)
        size = self.lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, rows, n, None)
        assert size == out.size, (size, out.size)
        return out


def make_inputs(seed: int = 20240607) -> dict[str, np.ndarray]:
    """Deterministic test inputs, one 2-D float32 array per row width."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for n, rows in ((256, 48), (512, 24), (3072, 16)):
        x = rng.standard_normal((rows, n)).astype(np.float32)
        x[rows // 4:rows // 2] *= np.float32(0.02)                 # typical weight scale
        # a few outliers
        idx = rng.integers(0, x.size, size=max(4, x.size // 500))
        x.flat[idx] *= np.float32(25.0)
        r = 0
        x[r, :] = 0.0                                                # all-zero row
        r += 1
        x[r, :] = np.float32(0.731)                                  # constant positive row
        r += 1
        x[r, :] = np.float32(-1.25)                                  # constant negative row
        r += 1
        x[r, :] = rng.standard_normal(n).astype(np.float32) * np.float32(1e-8)   # tiny
        r += 1
        x[r, :] = rng.standard_normal(n).astype(np.float32) * np.float32(3e-6)   # fp16-subnormal
        r += 1
        # large dynamic range: log-uniform magnitudes over 1e-6 .. 1e4 with random sign
        mag = np.exp(rng.uniform(np.log(1e-6), np.log(1e4), size=n))
        x[r, :] = (mag * rng.choice([-1.0, 1.0], size=n)).astype(np.float32)
        r += 1
        mag = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), size=n))
        x[r, :] = mag.astype(np.float32)                              # all positive
        r += 1
        x[r, :] = -np.abs(rng.standard_normal(n)).astype(np.float32)  # all negative
        r += 1
        # zero blocks / sub-blocks / single non-zero inside otherwise ordinary rows
        x[r, : n // 2] = 0.0
        x[r, 3] = np.float32(0.5)
        r += 1
        x[r, 16:48] = 0.0
        x[r, 64:80] = np.float32(1e-20)
        x[r, 96:112] = np.float32(2.0)
        x[r, 128:160] = np.float32(-3.0)
        r += 1
        # blocks where positive values dominate / ties for nearest_int / huge values
        x[r, :] = np.round(rng.standard_normal(n) * 4).astype(np.float32) / np.float32(2.0)
        r += 1
        x[r, :] = rng.standard_normal(n).astype(np.float32) * np.float32(60000.0)
        r += 1
        x[r, :] = np.abs(rng.standard_normal(n)).astype(np.float32) + np.float32(10.0)
        r += 1
        x[r, :] = np.float32(1.0)
        x[r, ::7] = np.float32(-1.0)
        r += 1
        inputs[f"x_{n}"] = x
    return inputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", help="path to libstable-diffusion.so (or any lib exporting "
                                   "ggml_quantize_chunk)")
    ap.add_argument("--out", default=os.path.join(OUT_DIR, "ggml_golden.npz"))
    args = ap.parse_args(argv)

    lib_path = find_library(args.lib)
    ref = GGMLRef(lib_path)
    inputs = make_inputs()
    arrays: dict[str, np.ndarray] = dict(inputs)
    for key, x in inputs.items():
        n = key.split("_")[1]
        for qtype in GGML_TYPES:
            arrays[f"{qtype}_{n}"] = ref.quantize(x, qtype)

    quants_c = None
    src_guess = glob.glob("/work/ggmlref-src/*/vendor/stable-diffusion.cpp/ggml/src/ggml-quants.c")
    if src_guess:
        with open(src_guess[0], "rb") as fh:
            quants_c = hashlib.sha256(fh.read()).hexdigest()
    meta = {
        "producer": "tools/make_ggml_goldens.py",
        "library": os.path.basename(lib_path),
        "package": "stable-diffusion-cpp-python 0.4.7 (PyPI sdist, built from source)",
        **ref.version(),
        "ggml_quants_c_sha256": quants_c,
        "imatrix": None,
        "qtypes": list(GGML_TYPES),
    }
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)", file=sys.stderr)
    print(json.dumps(meta, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
