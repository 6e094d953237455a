"""Open any supported input as a lazy :class:`TensorSource`."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputFormatError, UsageError
from .base import TensorInfo, TensorSource

__all__ = ["TensorInfo", "TensorSource", "open_source", "open_file"]

TORCH_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


def open_file(path: Path) -> TensorSource:
    """Open one file by its content's magic, falling back on the suffix."""
    from .gguf_file import GGUFFile
    from .safetensors_file import SafetensorsFile
    from .torch_file import TorchFile

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFFile(path)
    if magic[:2] == b"PK" or path.suffix.lower() in TORCH_SUFFIXES:
        return TorchFile(path)
    return SafetensorsFile(path)


def open_source(path: str | os.PathLike, variant: str | None = None) -> TensorSource:
    """A safetensors/GGUF/PyTorch file or a diffusers folder, opened lazily (headers only)."""
    from .diffusers_folder import DiffusersFolder, is_diffusers_folder

    p = Path(path)
    if not p.exists():
        raise UsageError("no such file or folder", path=p, hint="check the path")
    if p.is_dir():
        if is_diffusers_folder(p):
            return DiffusersFolder(p, variant=variant)
        raise InputFormatError("folder is not a diffusers model (no model_index.json, or "
                               "config.json with weights)", path=p)
    return open_file(p)
