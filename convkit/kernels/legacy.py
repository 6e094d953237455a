"""Legacy GGML block quantizers (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1), vectorised numpy.

Byte-identical to ggml's ``quantize_row_q*_ref`` (ggml/src/ggml-quants.c) and to gguf-py's
``gguf.quants.quantize``.  Each function takes float32 (nb, 32) blocks, returns uint8
(nb, type_size).
"""
from __future__ import annotations

import numpy as np

from ._common import f32, fp16_round, u16_bytes


def _trunc_i32(v: np.ndarray) -> np.ndarray:
    """C float -> integer conversion (truncation toward zero)."""
    return np.trunc(v).astype(np.int32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf: round half away from zero (exact: no ``x + 0.5`` rounding error)."""
    t = np.trunc(v)
    frac = v - t  # exact in float32
    return (t + np.where(np.abs(frac) >= f32(0.5), np.sign(v), f32(0.0))).astype(np.int32)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The value with the largest |v| per block (first one on ties), as C's loop picks it."""
    idx = np.argmax(np.abs(x), axis=1)
    return np.take_along_axis(x, idx[:, None], axis=1)[:, 0]


def _inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, f32(1.0) / d, f32(0.0)).astype(np.float32)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    amax = np.max(np.abs(x), axis=1)
    d = amax / f32(127.0)
    q = _roundf(x * _inv(d)[:, None]).astype(np.int8)
    bits, _ = fp16_round(d)
    return np.concatenate([u16_bytes(bits[:, None]), q.view(np.uint8)], axis=1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    q = q.astype(np.uint8)
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _qh(q: np.ndarray) -> np.ndarray:
    """5th bits: bit j of the little-endian uint32 qh = bit 4 of q[j] (j < 32)."""
    bit = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.ascontiguousarray(np.bitwise_or.reduce(bit, axis=1).astype("<u4")[:, None]) \
        .view(np.uint8)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    d = _signed_absmax(x) / f32(-8.0)
    q = np.minimum(15, _trunc_i32(x * _inv(d)[:, None] + f32(8.5)))
    bits, _ = fp16_round(d)
    return np.concatenate([u16_bytes(bits[:, None]), _pack_nibbles(q)], axis=1)


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    mn = np.min(x, axis=1)
    mx = np.max(x, axis=1)
    d = (mx - mn) / f32(15.0)
    q = np.minimum(15, _trunc_i32((x - mn[:, None]) * _inv(d)[:, None] + f32(0.5)))
    dbits, _ = fp16_round(d)
    mbits, _ = fp16_round(mn)
    return np.concatenate([u16_bytes(np.stack([dbits, mbits], 1)), _pack_nibbles(q)], axis=1)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    d = _signed_absmax(x) / f32(-16.0)
    q = np.minimum(31, _trunc_i32(x * _inv(d)[:, None] + f32(16.5)))
    bits, _ = fp16_round(d)
    return np.concatenate([u16_bytes(bits[:, None]), _qh(q), _pack_nibbles(q)], axis=1)


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    mn = np.min(x, axis=1)
    mx = np.max(x, axis=1)
    d = (mx - mn) / f32(31.0)
    q = _trunc_i32((x - mn[:, None]) * _inv(d)[:, None] + f32(0.5)) & 0xFF  # (uint8_t)
    dbits, _ = fp16_round(d)
    mbits, _ = fp16_round(mn)
    return np.concatenate([u16_bytes(np.stack([dbits, mbits], 1)), _qh(q), _pack_nibbles(q)],
                          axis=1)


# numpy versions above: the readable reference (tests compare them); the fast path below runs
# the same per-block arithmetic in one numba pass (``_kq_pack.legacy_kernel``).
NUMPY_QUANTIZERS = {
    "Q8_0": quantize_q8_0,
    "Q5_0": quantize_q5_0,
    "Q5_1": quantize_q5_1,
    "Q4_0": quantize_q4_0,
    "Q4_1": quantize_q4_1,
}
_KIND = {"Q8_0": 0, "Q4_0": 1, "Q5_0": 2, "Q4_1": 3, "Q5_1": 4}
_SIZE = {"Q8_0": 34, "Q4_0": 18, "Q5_0": 22, "Q4_1": 20, "Q5_1": 24}


def _numba_quantizer(name: str):
    kind, size = _KIND[name], _SIZE[name]

    def fn(x: np.ndarray, out=None) -> np.ndarray:
        from . import _kq_pack

        x = np.ascontiguousarray(x, dtype=np.float32)
        if out is None:
            out = np.empty((x.shape[0], size), np.uint8)
        _kq_pack.legacy_kernel(x, kind, out)
        return out

    fn.__name__ = f"quantize_{name.lower()}_numba"
    return fn


QUANTIZERS = {name: _numba_quantizer(name) for name in NUMPY_QUANTIZERS}
