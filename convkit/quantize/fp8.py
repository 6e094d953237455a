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
