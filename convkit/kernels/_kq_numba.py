"""Numba kernels for the K-quant scale searches (make_qkx2_quants, make_qx_quants, make_q3_quants).

Bit-exactness rules followed here (the C reference is compiled for baseline x86-64, so it does
every operation in IEEE float32, in source order, with no FMA contraction):

* every float is float32 and every literal is wrapped in ``f32(...)`` so nothing promotes to
  float64; ``int`` operands are converted to float32 exactly where C converts them;
* ``fastmath=False`` (no reassociation, no FMA contraction in LLVM);
* ``nearest_int`` is the exact ``fval + 12582912.f`` bit trick via a bitcast intrinsic, so even
  out-of-range inputs give the same (garbage) integer as C;
* reductions run sequentially over the elements of a group, exactly like the C loops.

Speed comes from processing ``TILE`` independent groups side by side: the group index is the
innermost loop, so LLVM vectorises across groups (SIMD lanes = different groups) while each
lane keeps the C summation order.  Per-lane early exits of the C code are replaced by masks;
lanes that C would have skipped are computed harmlessly and overwritten at the end.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

f32 = np.float32
TILE = 128
_MAGIC = f32(12582912.0)
_EPS = f32(1e-15)  # GROUP_MAX_EPS


@intrinsic
def _bits_f32(typingctx, x):
    """Reinterpret a float32 as int32 (memcpy in C)."""
    if x != types.float32:
        return None
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


def _i32(builder, a):
    i32 = ir.IntType(32)
    return builder.trunc(a, i32) if a.type.width > 32 else builder.sext(a, i32) if a.type.width < 32 else a


def _clamped_round(builder, x, lo, hi):
    """i32 clamp(nearest_int(x), lo, hi): ggml's bit trick computed in 32-bit lanes (numba would
    widen every int to int64, halving the SIMD width)."""
    i32 = ir.IntType(32)
    s = builder.fadd(x, ir.Constant(ir.FloatType(), 12582912.0))
    b = builder.bitcast(s, i32)
    b = builder.and_(b, ir.Constant(i32, 0x007FFFFF))
    b = builder.sub(b, ir.Constant(i32, 0x00400000))
    lo, hi = _i32(builder, lo), _i32(builder, hi)
    b = builder.select(builder.icmp_signed("<", b, lo), lo, b)
    return builder.select(builder.icmp_signed(">", b, hi), hi, b)


@intrinsic
def nearest_clamp_f(typingctx, x, lo, hi):
    """float32(clamp(nearest_int(x), lo, hi)) -- exact: the clamped value is a small integer."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.sitofp(_clamped_round(builder, *args), ir.FloatType())

    return types.float32(types.float32, lo, hi), codegen


@intrinsic
def nearest_clamp_u8(typingctx, x, lo, hi, off):
    """uint8(clamp(nearest_int(x), lo, hi) + off)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        b = builder.add(_clamped_round(builder, *args[:3]), _i32(builder, args[3]))
        return builder.trunc(b, ir.IntType(8))

    return types.uint8(types.float32, lo, hi, off), codegen


_JIT = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)


@njit(inline="always", **_JIT)
def load_tile(x, g0, xt):
    """Rows g0.. of x (groups x values) into xt (values x T lanes), lanes past the end zeroed
    (such lanes compute harmlessly and are never stored). Returns the count of real lanes."""
    G, n = x.shape
    T = xt.shape[1]
    m = min(T, G - g0)
    for b in range(m):
        for i in range(n):
            xt[i, b] = x[g0 + b, i]
    for b in range(m, T):
        for i in range(n):
            xt[i, b] = f32(0.0)
    return m


@njit(inline="always", **_JIT)
def nearest_int(v):
    return (_bits_f32(v + _MAGIC) & 0x007FFFFF) - 0x00400000


@njit(**_JIT)
def qkx2_kernel(x, nmax, rmin, rdelta, nstep, use_mad, wmode, L_out, scale_out, min_out):
    """make_qkx2_quants over every row of ``x`` (G groups x n values).

    wmode 0: weights = |x| (Q2_K);  wmode 1: weights = sqrt(sum(x^2)/n) + |x| (Q4_K, Q5_K).
    Writes L_out (G, n) uint8, scale_out (G,), min_out (G,) (= the_min, i.e. -min).
    """
    G, n = x.shape
    T = TILE
    fnmax = f32(nmax)
    xt = np.zeros((n, T), np.float32)
    wt = np.zeros((n, T), np.float32)
    lt = np.zeros((n, T), np.int32)
    la = np.zeros((n, T), np.int32)
    mn = np.zeros(T, np.float32)
    mx = np.zeros(T, np.float32)
    sw = np.zeros(T, np.float32)
    sx = np.zeros(T, np.float32)
    isc = np.zeros(T, np.float32)
    scale = np.zeros(T, np.float32)
    best = np.zeros(T, np.float32)
    sl = np.zeros(T, np.float32)
    sl2 = np.zeros(T, np.float32)
    sxl = np.zeros(T, np.float32)
    ts = np.zeros(T, np.float32)
    tm = np.zeros(T, np.float32)
    cur = np.zeros(T, np.float32)
    upd = np.zeros(T, np.bool_)
    deg = np.zeros(T, np.bool_)
    for g0 in range(0, G, T):
        m = load_tile(x, g0, xt)
        if wmode == 1:
            for b in range(T):
                cur[b] = f32(0.0)
            for i in range(n):
                for b in range(T):
                    cur[b] += xt[i, b] * xt[i, b]
            for b in range(T):
                cur[b] = np.sqrt(cur[b] / f32(n))
            for i in range(n):
                for b in range(T):
                    wt[i, b] = cur[b] + abs(xt[i, b])
        else:
            for i in range(n):
                for b in range(T):
                    wt[i, b] = abs(xt[i, b])
        for b in range(T):
            mn[b] = xt[0, b]
            mx[b] = xt[0, b]
            sw[b] = wt[0, b]
            sx[b] = wt[0, b] * xt[0, b]
        for i in range(1, n):
            for b in range(T):
                v = xt[i, b]
                if v < mn[b]:
                    mn[b] = v
                if v > mx[b]:
                    mx[b] = v
                sw[b] += wt[i, b]
                sx[b] += wt[i, b] * v
        for b in range(T):
            if mn[b] > f32(0.0):
                mn[b] = f32(0.0)
            deg[b] = mx[b] == mn[b]
            r = mx[b] - mn[b]
            if deg[b]:
                r = f32(1.0)
            isc[b] = fnmax / r
            scale[b] = f32(1.0) / isc[b]
            best[b] = f32(0.0)
        for i in range(n):
            for b in range(T):
                v = xt[i, b]
                q = nearest_int(isc[b] * (v - mn[b]))
                q = max(0, min(nmax, q))
                lt[i, b] = q
                d = scale[b] * f32(q) + mn[b] - v
                if use_mad:
                    d = abs(d)
                else:
                    d = d * d
                best[b] += wt[i, b] * d
        for s in range(nstep + 1):
            num = rmin + rdelta * f32(s) + fnmax
            for b in range(T):
                r = mx[b] - mn[b]
                if deg[b]:
                    r = f32(1.0)
                isc[b] = num / r
                sl[b] = f32(0.0)
                sl2[b] = f32(0.0)
                sxl[b] = f32(0.0)
            for i in range(n):
                for b in range(T):
                    v = xt[i, b]
                    q = nearest_int(isc[b] * (v - mn[b]))
                    q = max(0, min(nmax, q))
                    la[i, b] = q
                    fq = f32(q)
                    wl = wt[i, b] * fq
                    sl[b] += wl
                    sl2[b] += wl * fq
                    sxl[b] += wl * v
            for b in range(T):
                D = sw[b] * sl2[b] - sl[b] * sl[b]
                upd[b] = D > f32(0.0)
                t_s = (sw[b] * sxl[b] - sx[b] * sl[b]) / D
                t_m = (sl2[b] * sx[b] - sl[b] * sxl[b]) / D
                if t_m > f32(0.0):
                    t_m = f32(0.0)
                    t_s = sxl[b] / sl2[b]
                ts[b] = t_s
                tm[b] = t_m
                cur[b] = f32(0.0)
            for i in range(n):
                for b in range(T):
                    d = ts[b] * f32(la[i, b]) + tm[b] - xt[i, b]
                    if use_mad:
                        d = abs(d)
                    else:
                        d = d * d
                    cur[b] += wt[i, b] * d
            anyu = False
            for b in range(T):
                u = upd[b] and (cur[b] < best[b]) and not deg[b]
                upd[b] = u
                if u:
                    best[b] = cur[b]
                    scale[b] = ts[b]
                    mn[b] = tm[b]
                    anyu = True
            if anyu:
                for i in range(n):
                    for b in range(T):
                        if upd[b]:
                            lt[i, b] = la[i, b]
        for b in range(m):
            if deg[b]:
                scale_out[g0 + b] = f32(0.0)
                min_out[g0 + b] = -mn[b]
                for i in range(n):
                    L_out[g0 + b, i] = 0
            else:
                scale_out[g0 + b] = scale[b]
                min_out[g0 + b] = -mn[b]
                for i in range(n):
                    L_out[g0 + b, i] = lt[i, b]


@njit(**_JIT)
def qx_kernel(x, nmax, L_out, scale_out):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for every row of x (G x n)."""
    G, n = x.shape
    T = TILE
    fnmax = f32(nmax)
    xt = np.zeros((n, T), np.float32)
    lt = np.zeros((n, T), np.int32)
    la = np.zeros((n, T), np.int32)
    mxv = np.zeros(T, np.float32)
    amax = np.zeros(T, np.float32)
    isc = np.zeros(T, np.float32)
    slx = np.zeros(T, np.float32)
    sl2 = np.zeros(T, np.float32)
    scale = np.zeros(T, np.float32)
    best = np.zeros(T, np.float32)
    upd = np.zeros(T, np.bool_)
    zero = np.zeros(T, np.bool_)
    for g0 in range(0, G, T):
        m = load_tile(x, g0, xt)
        for b in range(T):
            amax[b] = f32(0.0)
            mxv[b] = f32(0.0)
        for i in range(n):
            for b in range(T):
                ax = abs(xt[i, b])
                if ax > amax[b]:
                    amax[b] = ax
                    mxv[b] = xt[i, b]
        for b in range(T):
            zero[b] = amax[b] < _EPS
            if zero[b]:
                mxv[b] = f32(1.0)
            isc[b] = -fnmax / mxv[b]
            slx[b] = f32(0.0)
            sl2[b] = f32(0.0)
        for i in range(n):
            for b in range(T):
                v = xt[i, b]
                q = nearest_int(isc[b] * v)
                q = max(-nmax, min(nmax - 1, q))
                lt[i, b] = q + nmax
                w = v * v
                fq = f32(q)
                slx[b] += w * v * fq
                sl2[b] += w * fq * fq
        for b in range(T):
            s = f32(0.0)
            if sl2[b] != f32(0.0):
                s = slx[b] / sl2[b]
            scale[b] = s
            best[b] = s * slx[b]
        for st in range(-9, 10):
            if st == 0:
                continue
            num = -(fnmax + f32(0.1) * f32(st))
            for b in range(T):
                isc[b] = num / mxv[b]
                slx[b] = f32(0.0)
                sl2[b] = f32(0.0)
            for i in range(n):
                for b in range(T):
                    v = xt[i, b]
                    q = nearest_int(isc[b] * v)
                    q = max(-nmax, min(nmax - 1, q))
                    la[i, b] = q + nmax
                    w = v * v
                    fq = f32(q)
                    slx[b] += w * v * fq
                    sl2[b] += w * fq * fq
            anyu = False
            for b in range(T):
                u = sl2[b] > f32(0.0) and slx[b] * slx[b] > best[b] * sl2[b]
                upd[b] = u
                if u:
                    scale[b] = slx[b] / sl2[b]
                    best[b] = scale[b] * slx[b]
                    anyu = True
            if anyu:
                for i in range(n):
                    for b in range(T):
                        if upd[b]:
                            lt[i, b] = la[i, b]
        for b in range(m):
            if zero[b]:
                scale_out[g0 + b] = f32(0.0)
                for i in range(n):
                    L_out[g0 + b, i] = 0
            else:
                scale_out[g0 + b] = scale[b]
                for i in range(n):
                    L_out[g0 + b, i] = lt[i, b]
