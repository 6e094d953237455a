"""Numba kernels, part 2: the per-super-block tails of the K-quants, fp16 helpers and the
legacy 32-value block quantizers.  Same bit-exactness rules as ``_kq_numba`` (float32 only,
C operation order, no fastmath/FMA)."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._kq_numba import _EPS, _JIT, _bits_f32, f32, nearest_clamp_u8, nearest_int

# --------------------------------------------------------------------------- fused "finish" steps
# Per super-block: quantize the group scales, fp16 the super-scales, re-quantize the values with
# the rounded scales and pack the bytes -- the tail of quantize_row_q*_K_ref, written straight
# into the output rows.

@intrinsic
def _f32_from_bits(typingctx, x):
    """Reinterpret an int32 as float32."""
    if x != types.int32:
        return None
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


_TO_INF = f32(2.0 ** 112)
_TO_ZERO = f32(2.0 ** -110)


@njit(inline="always", **_JIT)
def fp32_to_fp16(f):
    """GGML_FP32_TO_FP16 (ggml_compute_fp32_to_fp16): round to nearest even, bits as int."""
    base = (abs(f) * _TO_INF) * _TO_ZERO
    w = np.int64(_bits_f32(f)) & 0xFFFFFFFF
    shl1 = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1 & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = _f32_from_bits(np.int32((bias >> 1) + 0x07800000)) + base
    bits = np.int64(_bits_f32(base)) & 0xFFFFFFFF
    nonsign = ((bits >> 13) & 0x7C00) + (bits & 0x0FFF)
    if shl1 > 0xFF000000:
        nonsign = 0x7E00
    return (sign >> 16) | nonsign


@njit(inline="always", **_JIT)
def fp16_to_fp32(h):
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = f32(m) * f32(2.0 ** -24)
    elif e == 31:
        v = np.inf if m == 0 else np.nan
        v = f32(v)
    else:
        v = f32(1024 + m) * _f32_from_bits(np.int32((e - 25 + 127) << 23))
    if h & 0x8000:
        v = -v
    return v


@njit(inline="always", **_JIT)
def _put16(out, i, pos, h):
    out[i, pos] = h & 0xFF
    out[i, pos + 1] = (h >> 8) & 0xFF


@njit(inline="always", **_JIT)
def _requant(row, lrow, dv, mv, lo, hi, off):
    """The re-quantization with the rounded scales, over one super-block as a flat loop (so it
    vectorises): ``lrow[t] = clamp(nearest_int((row[t] + mv[t]) / dv[t]), lo, hi) + off`` where
    ``dv[t] != 0``; where C skips a group (its scale rounded to 0) the search's L stays.
    ``mv`` is 0 for the types without a min (x + 0.0 == x up to the sign of zero, which
    nearest_int does not see)."""
    for t in range(row.shape[0]):
        dj = dv[t]
        q = nearest_clamp_u8((row[t] + mv[t]) / dj, lo, hi, off)
        lrow[t] = q if dj != f32(0.0) else lrow[t]


@njit(inline="always", **_JIT)
def _fill(v, j, g, value):
    for ii in range(g):
        v[g * j + ii] = value


@njit(**_JIT)
def q45k_finish(xb, L, sc, mi, nmax, out):
    """Q4_K (nmax 15) / Q5_K (nmax 31) tail. xb (nb,256) f32, L (nb,256) u8 (search result,
    modified), sc/mi (nb,8) f32 (scales, the_min), out (nb,144|176) u8."""
    nb = xb.shape[0]
    ls = np.zeros(8, np.int64)
    lm = np.zeros(8, np.int64)
    dv = np.zeros(256, np.float32)
    mv = np.zeros(256, np.float32)
    for i in range(nb):
        max_scale = f32(0.0)
        max_min = f32(0.0)
        for j in range(8):
            if sc[i, j] > max_scale:
                max_scale = sc[i, j]
            if mi[i, j] > max_min:
                max_min = mi[i, j]
        inv_scale = f32(63.0) / max_scale if max_scale > f32(0.0) else f32(0.0)
        inv_min = f32(63.0) / max_min if max_min > f32(0.0) else f32(0.0)
        for j in range(8):
            ls[j] = min(63, nearest_int(inv_scale * sc[i, j]) & 0xFF)
            lm[j] = min(63, nearest_int(inv_min * mi[i, j]) & 0xFF)
        for j in range(4):
            out[i, 4 + j] = ls[j] | ((ls[j + 4] >> 4) << 6)
            out[i, 8 + j] = lm[j] | ((lm[j + 4] >> 4) << 6)
            out[i, 12 + j] = (ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4)
        dh = fp32_to_fp16(max_scale / f32(63.0))
        mh = fp32_to_fp16(max_min / f32(63.0))
        _put16(out, i, 0, dh)
        _put16(out, i, 2, mh)
        d = fp16_to_fp32(dh)
        dmin = fp16_to_fp32(mh)
        for j in range(8):
            _fill(dv, j, 32, d * f32(ls[j]))
            _fill(mv, j, 32, dmin * f32(lm[j]))
        _requant(xb[i], L[i], dv, mv, 0, nmax, 0)
        if nmax == 15:
            for c in range(4):
                for l in range(32):
                    out[i, 16 + 32 * c + l] = L[i, 64 * c + l] | (L[i, 64 * c + 32 + l] << 4)
        else:
            for j in range(32):
                out[i, 16 + j] = 0
            for c in range(4):
                for j in range(32):
                    l1 = np.int64(L[i, 64 * c + j])
                    l2 = np.int64(L[i, 64 * c + 32 + j])
                    h = out[i, 16 + j]
                    if l1 > 15:
                        l1 -= 16
                        h |= 1 << (2 * c)
                    if l2 > 15:
                        l2 -= 16
                        h |= 1 << (2 * c + 1)
                    out[i, 16 + j] = h
                    out[i, 48 + 32 * c + j] = l1 | (l2 << 4)


@njit(inline="always", **_JIT)
def _pack2(out, i, base, L):
    for h in range(2):
        for l in range(32):
            j = 128 * h + l
            out[i, base + 32 * h + l] = (L[i, j] | (L[i, j + 32] << 2) | (L[i, j + 64] << 4)
                                         | (L[i, j + 96] << 6))


@njit(**_JIT)
def q2k_finish(xb, L, sc, mi, out):
    nb = xb.shape[0]
    s = np.zeros(16, np.int64)
    dv = np.zeros(256, np.float32)
    mv = np.zeros(256, np.float32)
    for i in range(nb):
        max_scale = f32(0.0)
        max_min = f32(0.0)
        for j in range(16):
            if sc[i, j] > max_scale:
                max_scale = sc[i, j]
            if mi[i, j] > max_min:
                max_min = mi[i, j]
        dh = 0
        if max_scale > f32(0.0):
            iscale = f32(15.0) / max_scale
            for j in range(16):
                s[j] = nearest_int(iscale * sc[i, j]) & 0xFF
            dh = fp32_to_fp16(max_scale / f32(15.0))
        else:
            for j in range(16):
                s[j] = 0
        mh = 0
        if max_min > f32(0.0):
            iscale = f32(15.0) / max_min
            for j in range(16):
                s[j] = (s[j] | (nearest_int(iscale * mi[i, j]) << 4)) & 0xFF
            mh = fp32_to_fp16(max_min / f32(15.0))
        d = fp16_to_fp32(dh)
        dmin = fp16_to_fp32(mh)
        for j in range(16):
            out[i, j] = s[j]
            _fill(dv, j, 16, d * f32(s[j] & 0xF))
            _fill(mv, j, 16, dmin * f32(s[j] >> 4))
        _requant(xb[i], L[i], dv, mv, 0, 3, 0)
        _pack2(out, i, 16, L)
        _put16(out, i, 80, dh)
        _put16(out, i, 82, mh)


@njit(**_JIT)
def q3k_finish(xb, Lt, sc, out):
    """Q3_K tail.  Lt is the search's tile-major L (see ``q3_kernel``); it is only read for
    groups whose scale rounds to 0 (C keeps the search's L there)."""
    nb = xb.shape[0]
    T = Lt.shape[2]
    lq = np.zeros(16, np.int64)
    dv = np.zeros(256, np.float32)
    mv = np.zeros(256, np.float32)
    lb = np.zeros(256, np.uint8)
    for i in range(nb):
        amax = f32(0.0)
        max_scale = f32(0.0)
        for j in range(16):
            a = abs(sc[i, j])
            if a > amax:
                amax = a
                max_scale = sc[i, j]
        for k in range(12):
            out[i, 96 + k] = 0
        dh = 0
        if max_scale != f32(0.0):
            iscale = f32(-32.0) / max_scale
            for j in range(16):
                l = nearest_int(iscale * sc[i, j])
                l = ((l + 128) & 0xFF) - 128
                l = max(-32, min(31, l)) + 32
                lq[j] = l
                if j < 8:
                    out[i, 96 + j] = l & 0xF
                else:
                    out[i, 96 + j - 8] |= (l & 0xF) << 4
                out[i, 96 + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))
            dh = fp32_to_fp16(f32(1.0) / iscale)
        else:
            for j in range(16):
                lq[j] = 0
        d = fp16_to_fp32(dh)
        for j in range(16):
            dj = d * f32(lq[j] - 32)
            _fill(dv, j, 16, dj)
            if dj == f32(0.0):
                g = 16 * i + j
                for ii in range(16):
                    lb[16 * j + ii] = Lt[g // T, ii, g % T]
        _requant(xb[i], lb, dv, mv, -4, 3, 4)
        for m in range(32):
            h = np.uint8(0)
            for k in range(8):
                v = lb[32 * k + m]
                h |= np.uint8((v >> 2) << k)
            out[i, m] = h
        for hh in range(2):
            for l in range(32):
                j = 128 * hh + l
                out[i, 32 + 32 * hh + l] = ((lb[j] & 3) | ((lb[j + 32] & 3) << 2)
                                             | ((lb[j + 64] & 3) << 4) | ((lb[j + 96] & 3) << 6))
        _put16(out, i, 108, dh)


@njit(**_JIT)
def q6k_finish(xb, L, sc, out):
    nb = xb.shape[0]
    dv = np.zeros(256, np.float32)
    mv = np.zeros(256, np.float32)
    for i in range(nb):
        max_abs = f32(0.0)
        max_scale = f32(0.0)
        for j in range(16):
            a = abs(sc[i, j])
            if a > max_abs:
                max_abs = a
                max_scale = sc[i, j]
        if max_abs < _EPS:
            for k in range(210):
                out[i, k] = 0
            continue
        iscale = f32(-128.0) / max_scale
        dh = fp32_to_fp16(f32(1.0) / iscale)
        d = fp16_to_fp32(dh)
        for j in range(16):
            q = min(127, nearest_int(iscale * sc[i, j])) & 0xFF
            out[i, 192 + j] = q
            s8 = q - 256 if q > 127 else q
            _fill(dv, j, 16, d * f32(s8))
        _requant(xb[i], L[i], dv, mv, -32, 31, 32)
        for h in range(2):
            for l in range(32):
                j = 128 * h + l
                a0 = L[i, j]
                a1 = L[i, j + 32]
                a2 = L[i, j + 64]
                a3 = L[i, j + 96]
                out[i, 64 * h + l] = (a0 & 0xF) | ((a2 & 0xF) << 4)
                out[i, 64 * h + 32 + l] = (a1 & 0xF) | ((a3 & 0xF) << 4)
                out[i, 128 + 32 * h + l] = ((a0 >> 4) | ((a1 >> 4) << 2) | ((a2 >> 4) << 4)
                                            | ((a3 >> 4) << 6))
        _put16(out, i, 208, dh)


# --------------------------------------------------------------------------- legacy 32-blocks
LEG_Q8_0, LEG_Q4_0, LEG_Q5_0, LEG_Q4_1, LEG_Q5_1 = 0, 1, 2, 3, 4


@njit(**_JIT)
def legacy_kernel(x, kind, out):
    """quantize_row_{q8_0,q4_0,q5_0,q4_1,q5_1}_ref over x (nb, 32) -> out (nb, type_size)."""
    nb = x.shape[0]
    q = np.zeros(32, np.int64)
    for i in range(nb):
        if kind == LEG_Q8_0:
            amax = f32(0.0)
            for j in range(32):
                a = abs(x[i, j])
                amax = amax if amax > a else a
            d = amax / f32(127.0)
            idv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            _put16(out, i, 0, fp32_to_fp16(d))
            for j in range(32):
                v = x[i, j] * idv
                t = np.trunc(v)
                if abs(v - t) >= f32(0.5):
                    t += f32(1.0) if v > f32(0.0) else f32(-1.0)
                out[i, 2 + j] = np.int64(t) & 0xFF
            continue
        if kind == LEG_Q4_0 or kind == LEG_Q5_0:
            amax = f32(0.0)
            mx = f32(0.0)
            for j in range(32):
                a = abs(x[i, j])
                if amax < a:
                    amax = a
                    mx = x[i, j]
            if kind == LEG_Q4_0:
                d = mx / f32(-8.0)
                off = f32(8.5)
                top = 15
            else:
                d = mx / f32(-16.0)
                off = f32(16.5)
                top = 31
            idv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            _put16(out, i, 0, fp32_to_fp16(d))
            for j in range(32):
                q[j] = min(top, np.int64(x[i, j] * idv + off))
            pos = 2
        else:
            mn = f32(3.4028234663852886e38)
            mx = f32(-3.4028234663852886e38)
            for j in range(32):
                v = x[i, j]
                if v < mn:
                    mn = v
                if v > mx:
                    mx = v
            if kind == LEG_Q4_1:
                d = (mx - mn) / f32(15.0)
            else:
                d = (mx - mn) / f32(31.0)
            idv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            _put16(out, i, 0, fp32_to_fp16(d))
            _put16(out, i, 2, fp32_to_fp16(mn))
            for j in range(32):
                t = np.int64((x[i, j] - mn) * idv + f32(0.5))
                q[j] = min(15, t) if kind == LEG_Q4_1 else t & 0xFF
            pos = 4
        if kind == LEG_Q5_0 or kind == LEG_Q5_1:
            qh = 0
            for j in range(32):
                qh |= ((q[j] >> 4) & 1) << j
            for k in range(4):
                out[i, pos + k] = (qh >> (8 * k)) & 0xFF
            pos += 4
        for j in range(16):
            out[i, pos + j] = (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)
