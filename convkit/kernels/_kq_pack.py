"""Numba kernels, part 2: the per-super-block tails of the K-quants, fp16 helpers and the
legacy 32-value block quantizers.  Same bit-exactness rules as ``_kq_numba`` (float32 only,
C operation order, no fastmath/FMA)."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._kq_numba import _EPS, _JIT, _bits_f32, _i32, f32, nearest_clamp_i32, nearest_int

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


# The per-block helpers below that loop over arrays are plain (not inlined) calls taking the
# whole 2-D arrays and a row index: inlining them, or passing a row view ``a[i]``, makes numba
# emit an atomic incref/decref pair per block, which cost more than the loops themselves.

@njit(**_JIT)
def _requant(xb, i, L, il, dv, mv, lo, hi, off, qs):
    """The re-quantization with the rounded scales, over super-block i as flat loops (so they
    vectorise): ``L[il, t] = clamp(nearest_int((xb[i, t] + mv[t]) / dv[t]), lo, hi) + off``
    where ``dv[t] != 0``; where C skips a group (its scale rounded to 0) the search's L stays.
    ``mv`` is 0 for the types without a min (x + 0.0 == x up to the sign of zero, which
    nearest_int does not see); ``dv`` is constant over runs of 16.  The divisions run into the
    int32 scratch ``qs`` first: a single loop that also narrows to uint8 does not vectorise on
    AVX2 (LLVM's cost model)."""
    n = xb.shape[1]
    for t in range(n):
        qs[t] = nearest_clamp_i32((xb[i, t] + mv[t]) / dv[t], lo, hi, off)
    for t0 in range(0, n, 16):
        if dv[t0] != f32(0.0):
            for t in range(t0, t0 + 16):
                L[il, t] = np.uint8(qs[t])


@njit(**_JIT)
def _expand(dst, src, ng, g):
    """dst[g * j + ii] = src[j] for j < ng (per-group values to per-value)."""
    for j in range(ng):
        for ii in range(g):
            dst[g * j + ii] = src[j]


@njit(**_JIT)
def q45k_finish(xb, L, sc, mi, nmax, out):
    """Q4_K (nmax 15) / Q5_K (nmax 31) tail. xb (nb,256) f32, L (nb,256) u8 (search result,
    modified), sc/mi (nb,8) f32 (scales, the_min), out (nb,144|176) u8."""
    nb = xb.shape[0]
    ls = np.zeros(8, np.int64)
    lm = np.zeros(8, np.int64)
    dv = np.zeros(256, np.float32)
    mv = np.zeros(256, np.float32)
    qs = np.zeros(256, np.int32)
    dg = np.zeros(16, np.float32)
    mg = np.zeros(16, np.float32)
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
            dg[j] = d * f32(ls[j])
            mg[j] = dmin * f32(lm[j])
        _expand(dv, dg, 8, 32)
        _expand(mv, mg, 8, 32)
        _requant(xb, i, L, i, dv, mv, 0, nmax, 0, qs)
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


@njit(**_JIT)
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
    qs = np.zeros(256, np.int32)
    dg = np.zeros(16, np.float32)
    mg = np.zeros(16, np.float32)
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
            dg[j] = d * f32(s[j] & 0xF)
            mg[j] = dmin * f32(s[j] >> 4)
        _expand(dv, dg, 16, 16)
        _expand(mv, mg, 16, 16)
        _requant(xb, i, L, i, dv, mv, 0, 3, 0, qs)
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
    qs = np.zeros(256, np.int32)
    dg = np.zeros(16, np.float32)
    lb = np.zeros((1, 256), np.uint8)
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
            dg[j] = dj
            if dj == f32(0.0):
                g = 16 * i + j
                for ii in range(16):
                    lb[0, 16 * j + ii] = Lt[g // T, ii, g % T]
        _expand(dv, dg, 16, 16)
        _requant(xb, i, lb, 0, dv, mv, -4, 3, 4, qs)
        for m in range(32):
            h = np.uint8(0)
            for k in range(8):
                v = lb[0, 32 * k + m]
                h |= np.uint8((v >> 2) << k)
            out[i, m] = h
        for hh in range(2):
            for l in range(32):
                j = 128 * hh + l
                out[i, 32 + 32 * hh + l] = ((lb[0, j] & 3) | ((lb[0, j + 32] & 3) << 2)
                                             | ((lb[0, j + 64] & 3) << 4)
                                             | ((lb[0, j + 96] & 3) << 6))
        _put16(out, i, 108, dh)


@njit(**_JIT)
def q6k_finish(xb, L, sc, out):
    nb = xb.shape[0]
    dv = np.zeros(256, np.float32)
    mv = np.zeros(256, np.float32)
    qs = np.zeros(256, np.int32)
    dg = np.zeros(16, np.float32)
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
            dg[j] = d * f32(s8)
        _expand(dv, dg, 16, 16)
        _requant(xb, i, L, i, dv, mv, -32, 31, 32, qs)
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


# Float -> int conversions below are LLVM fptosi to int32, i.e. x86 cvttps2dq: INT_MIN for
# inf/NaN/out of range, as C's casts compile on x86 (such values occur when 1/d overflows for a
# subnormal d; tests/test_ggml_quants.py's random super-blocks cover them).

@intrinsic
def _f2u8(typingctx, x):
    """(uint8_t)(int)x: float -> int32 truncation, low byte."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.trunc(builder.fptosi(args[0], ir.IntType(32)), ir.IntType(8))

    return types.uint8(types.float32), codegen


@intrinsic
def _c_q(typingctx, x, top):
    """C's ``MIN(top, (int8_t)x)`` as int32: float -> int32 truncation (x86: INT_MIN when out
    of range, e.g. inf/NaN when 1/d overflowed), low byte sign-extended, signed min."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        v = builder.sext(builder.trunc(builder.fptosi(args[0], i32), ir.IntType(8)), i32)
        t = _i32(builder, args[1])
        return builder.select(builder.icmp_signed("<", v, t), v, t)

    return types.int32(types.float32, top), codegen


@intrinsic
def _nib2i(typingctx, a, b):
    """(a & 0xF) | ((b & 0xF) << 4) as uint8 for int32 a, b."""
    if a != types.int32 or b != types.int32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        m = ir.Constant(i32, 0xF)
        lo = builder.and_(args[0], m)
        hi = builder.shl(builder.and_(args[1], m), ir.Constant(i32, 4))
        return builder.trunc(builder.or_(lo, hi), ir.IntType(8))

    return types.uint8(types.int32, types.int32), codegen


@intrinsic
def _fkey(typingctx, x):
    """int32 key of a float32 whose signed order is the float order (-0.0 < +0.0)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        b = builder.bitcast(args[0], i32)
        m = builder.lshr(builder.ashr(b, ir.Constant(i32, 31)), ir.Constant(i32, 1))
        return builder.xor(b, m)

    return types.int32(types.float32), codegen


@intrinsic
def _unkey(typingctx, k):
    """Inverse of ``_fkey``."""
    if k != types.int32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        b = args[0]
        m = builder.lshr(builder.ashr(b, ir.Constant(i32, 31)), ir.Constant(i32, 1))
        return builder.bitcast(builder.xor(b, m), ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _absbits(typingctx, x):
    """int32 bits of |x| (their order is the order of |x|)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        return builder.and_(builder.bitcast(args[0], i32), ir.Constant(i32, 0x7FFFFFFF))

    return types.int32(types.float32), codegen


# The block reductions (max |x|, min, max) are integer min/max reductions over order-preserving
# int32 keys of the floats: LLVM vectorises those (a float min/max reduction needs fastmath).
# min/max of float32 are exact and order-independent except for the sign of a zero result and
# for which of +a / -a comes first in q4_0/q5_0's signed max; those blocks (rare) redo C's loop.
# Loop bounds come from array shapes, not literals: numba runs LLVM without its SLP vectoriser,
# so a loop LLVM fully unrolls (constant trip count) stays scalar.

_I32MAX = np.int32(2147483647)
_I32MIN = np.int32(-2147483648)


@njit(**_JIT)
def _minmax_c(x, i):
    """(min, max) of x[i, :] in C's order: ``if (v < min) min = v; if (v > max) max = v``
    from FLT_MAX / -FLT_MAX (decides the sign of a zero result)."""
    mn = f32(3.4028234663852886e38)
    mx = f32(-3.4028234663852886e38)
    for j in range(x.shape[1]):
        v = x[i, j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    return mn, mx


@njit(**_JIT)
def _signed_absmax_c(x, i):
    """q4_0/q5_0's loop: the first x[i, j] with the largest |x| (+0.0 if all are zero)."""
    amax = f32(0.0)
    mx = f32(0.0)
    for j in range(x.shape[1]):
        a = abs(x[i, j])
        if amax < a:
            amax = a
            mx = x[i, j]
    return mx


@njit(**_JIT)
def _put_qh(out, i, pos, qi, n):
    """qh: bit j = bit 4 of the level qi[j] of value j (little-endian uint32)."""
    qh = 0
    for j in range(n):
        qh |= ((np.int64(qi[j]) >> 4) & 1) << j
    for k in range(4):
        out[i, pos + k] = (qh >> (8 * k)) & 0xFF


@njit(**_JIT)
def _put_fp16(out, pos, v):
    """out[i, pos:pos + 2] = GGML_FP32_TO_FP16(v[i]) for every block (one pass at the end, so
    the conversions run side by side)."""
    for i in range(out.shape[0]):
        _put16(out, i, pos, fp32_to_fp16(v[i]))


# The per-block loops below are written out in the kernels (not in helpers: an inlined helper
# taking an array costs an atomic incref/decref pair per block, a call ~20 cycles).

@njit(**_JIT)
def _leg_q8_0(x, out):
    nb, n = x.shape
    dd = np.empty(nb, np.float32)
    for i in range(nb):
        k = np.int32(0)
        for j in range(n):
            a = _absbits(x[i, j])
            k = a if a > k else k
        d = _f32_from_bits(k) / f32(127.0)  # max |x| (as MAX(amax, fabsf(v)) from 0)
        dd[i] = d
        idv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        for j in range(n):
            v = x[i, j] * idv
            t = np.trunc(v)
            r = t + (f32(1.0) if v > f32(0.0) else f32(-1.0))
            out[i, 2 + j] = _f2u8(r if abs(v - t) >= f32(0.5) else t)  # roundf
    _put_fp16(out, 0, dd)


@njit(**_JIT)
def _leg_q45_0(x, out, top):
    """q4_0 (top 15) / q5_0 (top 31)."""
    nb, n = x.shape
    h = n // 2
    qi = np.zeros(n, np.int32)
    dd = np.empty(nb, np.float32)
    half = f32(top + 1) * f32(0.5)
    dv = -half
    off = half + f32(0.5)
    for i in range(nb):
        kmin = _I32MAX
        kmax = _I32MIN
        for j in range(n):
            k = _fkey(x[i, j])
            kmin = k if k < kmin else kmin
            kmax = k if k > kmax else kmax
        hi = _unkey(kmax)
        lo = _unkey(kmin)
        if hi > -lo:
            mx = hi
        elif -lo > hi:
            mx = lo
        else:  # +a and -a both present (or all zero): the first one wins
            mx = _signed_absmax_c(x, i)
        d = mx / dv
        dd[i] = d
        idv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        if top == 31:
            for j in range(h):
                q0 = _c_q(x[i, j] * idv + off, top)
                q1 = _c_q(x[i, j + h] * idv + off, top)
                qi[j] = q0
                qi[j + h] = q1
                out[i, 6 + j] = _nib2i(q0, q1)
            _put_qh(out, i, 2, qi, n)
        else:
            for j in range(h):
                out[i, 2 + j] = _nib2i(_c_q(x[i, j] * idv + off, top),
                                       _c_q(x[i, j + h] * idv + off, top))
    _put_fp16(out, 0, dd)


@njit(**_JIT)
def _leg_q45_1(x, out, top):
    """q4_1 (top 15: MIN(15, .)) / q5_1 (top 31: no clamp, (uint8_t) of the int8)."""
    nb, n = x.shape
    h = n // 2
    qi = np.zeros(n, np.int32)
    dd = np.empty(nb, np.float32)
    mm = np.empty(nb, np.float32)
    ftop = f32(top)
    for i in range(nb):
        kmin = _I32MAX
        kmax = _I32MIN
        for j in range(n):
            k = _fkey(x[i, j])
            kmin = k if k < kmin else kmin
            kmax = k if k > kmax else kmax
        mn = _unkey(kmin)
        mx = _unkey(kmax)
        if mn == f32(0.0) or mx == f32(0.0):  # the sign of a zero depends on the order
            mn, mx = _minmax_c(x, i)
        d = (mx - mn) / ftop
        dd[i] = d
        mm[i] = mn
        idv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        if top == 31:  # (uint8_t)(int8_t)(v + 0.5f), no clamp
            for j in range(h):
                q0 = _c_q((x[i, j] - mn) * idv + f32(0.5), 127)
                q1 = _c_q((x[i, j + h] - mn) * idv + f32(0.5), 127)
                qi[j] = q0
                qi[j + h] = q1
                out[i, 8 + j] = _nib2i(q0, q1)
            _put_qh(out, i, 4, qi, n)
        else:
            for j in range(h):
                out[i, 4 + j] = _nib2i(_c_q((x[i, j] - mn) * idv + f32(0.5), top),
                                       _c_q((x[i, j + h] - mn) * idv + f32(0.5), top))
    _put_fp16(out, 0, dd)
    _put_fp16(out, 2, mm)


@njit(**_JIT)
def legacy_kernel(x, kind, out):
    """quantize_row_{q8_0,q4_0,q5_0,q4_1,q5_1}_ref over x (nb, 32) -> out (nb, type_size)."""
    if kind == LEG_Q8_0:
        _leg_q8_0(x, out)
    elif kind == LEG_Q4_0:
        _leg_q45_0(x, out, 15)
    elif kind == LEG_Q5_0:
        _leg_q45_0(x, out, 31)
    elif kind == LEG_Q4_1:
        _leg_q45_1(x, out, 15)
    else:
        _leg_q45_1(x, out, 31)
