"""PyTorch pickles (.ckpt/.pt/.pth/.bin), loaded ONLY with ``torch.load(weights_only=True)``.

weights_only refuses to run code from the pickle; a file that needs it is refused with the reason.
The zip format is memory-mapped, so tensors are paged in as they are used.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .. import dtypes
from ..errors import InputFormatError, UnsafeFileError
from .base import TensorInfo, TensorSource


def _load_weights_only(path: Path):
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise UnsafeFileError(
            f"refused: loading needs to unpickle code, which can run arbitrary programs "
            f"({first[:160]})", path=path,
            hint="convkit loads .ckpt/.pt only with torch.load(weights_only=True); "
                 "get a .safetensors version of this model") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError) as e:
        raise InputFormatError(f"cannot read PyTorch file ({e.__class__.__name__}: "
                               f"{str(e)[:160]})", path=path,
                               hint="the file is damaged or not a PyTorch checkpoint") from None


def _flatten(obj, prefix: str, out: dict[str, torch.Tensor], skipped: list[str]) -> None:
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[key] = v
        else:
            skipped.append(key)


class TorchFile(TensorSource):
    def __init__(self, path):
        path = Path(path)
        obj = _load_weights_only(path)
        super().__init__(path=path, format="torch")
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise InputFormatError(f"holds a {type(obj).__name__}, not a state dict", path=path)
        tensors: dict[str, torch.Tensor] = {}
        self.skipped: list[str] = []
        _flatten(obj, "", tensors, self.skipped)
        self._tensors = tensors
        for k, t in tensors.items():
            dt = dtypes.from_torch(t.dtype)
            self._infos[k] = TensorInfo(k, dt, tuple(t.shape), t.numel() * t.element_size())

    def _load(self, name: str) -> torch.Tensor:
        return self._tensors[name].contiguous().clone()

    def close(self) -> None:
        self._tensors = {}
