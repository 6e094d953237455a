"""The lazy tensor source interface shared by every input format.

A source knows every tensor's name, dtype, shape and stored size from headers alone, and loads
one tensor when asked. Nothing else is read. Formats: ``safetensors_file``, ``diffusers_folder``,
``gguf_file``, ``torch_file``; :func:`convkit.sources.open_source` picks one by looking at the path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch


@dataclass(frozen=True)
class TensorInfo:
    """What a source knows about one tensor without loading it.

    ``dtype`` is the safetensors dtype name of what :meth:`TensorSource.load` returns;
    ``storage`` is how the tensor is stored (the same, or e.g. ``Q4_K`` for a GGUF block type);
    ``nbytes`` is the stored size.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    storage: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_as(self) -> str:
        return self.storage or self.dtype


@dataclass
class TensorSource:
    """Base class: subclasses fill ``_infos`` (ordered) and implement ``_load``."""

    path: Path
    format: str = "?"
    metadata: dict[str, str] = field(default_factory=dict)
    _infos: dict[str, TensorInfo] = field(default_factory=dict, repr=False)

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def infos(self) -> Iterator[TensorInfo]:
        return iter(self._infos.values())

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor (and only that one) from disk."""
        if name not in self._infos:
            raise KeyError(name)
        return self._load(name)

    def _load(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    #: True where :meth:`read_range` works (raw bytes as stored, for chunked streaming)
    supports_ranges = False

    def read_range(self, name: str, start: int, out: torch.Tensor) -> None:
        """Fill ``out`` (1-D uint8) with the stored bytes of ``name`` from byte ``start``."""
        raise NotImplementedError

    # -- the logical-read API the engine uses (WeightsView implements it fully; other
    #    sources are read whole, tensor by tensor) ------------------------------------------
    def chunkable(self, name: str) -> bool:
        return False

    def granule(self, name: str) -> int:
        return 0

    def is_direct(self, name: str) -> bool:
        return False

    def read_logical(self, name: str, start: int, count: int, out: torch.Tensor,
                     scratch: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} reads whole tensors only")

    def stored_span(self, name: str, start: int, count: int) -> int:
        return 0

    def files(self) -> list[Path]:
        """Every file this source reads (to refuse writing over one of them)."""
        return [self.path]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
