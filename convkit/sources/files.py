"""Open one stored file by its content: safetensors, GGUF or a (safe) PyTorch pickle."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputFormatError
from .base import TensorSource

TORCH_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


def check_regular(path: Path) -> None:
    """Refuse anything but a regular file before opening it: reading a FIFO, a socket or a
    character device would block forever or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise InputFormatError(f"cannot read ({e.strerror or e})", path=path) from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        raise InputFormatError(f"is {kind}, not a regular file", path=path,
                               hint="give the path of a checkpoint file")


def open_file(path: Path) -> TensorSource:
    """Open one file by its content's magic, falling back on the suffix (stored form)."""
    from .gguf_file import GGUFFile
    from .safetensors_file import SafetensorsFile
    from .torch_file import TorchFile

    path = Path(path)
    check_regular(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFFile(path)
    if magic[:2] == b"PK" or path.suffix.lower() in TORCH_SUFFIXES:
        return TorchFile(path)
    return SafetensorsFile(path)
