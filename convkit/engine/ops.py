"""Ops: what turns an item's source values into output bytes.

An op is a small object; the executor calls, from any worker thread:

* ``granule(item)`` - elements a chunk must be a multiple of, or 0 for whole tensors only;
* ``run(item, worker, start, count, xs)`` - ``xs`` are the sources' values (1-D ranges
  ``start:start+count``, or whole tensors when ``count`` is None); returns the writes
  ``[(Out, byte offset within that output tensor, uint8 data)]``; ``worker`` has reusable
  per-thread buffers for the output bytes;
* ``finish(item)`` - once, after the item's last chunk (error reports, counters);
* ``describe(item)`` - what the op does, for the plan.

Ops here are the generic ones (copy, cast, constant, key-map transforms); quantization targets,
LoRA merges and the rest define theirs next to their code.
"""
from __future__ import annotations

import math

import torch

from .. import dtypes
from ..casts import CastContext, cast_into
from .plan import Item, Out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class Op:
    name = "op"

    def granule(self, item: Item) -> int:
        return 1

    def run(self, item: Item, worker, start: int, count: int | None, xs: list) -> list:
        raise NotImplementedError

    def finish(self, item: Item) -> None:
        pass

    def describe(self, item: Item) -> str:
        return self.name

    @staticmethod
    def offset(out: Out, start: int) -> int:
        """Byte offset of element ``start`` in an element-wise output."""
        return start * dtypes.itemsize(out.dtype)


class Copy(Op):
    """The values as they are (bytes of the source's logical dtype)."""

    name = "copy"

    def run(self, item, worker, start, count, xs):
        o = item.outs[0]
        return [(o, self.offset(o, start) if count is not None else 0, as_bytes(xs[0]))]

    def describe(self, item):
        return "decode" if item.storage else "copy"


class Cast(Op):
    """Float cast to the output dtype (overflow to inf counted, and clamped or refused as the
    :class:`~convkit.casts.CastContext` says); non-float tensors are copied."""

    name = "cast"

    def __init__(self, ctx: CastContext):
        self.ctx = ctx

    def run(self, item, worker, start, count, xs):
        o = item.outs[0]
        x = xs[0]
        tdt = dtypes.to_torch(o.dtype)
        if x.dtype == tdt:
            return [(o, self.offset(o, start) if count is not None else 0, as_bytes(x))]
        n = x.numel()
        out = worker.tensor("out0", o.dtype, n)
        cast_into(item.name, x.reshape(-1), out, self.ctx)
        return [(o, self.offset(o, start) if count is not None else 0, out.view(torch.uint8))]

    def describe(self, item):
        verb = "decode+cast" if item.storage else "cast"
        return verb if item.src_dtype != item.dtype else ("decode" if item.storage else "copy")


class Const(Op):
    """An output with no source: a fixed tensor (markers, position_ids, JSON blobs)."""

    name = "const"

    def __init__(self, values: dict[str, torch.Tensor]):
        self.values = values        # out key -> tensor

    def granule(self, item):
        return 0

    def run(self, item, worker, start, count, xs):
        return [(o, 0, as_bytes(self.values[o.key])) for o in item.outs]


class Rows(Op):
    """Row ranges of one source tensor to row ranges of one or more outputs, cast on the way:
    a fused tensor split into its parts (OpenCLIP ``in_proj``, Flux ``qkv``/``linear1``), a part
    placed into a fused output that other items fill too, or halves swapped (Flux adaLN).
    Chunked: rows are contiguous along dim 0, so any element range of the source lands in
    contiguous byte ranges of its outputs.

    ``item.extra["rows"]``: ``[(src_row_start, src_row_stop, out index, out row start)]``;
    ``item.extra["row"]``: elements per row."""

    name = "rows"

    def __init__(self, ctx: CastContext, label: str = "rows"):
        self.ctx, self.label = ctx, label

    def run(self, item, worker, start, count, xs):
        x = xs[0].reshape(-1)
        start = start if count is not None else 0
        n = x.numel()
        row = item.extra["row"]
        tdt = dtypes.to_torch(item.outs[0].dtype)
        if x.dtype != tdt and x.is_floating_point():
            buf = worker.tensor("out0", item.outs[0].dtype, n)
            cast_into(item.name, x, buf, self.ctx)
            x = buf
        size = dtypes.itemsize(item.outs[0].dtype)
        writes = []
        for a, b, k, at in item.extra["rows"]:
            lo, hi = max(a * row, start), min(b * row, start + n)
            if lo >= hi:
                continue
            o = item.outs[k]
            off = (at * row + lo - a * row) * size
            writes.append((o, off, x[lo - start:hi - start].view(torch.uint8)))
        return writes

    def describe(self, item):
        verb = "decode+" if item.storage else ""
        cast = "cast+" if item.src_dtype != item.dtype else ""
        return f"{verb}{cast}{self.label}"


class Transform(Op):
    """Key-map transforms between layouts on whole tensors (transpose, 1x1 conv reshape, swap
    halves, concatenation of fused parts, rows of a fused tensor), then a cast."""

    name = "map"

    def __init__(self, fn, ctx: CastContext, label: str = "map"):
        self.fn, self.ctx, self.label = fn, ctx, label

    def granule(self, item):
        return 0

    def run(self, item, worker, start, count, xs):
        o = item.outs[0]
        t = self.fn(item, xs)
        if t.is_floating_point() and dtypes.from_torch(t.dtype) != o.dtype:
            out = torch.empty(t.shape, dtype=dtypes.to_torch(o.dtype))
            cast_into(item.name, t.contiguous(), out, self.ctx)
            t = out
        if tuple(t.shape) != tuple(o.shape) and math.prod(t.shape) == math.prod(o.shape):
            t = t.reshape(o.shape)
        return [(o, 0, as_bytes(t))]

    def describe(self, item):
        return self.label
