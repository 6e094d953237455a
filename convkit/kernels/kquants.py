"""K-quant block quantizers (Q2_K..Q6_K), byte-identical to ggml's ``quantize_row_q*_K_ref``.

Each ``quantize_q*_k(xb, out=None)`` takes float32 (nb, 256) super-blocks and returns uint8
(nb, type_size).  Two numba passes per chunk (see ``_kq_numba``): the per-group scale search
(make_qkx2_quants / make_qx_quants / make_q3_quants, vectorised across groups), then a fused
per-super-block tail (scale quantization, fp16 rounding, re-quantization, bit packing).
Reference: ggml/src/ggml-quants.c.
"""
from __future__ import annotations

import numpy as np

from . import _kq_numba as K
from . import _kq_pack as P
from . import _kq_q3 as Q3

QK_K = 256
#: groups per SIMD tile in the Q3_K search (measured: 32..128 within 10 %)
Q3_TILE = 64
_F = np.float32


def _prep(xb: np.ndarray, out, type_size: int):
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if out is None:
        out = np.empty((xb.shape[0], type_size), np.uint8)
    return xb, out


def _qkx2(xb: np.ndarray, group: int, nmax: int, rmin: float, nstep: int, use_mad: bool,
          wmode: int):
    nb = xb.shape[0]
    ng = QK_K // group
    L = np.empty((nb, QK_K), np.uint8)
    sc = np.empty((nb, ng), np.float32)
    mi = np.empty((nb, ng), np.float32)
    K.qkx2_kernel(xb.reshape(nb * ng, group), nmax, _F(rmin), _F(0.1), nstep, use_mad, wmode,
                  L.reshape(nb * ng, group), sc.reshape(-1), mi.reshape(-1))
    return L, sc, mi


def quantize_q4_k(xb: np.ndarray, out=None) -> np.ndarray:
    xb, out = _prep(xb, out, 144)
    L, sc, mi = _qkx2(xb, 32, 15, -1.0, 20, False, 1)
    P.q45k_finish(xb, L, sc, mi, 15, out)
    return out


def quantize_q5_k(xb: np.ndarray, out=None) -> np.ndarray:
    xb, out = _prep(xb, out, 176)
    L, sc, mi = _qkx2(xb, 32, 31, -0.5, 15, False, 1)
    P.q45k_finish(xb, L, sc, mi, 31, out)
    return out


def quantize_q2_k(xb: np.ndarray, out=None) -> np.ndarray:
    xb, out = _prep(xb, out, 84)
    L, sc, mi = _qkx2(xb, 16, 3, -0.5, 15, True, 0)
    P.q2k_finish(xb, L, sc, mi, out)
    return out


def _search16(kernel, xb: np.ndarray, nmax: int):
    nb = xb.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    sc = np.empty((nb, 16), np.float32)
    kernel(xb.reshape(nb * 16, 16), nmax, L.reshape(nb * 16, 16), sc.reshape(-1))
    return L, sc


def quantize_q3_k(xb: np.ndarray, out=None) -> np.ndarray:
    xb, out = _prep(xb, out, 110)
    nb = xb.shape[0]
    G = nb * 16
    Lt = np.empty(((G + Q3_TILE - 1) // Q3_TILE, 16, Q3_TILE), np.uint8)
    sc = np.empty((nb, 16), np.float32)
    Q3.q3_kernel(xb.reshape(G, 16), 4, Lt, sc.reshape(-1))
    P.q3k_finish(xb, Lt, sc, out)
    return out


def quantize_q6_k(xb: np.ndarray, out=None) -> np.ndarray:
    xb, out = _prep(xb, out, 210)
    L, sc = _search16(K.qx_kernel, xb, 32)
    P.q6k_finish(xb, L, sc, out)
    return out


QUANTIZERS = {
    "Q2_K": quantize_q2_k,
    "Q3_K": quantize_q3_k,
    "Q4_K": quantize_q4_k,
    "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k,
}
