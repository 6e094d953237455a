"""FP8 weights: plain casts and ComfyUI's scaled-fp8 layouts.

Plain: ``w.to(float8)`` after clamping to the finite range (a float8_e4m3fn cast of an
out-of-range value would give NaN); the number of clamped values is reported.

Scaled (per tensor, absmax -> the fp8 maximum, 448 for e4m3fn):
``scale = absmax / fmax``, ``w8 = (w / scale).to(float8)``, dequantized as ``w8 * scale``.
Two on-disk forms:

* ``scale_weight`` (ComfyUI ``scaled_fp8_ops``, Forge ``ForgeOperations.Linear``): a marker tensor
  ``<diffusion prefix>scaled_fp8`` whose dtype is the fp8 type (2 values: ComfyUI then keeps its
  fp8 matmul fast path off, which would clip activations at 448 without calibrated input scales),
  and ``<layer>.scale_weight`` (float32 scalar) beside each fp8 ``<layer>.weight``.
* ``comfy_quant`` (ComfyUI ``mixed_precision_ops``): ``<layer>.weight_scale`` (float32 scalar)
  and ``<layer>.comfy_quant`` (uint8 bytes of ``{"format": "float8_e4m3fn"}``); no marker.
"""
from __future__ import annotations

import json

import torch

from .. import dtypes

COMFY_FORMAT = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
MARKER_VALUES = 2


def fmax(qtype: str) -> float:
    return float(torch.finfo(dtypes.to_torch(qtype)).max)


def cast(t: torch.Tensor, qtype: str) -> tuple[torch.Tensor, int]:
    """Plain cast with clamping; returns (fp8 tensor, number of clamped values)."""
    m = fmax(qtype)
    t = t.float()
    over = int((t.abs() > m).sum())
    if over:
        t = t.clamp(-m, m)
    return t.to(dtypes.to_torch(qtype)), over


def scaled(t: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scalar scale) with absmax mapped to the fp8 maximum."""
    t = t.float()
    m = fmax(qtype)
    amax = float(t.abs().max()) if t.numel() else 0.0
    scale = torch.tensor(amax / m if amax > 0 else 1.0, dtype=torch.float32)
    w = (t / scale).clamp(-m, m).to(dtypes.to_torch(qtype))
    return w, scale


def dequant(w8: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    w = w8.float()
    return w * scale.float() if scale is not None else w


def comfy_quant_blob(qtype: str) -> torch.Tensor:
    raw = json.dumps({"format": COMFY_FORMAT[qtype]}).encode("utf-8")
    return torch.tensor(list(raw), dtype=torch.uint8)


def marker(qtype: str) -> torch.Tensor:
    return torch.zeros(MARKER_VALUES, dtype=dtypes.to_torch(qtype))


def _lut(qtype: str):
    import numpy as np

    return torch.arange(256, dtype=torch.uint8).view(dtypes.to_torch(qtype)).float().numpy() \
        .astype(np.float32)


def quantize_measured(t: torch.Tensor, qtype: str, scaled_: bool, out: torch.Tensor | None = None,
                      nthreads: int | None = None):
    """Plain (``scaled_=False``) or scaled fp8 of ``t`` in chunks on ``nthreads`` threads.

    Returns (fp8 tensor shaped like ``t``, float32 scale or None, clamped count, non-finite
    count, ErrSums). Same bytes as :func:`cast` / :func:`scaled`; ``out`` is an optional
    reusable uint8 buffer (>= numel bytes). Nothing is cast when values are not finite.
    """
    import numpy as np

    from . import fastops as fo

    m = fmax(qtype)
    fdt = dtypes.to_torch(qtype)
    x = t.reshape(-1)
    if not x.is_contiguous():
        x = x.contiguous()
    n = x.numel()
    f32 = x.dtype == torch.float32
    buf = (out[:n] if out is not None else torch.empty(n, dtype=torch.uint8))
    w8 = buf.view(fdt)
    parts = fo.split(n, fo.CHUNK_VALUES)
    lut = _lut(qtype)
    mf = np.float32(m)

    def chunk(a, b):
        xc = x[a:b] if f32 else x[a:b].float()
        return xc, xc.numpy()

    if not scaled_:
        def work(a, b):
            xc, xn = chunk(a, b)
            bad, over, _ = fo.check_kernel(xn, mf)
            if bad:
                return bad, over, None
            w8[a:b].copy_(xc.clamp(-m, m) if over else xc)
            return bad, over, fo.err_lut_kernel(xn, buf[a:b].numpy(), lut, np.float32(1.0))

        res = fo.parallel_chunks(work, parts, nthreads)
        bad = sum(r[0] for r in res)
        over = sum(r[1] for r in res)
        sums = fo.ErrSums()
        if not bad:
            for (a, b), r in zip(parts, res):
                sums.add(r[2], b - a)
        return w8.view(t.shape), None, over, bad, sums

    res = fo.parallel_chunks(lambda a, b: fo.check_kernel(chunk(a, b)[1], mf), parts, nthreads)
    bad = sum(r[0] for r in res)
    amax = float(max((r[2] for r in res), default=0.0))
    scale = torch.tensor(amax / m if amax > 0 else 1.0, dtype=torch.float32)
    sums = fo.ErrSums()
    if bad:
        return w8.view(t.shape), scale, 0, bad, sums
    sf = np.float32(scale.item())

    def work2(a, b):
        xc, xn = chunk(a, b)
        w8[a:b].copy_((xc / scale).clamp_(-m, m))
        return fo.err_lut_kernel(xn, buf[a:b].numpy(), lut, sf)

    for (a, b), r in zip(parts, fo.parallel_chunks(work2, parts, nthreads)):
        sums.add(r, b - a)
    return w8.view(t.shape), scale, 0, bad, sums
