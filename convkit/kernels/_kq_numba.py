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

What keeps the loops vectorised on AVX2 (8 float lanes, no AVX-512), found by profiling on Zen 3:

* integer levels are held as float32 and rounded/clamped by the ``nearest_clamp_*`` intrinsics
  in 32-bit lanes: numba widens ints to int64, and int64 -> float32 has no AVX2 instruction
  (LLVM scalarises it; with AVX-512DQ it is one instruction, which hid the problem);
* per-lane updates are selects on values, never a select between two loads (LLVM folds that
  into a load from a selected address and gives up on the loop) and never a conditional copy
  of a whole tile (each lane keeps the parameters of its best L; L is recomputed at the end);
* the per-lane state lives in rows of one array, so LLVM sees it as disjoint;
* the value loops are unrolled by 4 so the per-lane accumulators (in memory: the lane loop is
  the vectorised one) are loaded and stored once per 4 values; additions stay in C order.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

f32 = np.float32
#: groups per SIMD tile (lanes).  Measured on AVX2 (Zen 3): 128 and 256 equal, 64 -5 %, 32 -30 %
#: (every inner loop entry pays LLVM's runtime overlap checks, so short loops lose).
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
def nearest_clamp_i32(typingctx, x, lo, hi, off):
    """int32(clamp(nearest_int(x), lo, hi) + off), computed in 32-bit lanes."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.add(_clamped_round(builder, *args[:3]), _i32(builder, args[3]))

    return types.int32(types.float32, lo, hi, off), codegen


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
    """make_qkx2_quants over every row of ``x`` (G groups x n values, n % 4 == 0).

    wmode 0: weights = |x| (Q2_K);  wmode 1: weights = sqrt(sum(x^2)/n) + |x| (Q4_K, Q5_K).
    Writes L_out (G, n) uint8, scale_out (G,), min_out (G,) (= the_min, i.e. -min).

    L is held as float32 so the loops run in 32-bit SIMD lanes (int64 -> float has no AVX2
    instruction).  C copies Laux into L whenever a step improves; here each lane only keeps the
    (iscale, min) its best L was computed from, and L is recomputed once at the end (the same
    float32 expression, so the same L).  The value loops are unrolled by 4 so the per-lane
    accumulators are loaded and stored once per 4 values (additions stay in C order).
    """
    G, n = x.shape
    T = TILE
    fnmax = f32(nmax)
    tile = np.zeros((3, n, T), np.float32)
    xt = tile[0]
    wt = tile[1]
    la = tile[2]
    lane = np.zeros((18, T), np.float32)
    mn = lane[0]
    mx = lane[1]
    sw = lane[2]
    sx = lane[3]
    isc = lane[4]
    scale = lane[5]
    best = lane[6]
    sl = lane[7]
    sl2 = lane[8]
    sxl = lane[9]
    ts = lane[10]
    tm = lane[11]
    cur = lane[12]
    upd = lane[13]
    deg = lane[14]
    bisc = lane[15]
    bmn = lane[16]
    rng = lane[17]
    for g0 in range(0, G, T):
        m = load_tile(x, g0, xt)
        if wmode == 1:
            for i in range(0, n, 4):
                for b in range(T):
                    c = f32(0.0) if i == 0 else cur[b]
                    for k in range(4):
                        c += xt[i + k, b] * xt[i + k, b]
                    cur[b] = c
            for b in range(T):
                cur[b] = np.sqrt(cur[b] / f32(n))
            for i in range(n):
                for b in range(T):
                    wt[i, b] = cur[b] + abs(xt[i, b])
        else:
            for i in range(n):
                for b in range(T):
                    wt[i, b] = abs(xt[i, b])
        for i in range(0, n, 4):
            for b in range(T):
                if i == 0:
                    v = xt[0, b]
                    a0 = v
                    a1 = v
                    a2 = wt[0, b]
                    a3 = wt[0, b] * v
                else:
                    a0 = mn[b]
                    a1 = mx[b]
                    a2 = sw[b]
                    a3 = sx[b]
                for k in range(1 if i == 0 else 0, 4):
                    v = xt[i + k, b]
                    a0 = v if v < a0 else a0
                    a1 = v if v > a1 else a1
                    a2 += wt[i + k, b]
                    a3 += wt[i + k, b] * v
                mn[b] = a0
                mx[b] = a1
                sw[b] = a2
                sx[b] = a3
        for b in range(T):
            mnb = mn[b] if mn[b] <= f32(0.0) else f32(0.0)
            mn[b] = mnb
            dg = mx[b] == mnb
            deg[b] = f32(1.0) if dg else f32(0.0)
            r = f32(1.0) if dg else mx[b] - mnb
            rng[b] = r
            ib = fnmax / r
            isc[b] = ib
            bisc[b] = ib
            bmn[b] = mnb
            scale[b] = f32(1.0) / ib
            best[b] = f32(0.0)
        for i in range(0, n, 4):
            for b in range(T):
                ib = isc[b]
                mb = mn[b]
                sb = scale[b]
                c = best[b]
                for k in range(4):
                    v = xt[i + k, b]
                    fq = nearest_clamp_f(ib * (v - mb), 0, nmax)
                    d = sb * fq + mb - v
                    if use_mad:
                        d = abs(d)
                    else:
                        d = d * d
                    c += wt[i + k, b] * d
                best[b] = c
        for s in range(nstep + 1):
            num = rmin + rdelta * f32(s) + fnmax
            for b in range(T):
                isc[b] = num / rng[b]
                sl[b] = f32(0.0)
                sl2[b] = f32(0.0)
                sxl[b] = f32(0.0)
            for i in range(0, n, 4):
                for b in range(T):
                    ib = isc[b]
                    mb = mn[b]
                    s0 = sl[b]
                    s1 = sl2[b]
                    s2 = sxl[b]
                    for k in range(4):
                        v = xt[i + k, b]
                        fq = nearest_clamp_f(ib * (v - mb), 0, nmax)
                        la[i + k, b] = fq
                        wl = wt[i + k, b] * fq
                        s0 += wl
                        s1 += wl * fq
                        s2 += wl * v
                    sl[b] = s0
                    sl2[b] = s1
                    sxl[b] = s2
            for b in range(T):
                D = sw[b] * sl2[b] - sl[b] * sl[b]
                upd[b] = f32(1.0) if D > f32(0.0) else f32(0.0)
                t_s = (sw[b] * sxl[b] - sx[b] * sl[b]) / D
                t_m = (sl2[b] * sx[b] - sl[b] * sxl[b]) / D
                pos = t_m > f32(0.0)
                ts[b] = sxl[b] / sl2[b] if pos else t_s
                tm[b] = f32(0.0) if pos else t_m
            for i in range(0, n, 4):
                for b in range(T):
                    tsb = ts[b]
                    tmb = tm[b]
                    c = f32(0.0) if i == 0 else cur[b]
                    for k in range(4):
                        d = tsb * la[i + k, b] + tmb - xt[i + k, b]
                        if use_mad:
                            d = abs(d)
                        else:
                            d = d * d
                        c += wt[i + k, b] * d
                    cur[b] = c
            for b in range(T):
                u = (upd[b] != f32(0.0)) & (cur[b] < best[b]) & (deg[b] == f32(0.0))
                best[b] = cur[b] if u else best[b]
                scale[b] = ts[b] if u else scale[b]
                bisc[b] = isc[b] if u else bisc[b]
                bmn[b] = mn[b] if u else bmn[b]
                mn[b] = tm[b] if u else mn[b]
                rng[b] = mx[b] - mn[b] if u else rng[b]
        for b in range(m):
            g = g0 + b
            min_out[g] = -mn[b]
            if deg[b] != f32(0.0):
                scale_out[g] = f32(0.0)
                for i in range(n):
                    L_out[g, i] = 0
            else:
                scale_out[g] = scale[b]
                ib = bisc[b]
                mb = bmn[b]
                for i in range(n):
                    L_out[g, i] = np.uint8(nearest_clamp_f(ib * (xt[i, b] - mb), 0, nmax))


@njit(**_JIT)
def qx_kernel(x, nmax, L_out, scale_out):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for every row of x (G x n,
    n % 4 == 0).  Same scheme as ``qkx2_kernel``: float32 levels, each lane keeps the step of
    its best L (recomputed at the end instead of copied at every improvement), value loops
    unrolled by 4."""
    G, n = x.shape
    T = TILE
    fnmax = f32(nmax)
    lo = -nmax
    hi = nmax - 1
    tile = np.zeros((3, n, T), np.float32)
    xt = tile[0]
    wt = tile[1]  # w = x * x (rmse_type 1)
    wx = tile[2]  # w * x
    lane = np.zeros((8, T), np.float32)
    mxv = lane[0]
    amax = lane[1]
    isc = lane[2]
    slx = lane[3]
    sl2 = lane[4]
    scale = lane[5]
    best = lane[6]
    bst = lane[7]  # the step of each lane's best L (-10: the initial one)
    for g0 in range(0, G, T):
        m = load_tile(x, g0, xt)
        for b in range(T):
            amax[b] = f32(0.0)
            mxv[b] = f32(0.0)
        for i in range(n):
            for b in range(T):
                v = xt[i, b]
                ax = abs(v)
                c = ax > amax[b]
                amax[b] = ax if c else amax[b]
                mxv[b] = v if c else mxv[b]
        for b in range(T):
            mv = f32(1.0) if amax[b] < _EPS else mxv[b]
            mxv[b] = mv
            isc[b] = -fnmax / mv
        for i in range(n):
            for b in range(T):
                v = xt[i, b]
                w = v * v
                wt[i, b] = w
                wx[i, b] = w * v
        for st in range(-10, 10):
            # st == -10 is the initial pass (iscale = -nmax / max); then C's steps -9..9 but 0
            if st == 0:
                continue
            if st != -10:
                num = -(fnmax + f32(0.1) * f32(st))
                for b in range(T):
                    isc[b] = num / mxv[b]
            for i in range(0, n, 4):
                for b in range(T):
                    ib = isc[b]
                    s0 = f32(0.0) if i == 0 else slx[b]
                    s1 = f32(0.0) if i == 0 else sl2[b]
                    for k in range(4):
                        fq = nearest_clamp_f(ib * xt[i + k, b], lo, hi)
                        s0 += wx[i + k, b] * fq
                        s1 += wt[i + k, b] * fq * fq
                    slx[b] = s0
                    sl2[b] = s1
            if st == -10:
                for b in range(T):
                    sc = slx[b] / sl2[b] if sl2[b] != f32(0.0) else f32(0.0)
                    scale[b] = sc
                    best[b] = sc * slx[b]
                    bst[b] = f32(-10.0)
            else:
                for b in range(T):
                    s0 = slx[b]
                    s1 = sl2[b]
                    u = (s1 > f32(0.0)) & (s0 * s0 > best[b] * s1)
                    sc = s0 / s1
                    scale[b] = sc if u else scale[b]
                    best[b] = sc * s0 if u else best[b]
                    bst[b] = f32(st) if u else bst[b]
        for b in range(m):
            g = g0 + b
            if amax[b] < _EPS:
                scale_out[g] = f32(0.0)
                for i in range(n):
                    L_out[g, i] = 0
            else:
                scale_out[g] = scale[b]
                st = np.int64(bst[b])
                if st == -10:
                    ib = -fnmax / mxv[b]
                else:
                    ib = -(fnmax + f32(0.1) * f32(st)) / mxv[b]
                for i in range(n):
                    L_out[g, i] = np.uint8(nearest_clamp_f(ib * xt[i, b], lo, hi) + fnmax)
