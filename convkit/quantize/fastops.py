"""One-pass numba kernels for the quantize pipeline: checks, error sums, bitsandbytes 4-bit.

The first version measured errors and checked values with chains of whole-tensor torch
temporaries (``isfinite``, ``diff``, ``diff * diff``, ``abs``...): every temporary is a fresh
multi-MB allocation, and the page faults plus memory traffic cost 20-50x the I/O of the
tensor. Here each of these is a single pass over (chunks of) the tensor with float64 sums and
no temporaries; all kernels release the GIL, so :func:`parallel_chunks` runs chunks of one
tensor on several threads.

The 4-bit quantizer reproduces bitsandbytes' ``quantize_4bit`` (its default/CPU torch
implementation, blocksize 64) byte for byte: ``absmax`` per block, ``x * (1 / max(absmax,
1e-38))`` in float32 clamped to [-1, 1] (the tail block divides by its clamped absmax instead),
``bucketize`` against the float32 midpoints of the sorted code (right=False: the number of
midpoints strictly below the value), FP4 remapped through the code order, two values per byte,
high nibble first. ``tests/test_quantize_fp8_nf4.py`` compares it with bitsandbytes.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit


_JIT = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
f32 = np.float32

#: float32 values per work unit: small enough to stay in cache, large enough to amortise
#: the thread hand-off
CHUNK_VALUES = 1 << 19


def threads() -> int:
    """Worker threads for one tensor (``CONVKIT_THREADS`` overrides; default: CPU count, <= 8)."""
    env = os.environ.get("CONVKIT_THREADS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


_POOL: ThreadPoolExecutor | None = None
_POOL_N = 0


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_N
    if _POOL is None or _POOL_N != n:
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="convkit-quant")
        _POOL_N = n
    return _POOL


def parallel_chunks(fn, bounds: list[tuple[int, int]], nthreads: int | None = None) -> list:
    """``[fn(start, stop) for (start, stop) in bounds]``, run on a thread pool; results in order.

    The split never depends on the thread count, so results (and sums built from them in order)
    are the same with 1 or 8 threads.
    """
    n = threads() if nthreads is None else nthreads
    if n <= 1 or len(bounds) <= 1:
        return [fn(a, b) for a, b in bounds]
    return list(_pool(n).map(lambda ab: fn(*ab), bounds))


def submit(fn, *args):
    """Run ``fn(*args)`` on the worker pool (a Future); inline when running single-threaded."""
    from concurrent.futures import Future

    n = threads()
    if n <= 1:
        f: Future = Future()
        f.set_result(fn(*args))
        return f
    return _pool(n).submit(fn, *args)


def split(total: int, step: int, align: int = 1) -> list[tuple[int, int]]:
    """[(start, stop)] covering range(total) in pieces of ~``step`` (a multiple of ``align``)."""
    step = max(align, step // align * align)
    return [(s, min(total, s + step)) for s in range(0, total, step)] or [(0, 0)]


# ----------------------------------------------------------------------------- checks and sums


@njit(**_JIT)
def check_kernel(x, limit):
    """(non-finite count, count of |v| > limit, max |v| over finite values) of a 1-D array."""
    bad = 0
    over = 0
    amax = f32(0.0)
    for i in range(x.shape[0]):
        v = x[i]
        if not np.isfinite(v):
            bad += 1
            continue
        a = abs(v)
        if a > amax:
            amax = a
        if a > limit:
            over += 1
    return bad, over, amax


@njit(**_JIT)
def err_kernel(src, deq):
    """(sum (deq - src)^2, sum src^2, max |deq - src|) in float64 over two 1-D float32 arrays."""
    sd = 0.0
    ss = 0.0
    mx = 0.0
    for i in range(src.shape[0]):
        s = np.float64(src[i])
        d = np.float64(deq[i]) - s
        sd += d * d
        ss += s * s
        a = abs(d)
        if a > mx:
            mx = a
    return sd, ss, mx


@njit(**_JIT)
def err_lut_kernel(src, codes, lut, scale):
    """Error sums for a byte-coded tensor decoded as ``lut[code] * scale`` (float32; fp8)."""
    sd = 0.0
    ss = 0.0
    mx = 0.0
    for i in range(src.shape[0]):
        s = np.float64(src[i])
        d = np.float64(lut[codes[i]] * scale) - s
        sd += d * d
        ss += s * s
        a = abs(d)
        if a > mx:
            mx = a
    return sd, ss, mx


class ErrSums:
    """Running error sums over the chunks of one tensor (added in chunk order)."""

    __slots__ = ("sd", "ss", "mx", "n", "bad")

    def __init__(self):
        self.bad = 0        # non-finite source values seen (when the kernel counts them)
        self.sd = 0.0
        self.ss = 0.0
        self.mx = 0.0
        self.n = 0

    def add(self, sums, n: int) -> None:
        self.sd += sums[0]
        self.ss += sums[1]
        self.mx = max(self.mx, sums[2])
        self.n += n

    def rel_rmse(self) -> float:
        if not self.n:
            return 0.0
        mse = self.sd / self.n
        ms = self.ss / self.n
        return math.sqrt(mse) / math.sqrt(ms) if ms > 0 else math.sqrt(mse)


# ----------------------------------------------------------------------------- bitsandbytes 4-bit


LUT_BINS = 4096


def bucket_lut(bounds: np.ndarray) -> np.ndarray:
    """Starting guesses for :func:`bnb4_kernel`'s bucketize: midpoints below each bin's start."""
    lo = (np.arange(LUT_BINS, dtype=np.float64) / (LUT_BINS / 2) - 1.0)
    return np.searchsorted(bounds.astype(np.float64), lo, side="left").astype(np.uint8)


@njit(**_JIT)
def bnb4_kernel(x, start, stop, n, bounds, order, remap, packed, absmax, lut, code, measure):
    """Quantize values [start, stop) of the flat float32 ``x`` (n values) like bitsandbytes.

    ``start`` is a multiple of 128 (whole blocks, whole bytes); ``stop`` is one too or ``n``.
    Writes ``packed[start // 2 : ceil(stop / 2)]`` and ``absmax`` of the blocks touched.
    Returns (non-finite count, then -- with ``measure`` -- the error sums of the stored values
    decoded as ``code[nibble] * absmax``, else zeros), while the block is still in cache.
    """
    bs = 64
    full = n - n % bs
    v = np.zeros(bs + 1, np.float32)
    k = np.zeros(bs + 1, np.int32)
    bad = 0
    sd = 0.0
    ss = 0.0
    mx = 0.0
    for b0 in range(start, stop, bs):
        b1 = min(b0 + bs, stop)
        cnt = b1 - b0
        am = f32(0.0)
        for i in range(cnt):
            xi = x[b0 + i]
            if not np.isfinite(xi):
                bad += 1
            a = abs(xi)
            if a > am:
                am = a
        if b0 >= full:      # the tail block divides by its (clamped) absmax
            am = max(am, f32(1e-38))
            for i in range(cnt):
                v[i] = x[b0 + i] / am
        else:
            inv = f32(1.0) / max(am, f32(1e-38))
            for i in range(cnt):
                v[i] = x[b0 + i] * inv
        absmax[b0 // bs] = am
        if cnt % 2:        # odd total: bitsandbytes pads the scaled values with one 0.0
            v[cnt] = f32(0.0)
            cnt += 1
        for i in range(cnt):
            vi = min(max(v[i], f32(-1.0)), f32(1.0))
            # bucketize = the number of midpoints strictly below vi: a guess from a table over
            # 4096 bins of [-1, 1], then corrected by exact comparisons (0 steps off the few
            # bins that hold a midpoint), so the result is exact for any float
            j = np.int64((vi + f32(1.0)) * f32(LUT_BINS / 2))
            kk = np.int64(lut[min(max(j, 0), LUT_BINS - 1)])
            while kk < 15 and bounds[kk] < vi:
                kk += 1
            while kk > 0 and not (bounds[kk - 1] < vi):
                kk -= 1
            k[i] = kk
        for i in range(cnt):
            if remap:
                k[i] = order[k[i]]
        for i in range(0, cnt, 2):
            packed[(b0 + i) // 2] = (np.int64(k[i]) << 4) | np.int64(k[i + 1])
        if measure:
            for i in range(b1 - b0):
                sv = np.float64(x[b0 + i])
                d = np.float64(code[k[i]] * am) - sv
                sd += d * d
                ss += sv * sv
                ad = abs(d)
                if ad > mx:
                    mx = ad
    return bad, sd, ss, mx


@njit(**_JIT)
def bnb4_err_kernel(src, start, stop, packed, absmax, code):
    """Error sums of values [start, stop) decoded as ``code[nibble] * absmax[block]`` (float32)."""
    sd = 0.0
    ss = 0.0
    mx = 0.0
    for i in range(start, stop):
        byte = np.int64(packed[i // 2])
        nib = (byte >> 4) if i % 2 == 0 else (byte & 0xF)
        s = np.float64(src[i])
        d = np.float64(code[nib] * absmax[i // 64]) - s
        sd += d * d
        ss += s * s
        a = abs(d)
        if a > mx:
            mx = a
    return sd, ss, mx
