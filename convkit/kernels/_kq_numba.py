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


_JIT = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)


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
        m = min(T, G - g0)
        for b in range(m):
            for i in range(n):
                xt[i, b] = x[g0 + b, i]
        for b in range(m, T):
            for i in range(n):
                xt[i, b] = f32(0.0)
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
        m = min(T, G - g0)
        for b in range(m):
            for i in range(n):
                xt[i, b] = x[g0 + b, i]
        for b in range(m, T):
            for i in range(n):
                xt[i, b] = f32(0.0)
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


@njit(**_JIT)
def q3_kernel(x, nmax, L_out, scale_out, T=TILE):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) for every row of x (G x n)."""
    G, n = x.shape
    fnmax = f32(nmax)
    xt = np.zeros((n, T), np.float32)
    lt = np.zeros((n, T), np.int32)
    mxv = np.zeros(T, np.float32)
    amax = np.zeros(T, np.float32)
    isc = np.zeros(T, np.float32)
    sumlx = np.zeros(T, np.float32)
    suml2 = np.zeros(T, np.float32)
    zero = np.zeros(T, np.bool_)
    for g0 in range(0, G, T):
        m = min(T, G - g0)
        for b in range(m):
            for i in range(n):
                xt[i, b] = x[g0 + b, i]
        for b in range(m, T):
            for i in range(n):
                xt[i, b] = f32(0.0)
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
            sumlx[b] = f32(0.0)
            suml2[b] = f32(0.0)
        for i in range(n):
            for b in range(T):
                v = xt[i, b]
                q = nearest_int(isc[b] * v)
                q = max(-nmax, min(nmax - 1, q))
                lt[i, b] = q
                w = v * v
                fq = f32(q)
                sumlx[b] += w * v * fq
                suml2[b] += w * fq * fq
        for itry in range(5):
            changed = 0
            for i in range(n):
                for b in range(T):
                    v = xt[i, b]
                    w = v * v
                    li = lt[i, b]
                    fli = f32(li)
                    slx = sumlx[b] - w * v * fli
                    if slx > f32(0.0):
                        sl2 = suml2[b] - w * fli * fli
                        q = nearest_int(v * sl2 / slx)
                        q = max(-nmax, min(nmax - 1, q))
                        if q != li:
                            fq = f32(q)
                            slx += w * v * fq
                            sl2 += w * fq * fq
                            if sl2 > f32(0.0) and slx * slx * suml2[b] > sumlx[b] * sumlx[b] * sl2:
                                lt[i, b] = q
                                sumlx[b] = slx
                                suml2[b] = sl2
                                changed += 1
            if changed == 0:
                break
        for b in range(m):
            if zero[b]:
                scale_out[g0 + b] = f32(0.0)
                for i in range(n):
                    L_out[g0 + b, i] = 0
            else:
                s = f32(0.0)
                if suml2[b] > f32(0.0):
                    s = sumlx[b] / suml2[b]
                scale_out[g0 + b] = s
                for i in range(n):
                    L_out[g0 + b, i] = lt[i, b] + nmax

