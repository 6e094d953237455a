"""Decoders of stored quantized weights: GGML blocks (GGUF) and bitsandbytes 4-bit (NF4/FP4).

    ggml_decode("Q4_K", raw, out)     # raw: uint8 whole blocks -> out: float32, in place
    ggml_decodable("IQ4_XS")          # True: fast kernel, plain float, or gguf-py fallback
    bnb4_decode(packed, start, count, code, absmax, blocksize, out)

GGML: Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K have numba kernels whose
output is bit-identical to ``gguf.quants.dequantize`` (and to ggml's ``dequantize_row_*``):
float32 only, the same operation order (e.g. Q4_K ``(d*sc)*q - dmin*m``, Q4_1 ``d*q + m``), no
fastmath/FMA, fp16 scales decoded exactly from their bits. The one thing not pinned is the
payload of a NaN produced from a NaN scale (LLVM may commute an add, and IEEE leaves the payload
of a two-NaN operation open): such values are NaN on both sides, possibly different NaNs.
F32/F16/BF16 are converted with numpy; other types gguf-py can dequantize (IQ*, TQ*, MXFP4, ...)
go through gguf-py (slow but correct); the rest (Q8_1, Q8_K, ...) are not decodable.

Speed, one thread, a 512x4096 tensor, GB/s of float32 output (best of 4 x 10 runs on a
shared 2-core AMD EPYC (AVX2) under load, so +-30 %; the 8 MB output stays in L3; numpy 2.4,
numba 0.68, gguf-py 0.19, bitsandbytes 0.50 with OMP_NUM_THREADS=1;
``OMP_NUM_THREADS=1 python -m convkit.kernels.dequant`` re-measures):

    type    convkit  gguf-py
    Q8_0      7.9      2.8
    Q5_0      9.0      0.51
    Q5_1      8.2      0.58
    Q4_0      7.0      0.94
    Q4_1      6.1      0.84
    Q2_K      6.5      0.83
    Q3_K      5.9      0.48
    Q4_K     18.7      0.65
    Q5_K     12.6      0.47
    Q6_K      5.7      1.1
    nf4      13.6      1.3-6.5 (bitsandbytes, via convkit.quantize.nf4.dequantize)
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from ._kq_pack import _f32_from_bits  # int32 bits -> float32

f32 = np.float32
_JIT = dict(cache=True, nogil=True, fastmath=False, error_model="numpy", boundscheck=False)


# --------------------------------------------------------------------------- helpers

@njit(inline="always", **_JIT)
def _f16(raw, p):
    """The IEEE half at raw[p:p+2] (little-endian) as float32, exactly as numpy converts it:
    like ``_kq_pack.fp16_to_fp32`` but keeping NaN payloads (subnormals: m * 2**-24, exact)."""
    h = np.int64(raw[p]) | (np.int64(raw[p + 1]) << 8)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = f32(m) * f32(2.0 ** -24)
        return -v if sign else v
    if e == 31:
        bits = sign | 0x7F800000 | (m << 13)
    else:
        bits = sign | ((e + 112) << 23) | (m << 13)
    return _f32_from_bits(np.int32(bits - (1 << 32) if bits >= (1 << 31) else bits))


@njit(inline="always", **_JIT)
def _u32(raw, p):
    return (np.int64(raw[p]) | (np.int64(raw[p + 1]) << 8) | (np.int64(raw[p + 2]) << 16)
            | (np.int64(raw[p + 3]) << 24))


@njit(inline="always", **_JIT)
def _scale_min_k4(sc, p, j):
    """The 6-bit (scale, min) of group j of a Q4_K/Q5_K block (scales at raw[p:p+12])."""
    if j < 4:
        return np.int64(sc[p + j] & 63), np.int64(sc[p + j + 4] & 63)
    a = np.int64(sc[p + j + 4])
    return ((a & 0xF) | ((np.int64(sc[p + j - 4]) >> 6) << 4),
            (a >> 4) | ((np.int64(sc[p + j]) >> 6) << 4))


# --------------------------------------------------------------------------- legacy 32-blocks
# Block layouts (bytes): Q8_0 d | qs[32] int8;  Q4_0 d | qs[16];  Q4_1 d m | qs[16];
# Q5_0 d | qh[4] | qs[16];  Q5_1 d m | qh[4] | qs[16]. Value j < 16 is the low nibble of qs[j],
# j >= 16 the high nibble of qs[j-16]; Q5: bit j of qh (u32) is bit 4 of value j.

@njit(**_JIT)
def _q8_0(raw, out):
    for i in range(out.shape[0] // 32):
        p, o = 34 * i, 32 * i
        d = _f16(raw, p)
        for j in range(32):
            q = np.int32(raw[p + 2 + j])
            out[o + j] = f32(q - ((q & 0x80) << 1)) * d


@njit(**_JIT)
def _q4(raw, out, ts, has_min):
    """Q4_0 (ts 18): d * (q - 8);  Q4_1 (ts 20): d * q + m."""
    for i in range(out.shape[0] // 32):
        p, o = ts * i, 32 * i
        d = _f16(raw, p)
        qp = p + ts - 16
        if has_min:
            m = _f16(raw, p + 2)
            for j in range(16):
                b = np.int32(raw[qp + j])
                out[o + j] = d * f32(b & 0xF) + m
                out[o + 16 + j] = d * f32(b >> 4) + m
        else:
            for j in range(16):
                b = np.int32(raw[qp + j])
                out[o + j] = d * f32((b & 0xF) - 8)
                out[o + 16 + j] = d * f32((b >> 4) - 8)


@njit(**_JIT)
def _q5(raw, out, ts, has_min):
    """Q5_0 (ts 22): d * (q - 16);  Q5_1 (ts 24): d * q + m."""
    for i in range(out.shape[0] // 32):
        p, o = ts * i, 32 * i
        d = _f16(raw, p)
        qh = _u32(raw, p + ts - 20)
        qp = p + ts - 16
        if has_min:
            m = _f16(raw, p + 2)
            for j in range(16):
                b = np.int64(raw[qp + j])
                out[o + j] = d * f32((b & 0xF) | (((qh >> j) & 1) << 4)) + m
                out[o + 16 + j] = d * f32((b >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m
        else:
            for j in range(16):
                b = np.int64(raw[qp + j])
                out[o + j] = d * f32(((b & 0xF) | (((qh >> j) & 1) << 4)) - 16)
                out[o + 16 + j] = d * f32(((b >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16)


# --------------------------------------------------------------------------- K-quants (256)
# 256 values per super-block. The per-group float scales are computed first (d * sc, as gguf-py
# does), then each packed byte fans out to the values it holds, ggml's dequantize_row_* loop
# shape: a 32-wide inner loop that LLVM vectorises. For the 2-bit planes (Q2_K, Q3_K, Q6_K's
# high bits) byte 32*h + l holds values 128*h + 32*s + l in bits 2*s (s < 4); 16 groups of 16.

@njit(**_JIT)
def _q2_k(raw, out):
    """scales[16] (low nibble: scale, high: min) | qs[64] | d | dmin;  dl * q - ml."""
    dl = np.empty(16, np.float32)
    ml = np.empty(16, np.float32)
    for i in range(out.shape[0] // 256):
        p, o = 84 * i, 256 * i
        d = _f16(raw, p + 80)
        dmin = _f16(raw, p + 82)
        for g in range(16):
            sc = np.int32(raw[p + g])
            dl[g] = d * f32(sc & 0xF)
            ml[g] = dmin * f32(sc >> 4)
        for h in range(2):
            for l in range(32):
                b = np.int32(raw[p + 16 + 32 * h + l])
                g = 8 * h + (l >> 4)
                v = o + 128 * h + l
                out[v] = dl[g] * f32(b & 3) - ml[g]
                out[v + 32] = dl[g + 2] * f32((b >> 2) & 3) - ml[g + 2]
                out[v + 64] = dl[g + 4] * f32((b >> 4) & 3) - ml[g + 4]
                out[v + 96] = dl[g + 6] * f32(b >> 6) - ml[g + 6]


@njit(**_JIT)
def _q3_k(raw, out):
    """hmask[32] | qs[64] | scales[12] (16 x 6 bits, minus 32) | d;  dl * q with
    q = low2 - (hmask bit ? 0 : 4), the hmask bit of value 32*k + l being bit k of hmask[l]."""
    dl = np.empty(16, np.float32)
    for i in range(out.shape[0] // 256):
        p, o = 110 * i, 256 * i
        d = _f16(raw, p + 108)
        for g in range(16):
            lo = (np.int32(raw[p + 96 + g]) & 0xF) if g < 8 else (np.int32(raw[p + 88 + g]) >> 4)
            hi = (np.int32(raw[p + 104 + g % 4]) >> (2 * (g // 4))) & 3
            dl[g] = d * f32((lo | (hi << 4)) - 32)
        for h in range(2):
            for l in range(32):
                b = np.int32(raw[p + 32 + 32 * h + l])
                m = np.int32(raw[p + l]) >> (4 * h)
                g = 8 * h + (l >> 4)
                v = o + 128 * h + l
                out[v] = dl[g] * f32((b & 3) - 4 + ((m & 1) << 2))
                out[v + 32] = dl[g + 2] * f32(((b >> 2) & 3) - 4 + ((m & 2) << 1))
                out[v + 64] = dl[g + 4] * f32(((b >> 4) & 3) - 4 + (m & 4))
                out[v + 96] = dl[g + 6] * f32((b >> 6) - 4 + ((m & 8) >> 1))


@njit(**_JIT)
def _q45_k(raw, out, five):
    """Q4_K: d | dmin | scales[12] | qs[128];  Q5_K: d | dmin | scales[12] | qh[32] | qs[128].
    Byte 32*c + l of qs holds values 64*c + l (low nibble, group 2c) and 64*c + 32 + l (high,
    group 2c+1); Q5_K's 5th bit of value 32*g + l is bit g of qh[l]. (d*sc) * q - dmin*m."""
    ts = 176 if five else 144
    dl = np.empty(8, np.float32)
    ml = np.empty(8, np.float32)
    for i in range(out.shape[0] // 256):
        p, o = ts * i, 256 * i
        d = _f16(raw, p)
        dmin = _f16(raw, p + 2)
        for g in range(8):
            sc, mn = _scale_min_k4(raw, p + 4, g)
            dl[g] = d * f32(sc)
            ml[g] = dmin * f32(mn)
        qp = p + ts - 128
        for c in range(4):
            d1, m1, d2, m2 = dl[2 * c], ml[2 * c], dl[2 * c + 1], ml[2 * c + 1]
            v = o + 64 * c
            if five:
                for l in range(32):
                    b = np.int32(raw[qp + 32 * c + l])
                    hb = np.int32(raw[p + 16 + l]) >> (2 * c)
                    out[v + l] = d1 * f32((b & 0xF) | ((hb & 1) << 4)) - m1
                    out[v + 32 + l] = d2 * f32((b >> 4) | ((hb & 2) << 3)) - m2
            else:
                for l in range(32):
                    b = np.int32(raw[qp + 32 * c + l])
                    out[v + l] = d1 * f32(b & 0xF) - m1
                    out[v + 32 + l] = d2 * f32(b >> 4) - m2


@njit(**_JIT)
def _q6_k(raw, out):
    """ql[128] | qh[64] | scales[16] int8 | d;  (d*sc) * (q - 32). In each 128-value half h,
    ql[64h + l] holds values l (low nibble) and 64 + l (high), ql[64h + 32 + l] values 32 + l
    and 96 + l; qh[32h + l] their two high bits (bits 0-1, 2-3, 4-5, 6-7 for +0, +32, +64, +96)."""
    dl = np.empty(16, np.float32)
    for i in range(out.shape[0] // 256):
        p, o = 210 * i, 256 * i
        d = _f16(raw, p + 208)
        for g in range(16):
            sc = np.int32(raw[p + 192 + g])
            dl[g] = d * f32(sc - ((sc & 0x80) << 1))
        for h in range(2):
            for l in range(32):
                a = np.int32(raw[p + 64 * h + l])
                a2 = np.int32(raw[p + 64 * h + 32 + l])
                qh = np.int32(raw[p + 128 + 32 * h + l])
                g = 8 * h + (l >> 4)
                v = o + 128 * h + l
                out[v] = dl[g] * f32(((a & 0xF) | ((qh & 3) << 4)) - 32)
                out[v + 32] = dl[g + 2] * f32(((a2 & 0xF) | (((qh >> 2) & 3) << 4)) - 32)
                out[v + 64] = dl[g + 4] * f32(((a >> 4) | (((qh >> 4) & 3) << 4)) - 32)
                out[v + 96] = dl[g + 6] * f32(((a2 >> 4) | (((qh >> 6) & 3) << 4)) - 32)


_FAST = {
    "Q8_0": lambda r, o: _q8_0(r, o),
    "Q4_0": lambda r, o: _q4(r, o, 18, False),
    "Q4_1": lambda r, o: _q4(r, o, 20, True),
    "Q5_0": lambda r, o: _q5(r, o, 22, False),
    "Q5_1": lambda r, o: _q5(r, o, 24, True),
    "Q2_K": lambda r, o: _q2_k(r, o),
    "Q3_K": lambda r, o: _q3_k(r, o),
    "Q4_K": lambda r, o: _q45_k(r, o, False),
    "Q5_K": lambda r, o: _q45_k(r, o, True),
    "Q6_K": lambda r, o: _q6_k(r, o),
}
FAST_TYPES = tuple(_FAST)
_FLOAT = ("F32", "F16", "BF16")


def _gguf_py_can(name: str) -> bool:
    from gguf.quants import _type_traits  # gguf-py's registry of the types it dequantizes

    t = GGMLQuantizationType.__members__.get(name)
    return t is not None and t in _type_traits


def ggml_decodable(qtype: str) -> bool:
    """True when :func:`ggml_decode` can decode GGML type ``qtype`` (a name such as "Q4_K")."""
    return qtype in _FAST or qtype in _FLOAT or _gguf_py_can(qtype)


def ggml_decode(qtype: str, raw: np.ndarray, out: np.ndarray) -> None:
    """Decode whole GGML blocks ``raw`` (1-D uint8) into ``out`` (1-D float32) in place."""
    t = GGMLQuantizationType.__members__.get(qtype)
    if t is None or not ggml_decodable(qtype):
        raise ValueError(f"GGML type {qtype!r} cannot be decoded")
    bs, ts = GGML_QUANT_SIZES[t]
    if raw.dtype != np.uint8 or raw.ndim != 1 or out.dtype != np.float32 or out.ndim != 1:
        raise ValueError("ggml_decode needs 1-D uint8 raw and 1-D float32 out")
    if raw.size % ts or raw.size // ts * bs != out.size:
        raise ValueError(f"{qtype}: {raw.size} bytes are not the {out.size // bs * ts} bytes of "
                         f"{out.size} values (blocks of {bs} values in {ts} bytes)")
    if not out.size:
        return
    raw = np.ascontiguousarray(raw)
    fn = _FAST.get(qtype)
    if fn is not None:
        fn(raw, out)
    elif qtype == "F32":
        out[:] = raw.view(np.float32)
    elif qtype == "F16":
        out[:] = raw.view(np.float16)
    elif qtype == "BF16":
        out.view(np.uint32)[:] = raw.view(np.uint16).astype(np.uint32) << 16
    else:
        from gguf.quants import dequantize

        with np.errstate(all="ignore"):  # NaN/Inf scales decode to NaN/Inf, as in the kernels
            out[:] = dequantize(raw, t).reshape(-1)


# --------------------------------------------------------------------------- bitsandbytes 4-bit

@njit(**_JIT)
def _bnb4(packed, start, count, code, absmax, blocksize, out):
    """Any start/blocksize, element by element where a block starts on a low nibble."""
    base = start - (start & 1)                       # element of packed[0]'s high nibble
    k = 0
    while k < count:
        g = start + k
        a = absmax[g // blocksize]
        end = min(count, k + blocksize - g % blocksize)   # this block's part of the range
        if g & 1:
            for kk in range(k, end):
                gg = start + kk
                b = np.int32(packed[(gg - base) >> 1])
                out[kk] = code[(b >> (4 - 4 * (gg & 1))) & 0xF] * a
            k = end
            continue
        while k + 1 < end:
            b = np.int32(packed[(start + k - base) >> 1])
            out[k] = code[b >> 4] * a
            out[k + 1] = code[b & 0xF] * a
            k += 2
        if k < end:
            out[k] = code[np.int32(packed[(start + k - base) >> 1]) >> 4] * a
            k += 1


@njit(**_JIT)
def _bnb4_blocks(packed, pairs, absmax, blocksize, out, out64):
    """Whole blocks of an even blocksize (``packed``, ``absmax``, ``out`` start at a block;
    ``out64`` is ``out`` seen as uint64, 8-byte aligned): each byte becomes its two code values
    with one 64-bit copy from ``pairs`` (256 x (code[hi], code[lo]), bits copied exactly), then
    the block is scaled in place: the same float32 code * absmax as element by element, ~3x
    faster. (A fixed per-block loop shape: with per-block trip counts LLVM vectorises less.)"""
    half = blocksize // 2
    for i in range(out.shape[0] // blocksize):
        a = absmax[i]
        k = i * blocksize
        h = k >> 1
        for j in range(half):
            out64[h + j] = pairs[packed[h + j]]
        for j in range(blocksize):
            out[k + j] = out[k + j] * a


def bnb4_decode(packed: np.ndarray, start: int, count: int, code: np.ndarray,
                absmax: np.ndarray, blocksize: int, out: np.ndarray) -> None:
    """bitsandbytes 4-bit values of elements ``start:start+count`` of the flattened tensor.

    ``packed``: the bytes ``start//2 : ceil((start+count)/2)`` of the packed weight (two values
    per byte, high nibble = even element); ``code``: float32[16] (the quant_map); ``absmax``:
    float32 per block of the whole tensor (double quant decoded by the caller); ``out``:
    float32[count]. value = code[nibble] * absmax[element // blocksize], in float32.

    Against bitsandbytes' ``dequantize_4bit``: bit-identical when the quant state's dtype is
    float32. For float16/bfloat16 states bitsandbytes rounds the same float32 product to that
    dtype, so this returns the unrounded (more exact) value, which rounds to bitsandbytes'
    output when cast to the state's dtype. One sign-of-zero difference: bitsandbytes' CPU
    kernel has its own FP4 table with -0.0 for code 8, where the stored quant_map (used here,
    and by bitsandbytes' generic path) has +0.0.
    """
    if count <= 0:
        return
    if start < 0 or blocksize <= 0:
        raise ValueError(f"bad start {start} or blocksize {blocksize}")
    need = (start + count + 1) // 2 - start // 2
    nblocks = -(-(start + count) // blocksize)
    if packed.size < need or code.size < 16 or absmax.size < nblocks or out.size < count:
        raise ValueError(f"bnb4_decode: need {need} packed bytes, 16 codes, {nblocks} absmax, "
                         f"{count} outputs; got {packed.size}, {code.size}, {absmax.size}, "
                         f"{out.size}")
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    code = np.ascontiguousarray(code[:16], dtype=np.float32)
    absmax = np.ascontiguousarray(absmax, dtype=np.float32)

    def elementwise(s: int, c: int) -> None:  # elements s:s+c, any parity
        if c > 0:
            _bnb4(packed[s // 2 - start // 2:], s, c, code, absmax, blocksize,
                  out[s - start:s - start + c])

    head = min(count, -start % blocksize)             # up to the first block boundary
    s = start + head
    nb = (count - head) // blocksize
    mid = out[head:head + nb * blocksize]
    if nb and blocksize % 2 == 0 and mid.flags.c_contiguous and mid.ctypes.data % 8 == 0:
        idx = np.arange(256)
        pairs = np.stack([code[idx >> 4], code[idx & 0xF]], axis=1).view(np.uint64).reshape(-1)
        elementwise(start, head)
        _bnb4_blocks(packed[s // 2 - start // 2:], pairs, absmax[s // blocksize:], blocksize,
                     mid, mid.view(np.uint64))
        elementwise(s + nb * blocksize, count - head - nb * blocksize)
    else:
        elementwise(start, count)


# --------------------------------------------------------------------------- measurement

def _bench(rows: int = 512, cols: int = 4096, repeat: int = 5) -> list[tuple[str, float, float]]:
    """(type, convkit GB/s, gguf-py GB/s) of float32 output, one thread, best of ``repeat``."""
    import time

    from gguf.quants import dequantize

    from .ggml_quants import quantize

    def best(fn):
        fn()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return rows * cols * 4 / min(ts) / 1e9

    x = (np.random.default_rng(0).standard_normal((rows, cols)) * 0.02).astype(np.float32)
    out = np.empty(rows * cols, np.float32)
    res = []
    for q in FAST_TYPES:
        raw = quantize(x, q).reshape(-1)
        t = GGMLQuantizationType[q]
        res.append((q, best(lambda q=q, raw=raw: ggml_decode(q, raw, out)),
                    best(lambda raw=raw, t=t: dequantize(raw.reshape(rows, -1), t))))
    import torch

    from ..quantize import nf4

    st, _ = nf4.quantize("w", torch.from_numpy(x), "nf4", False)
    packed, code, absmax = (st[k].reshape(-1).numpy() for k in ("w", "w.quant_map", "w.absmax"))
    res.append(("nf4", best(lambda: bnb4_decode(packed, 0, x.size, code, absmax, 64, out)),
                best(lambda: nf4.dequantize("w", dict(st)))))
    return res


if __name__ == "__main__":
    for q, ours, theirs in _bench():
        print(f"    {q:6s} {ours:7.2f}  {theirs:7.2f}")


# ----------------------------------------------------------------------------- fp8


@njit(**_JIT)
def _byte_lut(raw, lut, scale, out):
    for i in range(raw.shape[0]):
        out[i] = lut[raw[i]] * scale


_FP8_LUT: dict[str, np.ndarray] = {}


def fp8_lut(dtype_name: str) -> np.ndarray:
    """The 256 float32 values of an fp8 type (``F8_E4M3`` / ``F8_E5M2``), as torch decodes
    them (NaN codes included)."""
    lut = _FP8_LUT.get(dtype_name)
    if lut is None:
        import torch

        tdt = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[dtype_name]
        lut = _FP8_LUT[dtype_name] = (torch.arange(256, dtype=torch.uint8).view(tdt).float()
                                      .numpy().astype(np.float32))
    return lut


def fp8_decode(dtype_name: str, raw: np.ndarray, out: np.ndarray, scale: float = 1.0) -> None:
    """``out = fp8 values of raw (uint8 codes) * scale`` in float32 through a 256-entry table:
    the same values as torch's fp8 -> float32 conversion (then one float32 multiply, like
    ``w8.float() * scale``), ~5x faster than that conversion on one CPU thread."""
    _byte_lut(raw, fp8_lut(dtype_name), np.float32(scale), out)
