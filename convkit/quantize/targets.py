"""Quantization targets, registered as kind ``quantize`` (unknown names get the nearest one).

``fp8-e4m3fn``, ``fp8-e5m2``, ``fp8-scaled``, ``nf4``, ``fp4``, ``gguf:<TYPE or MIX>``,
``quanto:int8|int4|fp8`` / ``torchao:int8wo`` (diffusers model folders; ``torchao:int4wo`` is
refused with the reason: no CPU kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import registry
from ..errors import UnknownNameError
from .rules import GGUF_PLAIN, gguf_mixes

FP8_DTYPES = {"e4m3fn": "F8_E4M3", "e5m2": "F8_E5M2"}


@dataclass(frozen=True)
class Target:
    name: str     # as the user typed it, normalised: "fp8-e4m3fn", "nf4", "gguf:Q4_K_M"
    kind: str     # "fp8" | "fp8-scaled" | "bnb4" | "gguf" | "quanto" | "torchao"
    qtype: str    # "F8_E4M3" / "F8_E5M2"; "nf4" / "fp4"; GGUF type or mix name

    @property
    def output_format(self) -> str:
        return "gguf" if self.kind == "gguf" else "safetensors"


def _make(name: str, kind: str, qtype: str):
    def factory() -> Target:
        return Target(name, kind, qtype)
    registry.register("quantize", name)(factory)


_make("fp8-e4m3fn", "fp8", "F8_E4M3")
_make("fp8-e5m2", "fp8", "F8_E5M2")
_make("fp8-scaled", "fp8-scaled", "F8_E4M3")
_make("nf4", "bnb4", "nf4")
_make("fp4", "bnb4", "fp4")
for _t in GGUF_PLAIN + tuple(gguf_mixes()):
    _make(f"gguf:{_t}", "gguf", _t)
for _t in ("quanto:int8", "quanto:int4", "quanto:fp8", "torchao:int8wo", "torchao:int4wo"):
    _make(_t, _t.split(":")[0], _t.split(":")[1])   # diffusers model folder (quantize/hf_libs.py)


def normalise(name: str) -> str:
    n = name.strip()
    low = n.lower()
    if low.startswith("gguf:"):
        return "gguf:" + n[5:].upper()
    if low in ("fp8", "float8", "fp8-e4m3"):
        return "fp8-e4m3fn"
    return low


def parse_target(name: str) -> Target:
    """``'gguf:q4_k_m'`` -> Target; unknown names fail with the nearest known one suggested."""
    n = normalise(name)
    try:
        return registry.get("quantize", n)()
    except UnknownNameError:
        raise UnknownNameError("quantize target", name, registry.names("quantize")) from None


def names() -> list[str]:
    return registry.names("quantize")
