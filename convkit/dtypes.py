"""Dtype names as safetensors spells them, and their torch equivalents.

Users type short names (``fp16``, ``bf16``, ``fp8-e4m3fn``); files carry safetensors names
(``F16``, ``BF16``, ``F8_E4M3``). This module is the one place that maps between them.
"""
from __future__ import annotations

import torch

from .errors import UnknownNameError

# safetensors dtype string -> (torch dtype, bytes per element)
_ST: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "uint16"):
    _ST.update({"U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64})

_TORCH_TO_ST = {v: k for k, v in _ST.items()}

# user-facing names -> safetensors name
USER_NAMES = {
    "fp32": "F32", "float32": "F32", "f32": "F32",
    "fp16": "F16", "float16": "F16", "f16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "fp8-e4m3fn": "F8_E4M3", "fp8-e5m2": "F8_E5M2",
}

FLOAT_TYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def known() -> list[str]:
    return sorted(_ST)


def is_known(st_name: str) -> bool:
    return st_name in _ST


def to_torch(st_name: str) -> torch.dtype:
    try:
        return _ST[st_name]
    except KeyError:
        raise UnknownNameError("dtype", st_name, _ST) from None


def from_torch(dtype: torch.dtype) -> str:
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise UnknownNameError("dtype", str(dtype), _ST) from None


_ITEMSIZE: dict[str, int] = {}


def itemsize(st_name: str) -> int:
    n = _ITEMSIZE.get(st_name)
    if n is None:      # called per chunk on the hot path: build the answer once
        n = _ITEMSIZE[st_name] = torch.empty((), dtype=to_torch(st_name)).element_size()
    return n


def parse_user(name: str) -> str:
    """'fp16' -> 'F16'; accepts safetensors names too."""
    key = name.strip().lower()
    if key in USER_NAMES:
        return USER_NAMES[key]
    if name.upper() in _ST:
        return name.upper()
    raise UnknownNameError("dtype", name, USER_NAMES)


def is_float(st_name: str) -> bool:
    return st_name in FLOAT_TYPES


def finite_max(st_name: str) -> float:
    return float(torch.finfo(to_torch(st_name)).max)
