"""Float dtype casts (fp32 / fp16 / bf16), registered as ``cast`` converters.

Only floating tensors change; integer and bool tensors (e.g. CLIP's position_ids) are copied.
Casting to fp16 checks for finite values that overflowed to inf: they are counted and, by
policy, clamped to +-65504 (default), kept as inf, or refused.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from . import dtypes
from .errors import TensorValueError, UsageError
from .registry import register

OVERFLOW_POLICIES = ("clamp", "inf", "error")


_COUNT_LOCK = threading.Lock()


@dataclass
class CastContext:
    on_overflow: str = "clamp"
    overflows: dict[str, int] = field(default_factory=dict)   # tensor -> count of values
    path: str | None = None

    def __post_init__(self):
        if self.on_overflow not in OVERFLOW_POLICIES:
            raise UsageError(f"--on-overflow must be one of {', '.join(OVERFLOW_POLICIES)}")


def target_dtype(src_dtype: str, target: str) -> str:
    """What a tensor of ``src_dtype`` becomes when cast to ``target`` (non-floats stay)."""
    return target if dtypes.is_float(src_dtype) else src_dtype


def cast_into(name: str, src: torch.Tensor, out: torch.Tensor, ctx: CastContext) -> None:
    """Cast ``src`` into the preallocated ``out`` (any float dtypes), counting overflow.

    Works on whole tensors and on chunks of one tensor alike (overflow counts add up).
    """
    out.copy_(src)
    limit = float(torch.finfo(out.dtype).max)
    if not out.numel() or float(torch.finfo(src.dtype).max) <= limit:
        return
    # One cheap reduction over the (smaller) output: only if it holds inf/NaN do we look
    # closer, to tell overflow (finite in the source) from inf/NaN the source already had.
    lo, hi = torch.aminmax(out)
    if torch.isfinite(lo) and torch.isfinite(hi):
        return
    overflow = torch.isinf(out) & torch.isfinite(src)
    over = int(overflow.sum())
    if not over:
        return
    with _COUNT_LOCK:   # chunks of one tensor may be cast by several threads
        ctx.overflows[name] = ctx.overflows.get(name, 0) + over
    if ctx.on_overflow == "error":
        raise TensorValueError(
            f"{ctx.overflows[name]} values exceed the {dtypes.from_torch(out.dtype)} range "
            f"(|x| > {limit:g})", path=ctx.path, key=name,
            hint="use --dtype bf16, or --on-overflow clamp")
    if ctx.on_overflow == "clamp":  # real inf/NaN in the source stay as they are
        out[overflow] = (torch.sign(src[overflow]) * limit).to(out.dtype)


def _cast(name: str, t: torch.Tensor, target: str, ctx: CastContext) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    tdt = dtypes.to_torch(target)
    if t.dtype == tdt:
        return t
    out = torch.empty(t.shape, dtype=tdt)
    cast_into(name, t, out, ctx)
    return out


@register("cast", "fp16", "F16", "float16")
def to_fp16(name: str, t: torch.Tensor, ctx: CastContext) -> torch.Tensor:
    return _cast(name, t, "F16", ctx)


@register("cast", "bf16", "BF16", "bfloat16")
def to_bf16(name: str, t: torch.Tensor, ctx: CastContext) -> torch.Tensor:
    return _cast(name, t, "BF16", ctx)


@register("cast", "fp32", "F32", "float32")
def to_fp32(name: str, t: torch.Tensor, ctx: CastContext) -> torch.Tensor:
    return _cast(name, t, "F32", ctx)


CAST_TARGET = {"fp16": "F16", "bf16": "BF16", "fp32": "F32",
               "F16": "F16", "BF16": "BF16", "F32": "F32", "float16": "F16",
               "bfloat16": "BF16", "float32": "F32"}
