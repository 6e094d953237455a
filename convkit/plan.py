"""Plan, then stream.

Every command first builds a :class:`Plan`: per tensor its source key, output key, dtype before
and after, shape, bytes and output file. ``--dry-run`` prints the plan; :func:`execute` then
reads, transforms and writes one tensor at a time through :class:`~convkit.writer.SafetensorsWriter`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__, dtypes
from .errors import ConvkitError, Interrupted
from .progress import Progress
from .sources.base import TensorSource
from .chunked import stream_items, stream_items_parallel
from .errors import raise_all
from .writer import FolderStage, OutSpec, SafetensorsWriter, check_output


@dataclass
class PlanItem:
    key: str                  # key in the source
    out_key: str              # key in the output file
    shape: tuple[int, ...]
    src_dtype: str
    dtype: str                # output dtype
    component: str | None = None
    out_file: str = ""        # path relative to the output folder ("" = the output file itself)
    src_bytes: int = 0
    action: str = "copy"

    @property
    def out_bytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


@dataclass
class Plan:
    source: TensorSource
    out: Path
    items: list[PlanItem]
    folder: bool = False
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # out_file -> metadata
    copies: list[str] = field(default_factory=list)   # folder: files copied as they are
    extra_files: dict[str, bytes] = field(default_factory=dict)  # folder: files written anew
    notes: list[str] = field(default_factory=list)

    @property
    def out_bytes(self) -> int:
        return sum(i.out_bytes for i in self.items) + sum(len(b) for b in self.extra_files.values())

    @property
    def in_bytes(self) -> int:
        return sum(i.src_bytes for i in self.items)

    def files(self) -> list[str]:
        seen: dict[str, None] = {}
        for it in self.items:
            seen.setdefault(it.out_file, None)
        return list(seen)

    def check(self, overwrite: bool) -> None:
        """All reasons the output cannot be written, raised together before any work."""
        raise_all(check_output(self.out, self.source.files() + [self.source.path], overwrite,
                               self.out_bytes, is_dir=self.folder))

    def to_dict(self) -> dict:
        return {
            "source": str(self.source.path), "output": str(self.out), "folder": self.folder,
            "tensors": len(self.items), "in_bytes": self.in_bytes, "out_bytes": self.out_bytes,
            "notes": self.notes,
            "items": [{"key": i.key, "out_key": i.out_key, "file": i.out_file,
                       "shape": list(i.shape), "from": i.src_dtype, "to": i.dtype,
                       "action": i.action, "bytes": i.out_bytes} for i in self.items],
        }

    def format(self, limit: int | None = None) -> str:
        rows = self.items if limit is None else self.items[:limit]
        w = max((len(i.out_key) for i in rows), default=10)
        lines = [f"plan: {self.source.path} -> {self.out}" + (" (folder)" if self.folder else "")]
        for i in rows:
            where = f"{i.out_file}:" if i.out_file else ""
            lines.append(f"  {where}{i.out_key:<{w}}  {i.src_dtype:>5} -> {i.dtype:<5} "
                         f"{str(list(i.shape)):<22} {i.out_bytes:>13,d} B  {i.action}")
        if limit is not None and len(self.items) > limit:
            lines.append(f"  ... {len(self.items) - limit} more tensors")
        lines.append(f"total: {len(self.items)} tensors, {self.in_bytes:,d} B read -> "
                     f"{self.out_bytes:,d} B written")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def provenance(source: TensorSource, step: dict, previous: dict[str, str] | None = None) -> dict:
    """convkit metadata for an output: version, source name and size, steps applied so far."""
    prev = previous or {}
    try:
        steps = json.loads(prev.get("convkit.steps", "[]"))
        if not isinstance(steps, list):
            steps = []
    except json.JSONDecodeError:
        steps = []
    steps.append({**step, "convkit": __version__})
    size = sum(f.stat().st_size for f in source.files() if f.exists())
    return {"convkit.version": __version__, "convkit.source": source.path.name,
            "convkit.source_bytes": str(size), "convkit.steps": json.dumps(steps)}


Transform = Callable[[PlanItem, torch.Tensor], torch.Tensor]


@dataclass
class RunStats:
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    tensors: int = 0


def execute(plan: Plan, transform: Transform, *, overwrite: bool = False,
            progress: Progress | None = None, chunk_fn=None, **chunk_opts) -> RunStats:
    """Stream the plan: load, transform and write one tensor at a time, atomically.

    ``chunk_fn(item, src, out)``, when given, is the same transform as an elementwise kernel
    writing into ``out``; if the source can read byte ranges, the plan is then streamed in
    fixed-size chunks through reusable buffers (:mod:`convkit.chunked`; ``chunk_opts`` are
    its per-item options ``elems_of``/``force``/``prepare``, with ``transform`` for whole-tensor
    items; ``parallel=True`` uses one worker thread per core instead of a reader/writer pipeline).
    """
    progress = progress or Progress(enabled=False)
    stats = RunStats()
    t0 = time.perf_counter()
    try:
        with progress.bar(total=plan.in_bytes, desc=plan.out.name) as bar:
            chunked = chunk_fn if chunk_fn and plan.source.supports_ranges and all(
                math.prod(i.shape) * dtypes.itemsize(i.src_dtype) == i.src_bytes
                for i in plan.items) else None
            if plan.folder:
                with FolderStage(plan.out, overwrite=overwrite) as stage:
                    _write_folder(plan, stage, transform, bar, stats, chunked, chunk_opts)
            else:
                _write_file(plan, plan.out, "", transform, bar, stats, chunked, chunk_opts)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; no output was written", path=plan.out) from None
    stats.seconds = time.perf_counter() - t0
    return stats


def prefetched(source: TensorSource, items: list[PlanItem]):
    """Yield (item, tensor), reading the next tensor in a helper thread meanwhile.

    Reading tensor n+1 overlaps transforming tensor n (and the writer thread writing n-1);
    at most one tensor is read ahead, so memory stays at a few tensors.
    """
    from concurrent.futures import ThreadPoolExecutor

    if not items:
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convkit-reader")
    try:
        nxt = pool.submit(source.load, items[0].key)
        for i, it in enumerate(items):
            t = nxt.result()
            nxt = pool.submit(source.load, items[i + 1].key) if i + 1 < len(items) else None
            yield it, t
            del t
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_file(plan: Plan, path: Path, rel: str, transform: Transform, bar, stats,
                chunk_fn=None, chunk_opts=None) -> None:
    items = [i for i in plan.items if i.out_file == rel]
    specs = [OutSpec(i.out_key, i.dtype, i.shape) for i in items]
    with SafetensorsWriter(path, specs, plan.metadata.get(rel)) as w:
        if chunk_fn is not None:
            opts = {"transform": transform, **chunk_opts} if chunk_opts else {}
            engine = stream_items_parallel if opts.pop("parallel", False) else stream_items
            engine(items, plan.source, w, chunk_fn, on_progress=bar.update, **opts)
            stats.tensors += len(items)
            stats.bytes_read += sum(i.src_bytes for i in items)
            items = []
        for it, t in prefetched(plan.source, items):
            out = transform(it, t)
            del t
            w.write(it.out_key, out)
            del out
            stats.tensors += 1
            stats.bytes_read += it.src_bytes
            bar.update(it.src_bytes)
    stats.bytes_written += path.stat().st_size


def _write_folder(plan: Plan, stage: Path, transform: Transform, bar, stats,
                  chunk_fn=None, chunk_opts=None) -> None:
    src_root = plan.source.path
    for rel in plan.copies:
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_root / rel, dst)
    for rel, data in plan.extra_files.items():
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
    for rel in plan.files():
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        _write_file(plan, dst, rel, transform, bar, stats, chunk_fn, chunk_opts)


def same_path(a: os.PathLike, b: os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


__all__ = ["Plan", "PlanItem", "execute", "provenance", "RunStats", "ConvkitError"]
