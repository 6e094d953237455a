"""Open any input: the stored form (:func:`open_raw`) or its logical weights (:func:`open_source`)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputFormatError, UsageError
from .base import TensorSource
from .diffusers_folder import DiffusersFolder, is_diffusers_folder
from .files import open_file
from .view import WeightsView


def open_raw(path: str | os.PathLike, variant: str | None = None) -> TensorSource:
    """A safetensors/GGUF/PyTorch file or a diffusers folder as stored (headers only)."""
    p = Path(path)
    if not p.exists():
        raise UsageError("no such file or folder", path=p, hint="check the path")
    if p.is_dir():
        if is_diffusers_folder(p):
            return DiffusersFolder(p, variant=variant)
        raise InputFormatError("folder is not a diffusers model (no model_index.json, or "
                               "config.json with weights)", path=p)
    return open_file(p)


def open_source(path: str | os.PathLike, variant: str | None = None) -> WeightsView:
    """Any input as logical weights: quantized encodings decoded, auxiliaries consumed."""
    raw = open_raw(path, variant)
    try:
        return WeightsView(raw)
    except BaseException:
        raw.close()
        raise
