"""The plan: per output tensor, where its values come from, what is done to them, how they are
encoded, and which file they go to. Every command builds one; ``--dry-run`` prints it and
:func:`convkit.engine.executor` runs it.

* :class:`Item` - one unit of work: source tensors (logical names in the plan's inputs), the
  :class:`~convkit.engine.ops.Op` that produces bytes from them, and the output tensors it fills.
* :class:`OutFile` - one output file (safetensors or GGUF sink), with its metadata.
* :class:`OutFolder` - a folder output (a diffusers model): its files are staged in a temp
  folder and renamed into place as a whole, with non-weight files written or copied beside.

A plan may read several inputs and write several files (``--extras``, split/assemble).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import dtypes
from ..errors import raise_all
from ..sources.base import TensorSource


@dataclass(frozen=True)
class Src:
    """A logical tensor of one of the plan's inputs."""

    input: int
    key: str


@dataclass
class Out:
    """One output tensor: name, stored dtype (safetensors dtype, or GGML type in a GGUF file),
    stored shape, and the id of the file it goes to."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: str = ""

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    if dtypes.is_known(dtype):
        return n * dtypes.itemsize(dtype)
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    return n // bs * ts


def shards(things: list, size, max_bytes: int) -> list[list]:
    """``things`` cut, in order, into runs of at most ``max_bytes`` (``size(thing)``; a thing
    larger than that is a run of its own), as save_pretrained shards a model."""
    out: list[list] = [[]]
    total = 0
    for t in things:
        n = size(t)
        if out[-1] and total + n > max_bytes:
            out.append([])
            total = 0
        out[-1].append(t)
        total += n
    return out


def shard_name(stem: str, i: int, n: int) -> str:
    """diffusers/transformers shard file names: ``stem-00001-of-00003.safetensors``."""
    return f"{stem}.safetensors" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.safetensors"


@dataclass
class Item:
    """One unit of work (see the module docstring)."""

    op: object                          # convkit.engine.ops.Op
    srcs: tuple[Src, ...]
    outs: list[Out]
    shape: tuple[int, ...]              # logical shape of the value the op receives
    src_dtype: str = "-"                # logical dtype of the sources
    storage: str = ""                   # how the (first) source is stored, when not plain
    src_bytes: int = 0                  # stored bytes read
    component: str | None = None
    reason: str = ""                    # why this treatment (kept high, fallback, ...)
    wanted: str | None = None           # quantize: the type asked for before a fallback
    qtype: str = ""                     # quantize: the type of the main output ("nf4", "Q4_K")
    extra: dict = field(default_factory=dict)   # op-specific plan data

    @property
    def method(self) -> str:
        return self.op.name

    @property
    def name(self) -> str:
        return self.outs[0].key if self.outs else (self.srcs[0].key if self.srcs else "?")

    @property
    def key(self) -> str | None:
        return self.srcs[0].key if self.srcs else None

    @property
    def dtype(self) -> str:
        """The main output's dtype (or GGML type)."""
        return self.outs[0].dtype if self.outs else "-"

    @property
    def out_bytes(self) -> int:
        # an item filling part of a shared output (a fused tensor) counts its rows only
        if "out_bytes" in self.extra:
            return self.extra["out_bytes"]
        return sum(o.nbytes for o in self.outs)

    @property
    def action(self) -> str:
        return self.op.describe(self)


@dataclass
class OutFile:
    """One output file. ``id`` is how items name it; ``path`` is its final location (inside
    ``folder``'s final path when it belongs to a folder output)."""

    id: str
    path: Path
    sink: str = "safetensors"          # registered sink: safetensors | gguf
    metadata: dict[str, str] = field(default_factory=dict)
    kvs: list[tuple] = field(default_factory=list)       # GGUF typed key/values (first)
    reserve: str | None = None         # metadata key filled in after the data (error report)
    folder: str | None = None          # id of the OutFolder it belongs to
    fill: object = None                # width -> text of the reserved value, called at the end


@dataclass
class OutFolder:
    id: str
    path: Path
    extra_files: dict[str, bytes] = field(default_factory=dict)    # rel -> bytes written anew
    copies: dict[str, Path] = field(default_factory=dict)           # rel -> file copied as is
    #: called with the staged folder after every file of the plan is committed into it, before
    #: the folder is renamed into place; returns more files to write (rel -> bytes), e.g. a
    #: manifest with the sha256 of the written files
    late_files: list = field(default_factory=list)


@dataclass
class Plan:
    command: str
    inputs: list[TensorSource]
    items: list[Item] = field(default_factory=list)
    files: dict[str, OutFile] = field(default_factory=dict)
    folders: dict[str, OutFolder] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verify: bool = False                # reopen outputs and compare with what was written

    # -- shape of the output ------------------------------------------------------------------
    @property
    def source(self) -> TensorSource:
        return self.inputs[0]

    label: Path | None = None           # what progress and messages call a plan without outputs

    @property
    def out(self) -> Path:
        """The main output: the first folder, else the first file (else ``label``)."""
        if self.folders:
            return next(iter(self.folders.values())).path
        if self.files:
            return next(iter(self.files.values())).path
        return self.label or Path(self.command)

    @property
    def folder(self) -> bool:
        return bool(self.folders)

    def add_file(self, f: OutFile) -> OutFile:
        self.files[f.id] = f
        return f

    def outs_of(self, file_id: str) -> list[Out]:
        """The file's output tensors in plan order; an output several items fill (the parts of
        a fused tensor) is listed once."""
        seen: set[int] = set()
        out = []
        for it in self.items:
            for o in it.outs:
                if o.file == file_id and id(o) not in seen:
                    seen.add(id(o))
                    out.append(o)
        return out

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def in_bytes(self) -> int:
        return sum(i.src_bytes for i in self.items)

    @property
    def out_bytes(self) -> int:
        return (sum(i.out_bytes for i in self.items)
                + sum(len(b) for f in self.folders.values() for b in f.extra_files.values()))

    def targets(self) -> list[tuple[Path, bool, int]]:
        """(final path, is a folder, bytes) of every top-level output."""
        out = []
        for fo in self.folders.values():
            n = sum(o.nbytes for f in self.files.values() if f.folder == fo.id
                    for o in self.outs_of(f.id))
            out.append((fo.path, True, n + sum(len(b) for b in fo.extra_files.values())))
        for f in self.files.values():
            if f.folder is None:
                out.append((f.path, False, sum(o.nbytes for o in self.outs_of(f.id))))
        return out

    def check(self, overwrite: bool) -> None:
        """Every reason the outputs cannot be written, raised together before any work."""
        from ..writer import check_output

        inputs = [p for s in self.inputs for p in s.files() + [s.path]]
        problems = []
        seen = set()
        for path, is_dir, nbytes in self.targets():
            if path.resolve() in seen:
                from ..errors import UsageError
                problems.append(UsageError("two outputs of this command have the same path",
                                           path=path))
            seen.add(path.resolve())
            problems += check_output(path, inputs, overwrite, nbytes, is_dir=is_dir)
        raise_all(problems)

    # -- printing -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "command": self.command,
            "inputs": [str(s.path) for s in self.inputs],
            "outputs": [{"path": str(p), "folder": d, "bytes": n} for p, d, n in self.targets()],
            "output": str(self.out), "folder": self.folder,
            "tensors": len(self.items), "in_bytes": self.in_bytes, "out_bytes": self.out_bytes,
            "notes": self.notes,
            "items": [{"sources": [s.key for s in i.srcs], "key": i.key, "out_key": i.name,
                       "file": i.outs[0].file if i.outs else "",
                       "shape": list(i.shape), "from": i.src_dtype, "stored": i.storage or None,
                       "to": i.dtype, "action": i.action, "reason": i.reason or None,
                       "outputs": [{"key": o.key, "dtype": o.dtype, "shape": list(o.shape)}
                                   for o in i.outs], "bytes": i.out_bytes}
                      for i in self.items],
        }

    def format(self, limit: int | None = None) -> str:
        rows = self.items if limit is None else self.items[:limit]
        w = max((len(i.name) for i in rows), default=10)
        ins = ", ".join(str(s.path) for s in self.inputs)
        outs = ", ".join(str(p) + ("/" if d else "") for p, d, _ in self.targets())
        lines = [f"plan ({self.command}): {ins} -> {outs}"]
        many = len(self.files) > 1
        for i in rows:
            where = f"{i.outs[0].file}: " if many and i.outs and i.outs[0].file else ""
            src = i.storage or i.src_dtype
            extra = f" +{len(i.outs) - 1} tensors" if len(i.outs) > 1 else ""
            lines.append(f"  {where}{i.name:<{w}}  {src:>9} -> {i.dtype:<7} "
                         f"{str(list(i.shape)):<20} {i.out_bytes:>13,d} B  {i.action}{extra}"
                         + (f"  ({i.reason})" if i.reason else ""))
        if limit is not None and len(self.items) > limit:
            lines.append(f"  ... {len(self.items) - limit} more")
        lines.append(f"total: {len(self.items)} tensors, {self.in_bytes:,d} B read -> "
                     f"{self.out_bytes:,d} B written")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
