"""The quantize plan: an engine :class:`~convkit.engine.Plan` with the quantization facts.

A quantized weight becomes several tensors (NF4: packed weight + absmax + quant_map + packed
state; scaled fp8: weight + scale (+ comfy_quant); GGUF: one block-typed tensor), so each item
lists all of its outputs with dtype and shape known up front: the safetensors header and GGUF
tensor infos are written before any data, and ``--dry-run`` prints the same plan. Every output
file of the plan (the main one, ``--extras`` files) has its own error report.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gguf.constants import GGUFValueType

from .. import archs
from ..engine import Plan
from .report import ErrorReport

GGUF_QUANT_VERSION = 2
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
SCALED_FORMATS = ("scale_weight", "comfy_quant")
LAYOUTS = ("comfy", "sdcpp")


@dataclass
class QuantizePlan(Plan):
    target: object = None                          # convkit.quantize.targets.Target
    detection: archs.Detection | None = None
    layout: str = "comfy"
    options: dict = field(default_factory=dict)
    bundled: list[str] = field(default_factory=list)   # other components in the GGUF (sdcpp)
    reports: dict[str, ErrorReport] = field(default_factory=dict)   # file id -> report
    extras: list[str] = field(default_factory=list)    # file ids of --extras outputs

    @property
    def report(self) -> ErrorReport:
        return self.reports[""]

    @property
    def fmt(self) -> str:
        return self.target.output_format

    @property
    def extra_files(self) -> dict[str, bytes]:
        return {k: v for f in self.folders.values() for k, v in f.extra_files.items()}

    def main_items(self):
        return [i for i in self.items if not i.outs or i.outs[0].file not in self.extras]

    @property
    def fallbacks(self):
        return [i for i in self.main_items() if i.wanted]

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for i in self.main_items():
            c[i.qtype or i.dtype] = c.get(i.qtype or i.dtype, 0) + 1
        return c

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update({"target": self.target.name, "format": self.fmt,
                  "layout": self.layout if self.fmt == "gguf" else None, "types": self.counts(),
                  "fallbacks": [{"name": i.name, "wanted": i.wanted, "used": i.qtype,
                                 "reason": i.reason} for i in self.fallbacks]})
        return d

    def format(self, limit: int | None = None) -> str:
        head = (f"quantize to {self.target.name} ({self.fmt}"
                + (f", layout {self.layout}" if self.fmt == "gguf" else "") + "); types: "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items())))
        lines = [head, super().format(limit)]
        lines += [f"fallback: {i.name}: {i.wanted} -> {i.qtype} ({i.reason})"
                  for i in self.fallbacks]
        return "\n".join(lines)


def gguf_string_kvs(meta: dict[str, str], taken=()) -> list[tuple]:
    """Plain string metadata as GGUF key/values (after the typed ones in ``taken``)."""
    return [(k, GGUFValueType.STRING, str(v)) for k, v in meta.items() if k not in taken]
