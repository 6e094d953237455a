"""``W += alpha · (up @ down)``: the merge's hot loop, on the fastest fp32 kernel torch has here.

torch's fp32 ``addmm_`` goes to MKL, which on AMD CPUs runs its AVX2 code path (~118 GFLOP/s per
core here for rank-64 products). oneDNN, also inside torch and reached through the op that
torch's inductor uses for CPU linears (``mkldnn._linear_pointwise``), picks its kernels by CPU
features and runs AVX-512 where present: the product then the in-place add measure ~1.6-1.8x
faster here (bench/lora.py), in plain fp32 (no reduced-precision mode). The product is formed
first and added with ``alpha`` (``W + alpha·P``), the same two roundings as ``addmm_``.

Where that op is missing or misbehaves (other torch builds, non-x86 CPUs), or with
``CONVKIT_LORA_KERNEL=addmm``, ``addmm_`` is used. Both merge paths (whole tensors and row
chunks) go through :func:`add_lowrank_`, so they compute the same bits.
"""
from __future__ import annotations

import os

import torch


def _onednn_linear():
    if os.environ.get("CONVKIT_LORA_KERNEL", "").lower() == "addmm":
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        if not torch.backends.mkldnn.is_available():
            return None
        g = torch.Generator().manual_seed(0)
        u, d = torch.randn(37, 5, generator=g), torch.randn(5, 23, generator=g)
        got = op(u, d.t().contiguous(), None, "none", [], "")
        if got.shape != (37, 23) or not torch.allclose(got, u @ d, rtol=1e-5, atol=1e-5):
            return None
        return op
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


_LINEAR = _onednn_linear()
KERNEL = "onednn" if _LINEAR is not None else "addmm"


class LowRank:
    """The factors of one plain LoRA, ready for :func:`add_lowrank_` (``down`` kept transposed
    for oneDNN: it computes ``x @ weight.T``)."""

    __slots__ = ("up", "down", "down_t")

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        self.up = up.flatten(1).float().contiguous()
        self.down = down.flatten(1).float().contiguous()
        self.down_t = self.down.t().contiguous() if _LINEAR is not None else None


def add_lowrank_(target: torch.Tensor, lr: LowRank, alpha: float, rows: slice | None = None) -> None:
    """``target += alpha · (lr.up[rows] @ lr.down)`` in place; ``target`` is 2-D fp32."""
    up = lr.up if rows is None else lr.up[rows]
    if _LINEAR is None:
        target.addmm_(up, lr.down, alpha=alpha)
    else:
        target.add_(_LINEAR(up, lr.down_t, None, "none", [], ""), alpha=alpha)
