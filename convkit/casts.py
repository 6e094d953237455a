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


@dataclass(frozen=True)
class Cast:
    """A float cast, registered as kind ``cast``: ``cast(name, tensor, ctx)`` casts one tensor
    (non-floats pass through); ``cast.dtype`` is the safetensors dtype it produces."""

    name: str
    dtype: str

    def __call__(self, name: str, t: torch.Tensor, ctx: CastContext) -> torch.Tensor:
        return _cast(name, t, self.dtype, ctx)

    def target(self, src_dtype: str) -> str:
        return target_dtype(src_dtype, self.dtype)


FP16 = register("cast", "fp16", "F16", "float16", "half",
                help="IEEE half: what most checkpoints ship in")(Cast("fp16", "F16"))
BF16 = register("cast", "bf16", "BF16", "bfloat16",
                help="bfloat16: fp32's range, fewer mantissa bits (Flux ships in it)")(
    Cast("bf16", "BF16"))
FP32 = register("cast", "fp32", "F32", "float32",
                help="single precision: lossless from every float input")(Cast("fp32", "F32"))


def cast_dtype(name: str) -> str:
    """'fp16' -> 'F16' (any registered spelling); unknown names fail with a suggestion."""
    from . import registry

    return registry.get("cast", name).dtype


#: user name -> safetensors dtype (every registered spelling)
CAST_TARGET = {"fp16": "F16", "bf16": "BF16", "fp32": "F32",
               "F16": "F16", "BF16": "BF16", "F32": "F32", "float16": "F16", "half": "F16",
               "bfloat16": "BF16", "float32": "F32"}
