"""Numba kernel for the Q3_K scale search (make_q3_quants with do_rmse), same bit-exactness
rules as ``_kq_numba``; lanes are groups, and lanes still refining after the first pass are
compacted into a pending tile (see ``q3_kernel``)."""
from __future__ import annotations

import numpy as np
from numba import njit

from ._kq_numba import _EPS, _JIT, f32, load_tile, nearest_clamp_f


@njit(inline="always", **_JIT)
def _q3_pass(xt, wv, lt, sumlx, suml2, chg, lo, hi):
    """One refinement pass of make_q3_quants over a tile (n values x T lanes), branch-free:
    every lane computes its candidate and a select keeps it; chg[b] is set where a lane changed.
    L is held as float32 so the loop runs in 32-bit SIMD lanes.  Returns 1 if any lane changed."""
    n, T = xt.shape
    changed = 0
    for b in range(T):
        chg[b] = 0
    for i in range(n):
        for b in range(T):
            v = xt[i, b]
            w = v * v
            wvv = wv[i, b]
            fli = lt[i, b]
            s1 = sumlx[b]
            s2 = suml2[b]
            slx = s1 - wvv * fli
            sl2 = s2 - w * fli * fli
            fq = nearest_clamp_f(v * sl2 / slx, lo, hi)
            slx2 = slx + wvv * fq
            sl22 = sl2 + w * fq * fq
            u = ((slx > f32(0.0)) & (fq != fli) & (sl22 > f32(0.0))
                 & (slx2 * slx2 * s2 > s1 * s1 * sl22))
            lt[i, b] = fq if u else fli
            sumlx[b] = slx2 if u else s1
            suml2[b] = sl22 if u else s2
            chg[b] |= np.int32(u)
            changed |= np.int32(u)
    return changed


@njit(inline="always", **_JIT)
def _q3_scale(sumlx, suml2):
    s = f32(0.0)
    if suml2 > f32(0.0):
        s = sumlx / suml2
    return s


@njit(**_JIT)
def q3_kernel(x, nmax, L_out, scale_out):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) for every row of x (G x n).

    L_out is tile-major, (ceil(G / T), n, T) uint8 with T = L_out.shape[2]: group g's values
    are L_out[g // T, :, g % T] (the finish step only reads it for groups whose scale rounds
    to 0, so it is never transposed back).

    In C, ~80 % of groups stop after the first refinement pass (nothing changed).  So every
    tile gets one pass; the lanes that changed are moved to a pending tile, which runs the
    remaining passes when it is full (all its lanes have done exactly one pass, so they step
    together, and each lane's sequence of passes is exactly C's: a pass that changes nothing
    leaves the state as it was)."""
    G, n = x.shape
    T = L_out.shape[2]
    fnmax = f32(nmax)
    lo = -nmax
    hi = nmax - 1
    xt = np.zeros((n, T), np.float32)
    wv = np.zeros((n, T), np.float32)
    lt = np.zeros((n, T), np.float32)
    mxv = np.zeros(T, np.float32)
    amax = np.zeros(T, np.float32)
    isc = np.zeros(T, np.float32)
    sumlx = np.zeros(T, np.float32)
    suml2 = np.zeros(T, np.float32)
    chg = np.zeros(T, np.int32)
    # the pending tile
    px = np.zeros((n, T), np.float32)
    pw = np.zeros((n, T), np.float32)
    pl = np.zeros((n, T), np.float32)
    ps1 = np.zeros(T, np.float32)
    ps2 = np.zeros(T, np.float32)
    pg = np.zeros(T, np.int64)
    pchg = np.zeros(T, np.int32)
    npend = 0
    for g0 in range(0, G + T, T):
        if g0 < G:
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
                isc[b] = -fnmax / mv
                sumlx[b] = f32(0.0)
                suml2[b] = f32(0.0)
            for i in range(n):
                for b in range(T):
                    v = xt[i, b]
                    fq = nearest_clamp_f(isc[b] * v, lo, hi)
                    lt[i, b] = fq
                    w = v * v
                    wv[i, b] = w * v
                    sumlx[b] += w * v * fq
                    suml2[b] += w * fq * fq
            _q3_pass(xt, wv, lt, sumlx, suml2, chg, lo, hi)
            tile = g0 // T
            for i in range(n):
                for b in range(T):
                    L_out[tile, i, b] = np.uint8(lt[i, b] + fnmax)
            for b in range(m):
                if amax[b] < _EPS:
                    scale_out[g0 + b] = f32(0.0)
                    for i in range(n):
                        L_out[tile, i, b] = 0
                else:
                    scale_out[g0 + b] = _q3_scale(sumlx[b], suml2[b])
            for b in range(m):
                if chg[b] != 0 and amax[b] >= _EPS:
                    for i in range(n):
                        px[i, npend] = xt[i, b]
                        pw[i, npend] = wv[i, b]
                        pl[i, npend] = lt[i, b]
                    ps1[npend] = sumlx[b]
                    ps2[npend] = suml2[b]
                    pg[npend] = g0 + b
                    npend += 1
                    if npend == T:
                        _q3_flush(px, pw, pl, ps1, ps2, pg, pchg, npend, nmax, lo, hi,
                                  L_out, scale_out)
                        npend = 0
        elif npend:
            for b in range(npend, T):
                for i in range(n):
                    px[i, b] = f32(0.0)
                    pw[i, b] = f32(0.0)
                    pl[i, b] = f32(0.0)
                ps1[b] = f32(0.0)
                ps2[b] = f32(0.0)
            _q3_flush(px, pw, pl, ps1, ps2, pg, pchg, npend, nmax, lo, hi, L_out, scale_out)
            npend = 0


@njit(**_JIT)
def _q3_flush(px, pw, pl, ps1, ps2, pg, pchg, npend, nmax, lo, hi, L_out, scale_out):
    """Passes 2..5 for a pending tile (lanes >= npend are zero padding: they never change)."""
    for itry in range(4):
        if _q3_pass(px, pw, pl, ps1, ps2, pchg, lo, hi) == 0:
            break
    T = px.shape[1]
    for b in range(npend):
        g = pg[b]
        scale_out[g] = _q3_scale(ps1[b], ps2[b])
        tile = g // T
        r = g - tile * T
        for i in range(px.shape[0]):
            L_out[tile, i, r] = np.uint8(pl[i, b] + f32(nmax))
