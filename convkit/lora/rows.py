"""merge-lora on row chunks: the streaming fast path.

A plain LoRA delta ``up @ down`` decomposes by output rows: rows ``a:b`` of ΔW are
``up[a:b] @ down``. So a base tensor whose patches are all plain LoRAs (no DoRA, no Tucker core,
no transpose) is streamed like a dtype cast (:mod:`convkit.chunked`): whole rows are read into
reusable buffers, the deltas are added in place in fp32 (:mod:`convkit.lora.lowrank`), the chunk is cast into a
reusable output buffer and written, while the next chunk is being read. No per-tensor
allocation, the matmuls overlap the I/O. Every other patch (LoHa, LoKr, DoRA, full diffs,
biases, transposed or swapped tensors) makes its tensor a whole-tensor item
(:func:`convkit.lora.merge.apply_patch`).

Per element the arithmetic is the whole-tensor path's: ``W += s·(up·down)`` with the same
kernel (or ``W += weight·((up·down)·alpha/rank)``), patches in the same order.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from ..casts import CastContext, cast_into
from .lowrank import LowRank, add_lowrank_
from .table import ModuleTable

_ROW_TRANSFORMS = (None, "conv1x1")   # keymap transforms that keep rows as rows


@dataclass
class RowOp:
    patch: object           # merge.Patch
    lo: int                 # base rows lo:hi hold this part of the unit
    hi: int
    off: int                # up row of base row lo
    fast: bool              # add_lowrank_(alpha=scale·weight), else += weight·((up·down)·scale)


def row_ops(table: ModuleTable, key: str, shape: tuple[int, ...], patches) -> list[RowOp] | None:
    """The row-decomposable form of ``patches`` on base tensor ``key``; None if one is not."""
    if len(shape) < 2:
        return None
    ops = []
    for p in patches:
        unit, ad = p.unit, p.ad
        if p.bias or ad.dora or not ad.is_fused_lora or unit.transform not in _ROW_TRANSFORMS:
            return None
        locs = table.unit_weight_locs(unit)
        mine = [i for i, loc in enumerate(locs) if loc.key == key]
        if any(locs[i].transform not in _ROW_TRANSFORMS for i in mine):
            return None
        # the whole-tensor path's choice between its two formulas (merge.apply_patch)
        fast = not unit.transform
        offsets = [sum(unit.sizes[:i]) for i in range(len(unit.sizes) + 1)]
        for i in mine:
            lo, hi = locs[i].rows or (0, shape[0])
            off = offsets[i] if len(locs) > 1 else 0
            ops.append(RowOp(p, lo, hi, off, fast))
    return ops


class RowMerger:
    """``elems_of`` / ``force`` / ``prepare`` / ``chunk_fn`` for :func:`convkit.plan.execute`.

    Stateless per chunk (the chunk's first element says which rows it holds), so chunks may be
    merged by several threads at once and in any order; the LoRA factors of a tensor are
    loaded once and dropped when its last chunk is done.
    """

    def __init__(self, table: ModuleTable, patches: dict, ctx: CastContext):
        self.table, self.patches, self.ctx = table, patches, ctx
        self.ops: dict[str, list[RowOp] | None] = {}
        self._lock = threading.Lock()
        self._factors: dict[str, dict[int, tuple]] = {}   # tensor -> patch id -> factors
        self._left: dict[str, int] = {}                   # tensor -> elements not merged yet
        self._local = threading.local()                   # per-thread fp32 scratch

    def _ops(self, it) -> list[RowOp] | None:
        if it.key not in self.ops:
            ops = row_ops(self.table, it.key, tuple(it.shape), self.patches[it.key])
            with self._lock:
                self.ops.setdefault(it.key, ops)
        return self.ops[it.key]

    def elems_of(self, it, elems: int) -> int:
        """Elements per chunk: any for untouched tensors, whole rows for patched ones, 0 (whole
        tensor) when a patch does not decompose by rows."""
        if it.key not in self.patches:
            return elems
        row = math.prod(it.shape[1:]) if len(it.shape) > 1 else 1
        if self._ops(it) is None or row > elems:
            return 0
        # equal chunks, no small tail: BLAS picks other kernels (other rounding) for a few rows
        n = -(-it.shape[0] // (elems // row))
        return -(-it.shape[0] // n) * row

    def force(self, it) -> bool:
        return it.key in self.patches

    def _load(self, key: str, op: RowOp) -> tuple:
        p = op.patch
        with self._lock:
            cache = self._factors.setdefault(key, {})
            got = cache.get(id(p))
            if got is None:
                lr = LowRank(p.lf.load(p.ad, "up"), p.lf.load(p.ad, "down"))
                got = cache[id(p)] = (lr, p.ad.scale(p.lf.source), p.strength)
        return got

    def _finished(self, it, count: int) -> None:
        with self._lock:
            left = self._left.get(it.key, math.prod(it.shape)) - count
            if left > 0:
                self._left[it.key] = left
            else:
                self._left.pop(it.key, None)
                self._factors.pop(it.key, None)

    def _in_prepare(self, it) -> bool:
        return it.key in self.patches and it.src_dtype == "F32"

    def _apply(self, it, w2: torch.Tensor, r0: int) -> None:
        n = w2.shape[0]
        for op in self._ops(it):
            a, b = max(op.lo, r0), min(op.hi, r0 + n)
            if a >= b:
                continue
            lr, scale, strength = self._load(it.key, op)
            rows = slice(op.off + a - op.lo, op.off + b - op.lo)
            tgt = w2[a - r0: b - r0]
            if op.fast:
                add_lowrank_(tgt, lr, scale * strength, rows)
            else:
                tgt += strength * ((lr.up[rows] @ lr.down) * scale)

    def prepare(self, it, start: int, count: int, raw: torch.Tensor) -> None:
        """Right after an fp32 chunk is read (into our own buffer): add the deltas in place.
        The sequential engine calls this on its reader thread, so it overlaps the casts."""
        if not self._in_prepare(it):
            return
        row = math.prod(it.shape[1:])
        self._apply(it, raw.view(torch.float32).view(count // row, row), start // row)
        self._finished(it, count)

    def __call__(self, it, start: int, src: torch.Tensor, out: torch.Tensor) -> None:
        if it.key not in self.patches or self._in_prepare(it):  # deltas already added
            if out.dtype == src.dtype:
                out.copy_(src)
            else:
                cast_into(it.key, src, out, self.ctx)
            return
        row = math.prod(it.shape[1:])
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.numel() < src.numel():
            scratch = self._local.scratch = torch.empty(src.numel(), dtype=torch.float32)
        w = scratch[: src.numel()]
        w.copy_(src)
        self._apply(it, w.view(src.numel() // row, row), start // row)
        self._finished(it, src.numel())
        if out.dtype == torch.float32:
            out.copy_(w)
        else:
            cast_into(it.key, w, out, self.ctx)
