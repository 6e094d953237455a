"""GGUF files through gguf-py's reader; quantized tensors are dequantized when loaded.

Logical shapes follow numpy order (GGUF stores dims innermost-first). ComfyUI-GGUF's
``comfy.gguf.orig_shape.<name>`` metadata restores shapes that were rearranged into rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputFormatError
from .base import TensorInfo, TensorSource

ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
_PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
          "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}


def _field_value(field):
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        return [field.parts[i].tolist()[0] if field.parts[i].size == 1 else
                bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
    part = field.parts[field.data[0]]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", "replace")
    return part.tolist()[0]


class GGUFFile(TensorSource):
    def __init__(self, path):
        import gguf

        path = Path(path)
        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # gguf-py raises ValueError/IndexError/struct.error on damage
            raise InputFormatError(f"cannot read GGUF ({e.__class__.__name__}: {str(e)[:160]})",
                                   path=path, hint="the file is damaged or not GGUF") from None
        super().__init__(path=path, format="gguf")
        self._reader = reader
        self._tensors = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                value = _field_value(field)
            except Exception:
                continue
            self.metadata[name] = value if isinstance(value, str) else repr(value)
            if name.startswith(ORIG_SHAPE_PREFIX) and isinstance(value, list):
                pass
        for t in reader.tensors:
            qname = t.tensor_type.name
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            orig = reader.fields.get(ORIG_SHAPE_PREFIX + t.name)
            if orig is not None:
                shape = tuple(int(field_part[0]) for field_part in
                              (orig.parts[i] for i in orig.data))
            dt = _PLAIN.get(qname, "F32")
            self._infos[t.name] = TensorInfo(t.name, dt, shape, int(t.n_bytes),
                                             storage=qname)
            self._tensors[t.name] = t

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def _load(self, name: str) -> torch.Tensor:
        import gguf

        t = self._tensors[name]
        info = self._infos[name]
        if info.storage in _PLAIN:
            arr = np.array(t.data, copy=True)
            if info.storage == "BF16":
                return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).reshape(info.shape)
            return torch.from_numpy(arr).reshape(info.shape)
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(info.shape)

    def close(self) -> None:
        self._tensors = {}
        self._reader = None
