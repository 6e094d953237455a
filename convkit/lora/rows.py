"""merge-lora on row chunks: the streaming fast path.

A plain LoRA delta ``up @ down`` decomposes by output rows: rows ``a:b`` of ΔW are
``up[a:b] @ down``. So a base tensor whose patches are all plain LoRAs (no DoRA, no Tucker core,
no transpose) is streamed like a dtype cast by the engine (:mod:`convkit.engine`): whole rows are
read into a worker's reusable buffer (decoded from any input encoding), the deltas are added in
place in fp32 (:mod:`convkit.lora.lowrank`), the chunk is cast into a reusable output buffer and
written at its place. No per-tensor allocation; the matmuls of one worker overlap the I/O of the
others. Every other patch (LoHa, LoKr, DoRA, full diffs,
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

from .. import dtypes
from ..casts import CastContext, cast_into
from ..engine.ops import Op, as_bytes
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


class MergeOp(Op):
    """The merge as an engine op. A base tensor no LoRA touches is cast (or copied); a patched
    one whose patches all decompose by rows is done in chunks of whole rows (deltas added in
    fp32 into the worker's scratch, then cast); any other patched tensor is done whole
    (:func:`convkit.lora.merge.apply_patch`). Per element the arithmetic is the same on both
    paths. Chunks of one tensor may run on several workers at once and in any order; the LoRA
    factors of a tensor are loaded once and dropped when the tensor is finished."""

    name = "merge"

    def __init__(self, table: ModuleTable, patches: dict, ctx: CastContext, src, apply_whole):
        self.table, self.patches, self.ctx, self.src = table, patches, ctx, src
        self.apply_whole = apply_whole          # merge.apply_patch (no import cycle)
        self.ops: dict[str, list[RowOp] | None] = {}
        self._lock = threading.Lock()
        self._factors: dict[str, dict[int, tuple]] = {}   # tensor -> patch id -> factors

    def _ops(self, it) -> list[RowOp] | None:
        if it.key not in self.ops:
            ops = row_ops(self.table, it.key, tuple(it.shape), self.patches[it.key])
            with self._lock:
                self.ops.setdefault(it.key, ops)
        return self.ops[it.key]

    def granule(self, it) -> int:
        if it.key not in self.patches:
            return 1
        if self._ops(it) is None:
            return 0
        return math.prod(it.shape[1:]) if len(it.shape) > 1 else 1

    def describe(self, it) -> str:
        if it.key in self.patches:
            return f"merge ({len(self.patches[it.key])} patch"\
                   f"{'es' if len(self.patches[it.key]) > 1 else ''})"
        if it.src_dtype == it.dtype:
            return "decode" if it.storage else "copy"
        return "decode+cast" if it.storage else "cast"

    def _load(self, key: str, op: RowOp) -> tuple:
        p = op.patch
        with self._lock:
            cache = self._factors.setdefault(key, {})
            got = cache.get(id(p))
            if got is None:
                lr = LowRank(p.lf.load(p.ad, "up"), p.lf.load(p.ad, "down"))
                got = cache[id(p)] = (lr, p.ad.scale(p.lf.source), p.strength)
        return got

    def finish(self, it) -> None:
        with self._lock:
            self._factors.pop(it.key, None)

    def _apply_rows(self, it, w2: torch.Tensor, r0: int) -> None:
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

    def _out(self, it, worker, w: torch.Tensor) -> torch.Tensor:
        o = it.outs[0]
        tdt = dtypes.to_torch(o.dtype)
        if w.dtype == tdt or not w.is_floating_point():
            return as_bytes(w)
        out = worker.tensor("out0", o.dtype, w.numel())
        cast_into(it.key, w.reshape(-1), out, self.ctx)
        return out.view(torch.uint8)

    def run(self, it, worker, start, count, xs):
        o = it.outs[0]
        x = xs[0]
        off = start * dtypes.itemsize(o.dtype) if count is not None else 0
        ps = self.patches.get(it.key)
        if not ps:
            return [(o, off, self._out(it, worker, x))]
        if count is None:           # whole tensor (the worker's own buffer: changed in place)
            t = x.float() if x.dtype != torch.float32 else x
            for p in ps:
                self.apply_whole(self.table, p, it.key, t, self.src)
            return [(o, 0, self._out(it, worker, t))]
        row = math.prod(it.shape[1:])
        w = worker.tensor("merge", "F32", x.numel())
        w.copy_(x.reshape(-1))
        self._apply_rows(it, w.view(-1, row), start // row)
        return [(o, off, self._out(it, worker, w))]
