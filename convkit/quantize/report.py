"""Quantization error per tensor: relative RMSE of the dequantized output against the source.

``rel_rmse = sqrt(mean((deq - src)^2)) / sqrt(mean(src^2))`` (absolute RMSE for an all-zero
source). The summary (count, numel-weighted mean, worst tensors) goes into ``--report``, the CLI
output and the output file's own metadata (``convkit.quant_report``).
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field

import torch

REPORT_KEY = "convkit.quant_report"
REPORT_WIDTH = 2048


@dataclass
class TensorError:
    name: str
    qtype: str
    numel: int
    rel_rmse: float
    max_abs: float


def measure(name: str, qtype: str, src: torch.Tensor, deq: torch.Tensor) -> TensorError:
    s = src.float().reshape(-1)
    d = deq.float().reshape(-1)
    diff = d - s
    mse = float(torch.mean(diff * diff)) if s.numel() else 0.0
    ms = float(torch.mean(s * s)) if s.numel() else 0.0
    rel = math.sqrt(mse) / math.sqrt(ms) if ms > 0 else math.sqrt(mse)
    mx = float(diff.abs().max()) if s.numel() else 0.0
    return TensorError(name, qtype, s.numel(), rel, mx)


@dataclass
class ErrorReport:
    """Errors of the quantized tensors. Tensors may be added from several threads in any
    order; they are kept in plan order (``order``), so every summary is the same however the
    work was scheduled."""

    target: str
    clamped: dict[str, int] = field(default_factory=dict)
    _entries: list[tuple[int, int, TensorError]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, e: TensorError, order: int | None = None) -> None:
        with self._lock:
            n = len(self._entries)
            self._entries.append((n if order is None else order, n, e))

    def add_clamped(self, name: str, count: int) -> None:
        with self._lock:
            self.clamped[name] = self.clamped.get(name, 0) + count

    @property
    def tensors(self) -> list[TensorError]:
        with self._lock:
            return [e for _, _, e in sorted(self._entries, key=lambda x: x[:2])]

    def worst(self, n: int = 10) -> list[TensorError]:
        return sorted(self.tensors, key=lambda e: -e.rel_rmse)[:n]

    def by_type(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for e in self.tensors:
            d = out.setdefault(e.qtype, {"tensors": 0, "values": 0, "_sq": 0.0, "max_rel_rmse": 0.0})
            d["tensors"] += 1
            d["values"] += e.numel
            d["_sq"] += e.rel_rmse ** 2 * e.numel
            d["max_rel_rmse"] = max(d["max_rel_rmse"], e.rel_rmse)
        for d in out.values():
            d["rel_rmse"] = math.sqrt(d.pop("_sq") / d["values"]) if d["values"] else 0.0
        return out

    def summary(self, worst: int = 5) -> dict:
        n = sum(e.numel for e in self.tensors)
        mean = math.sqrt(sum(e.rel_rmse ** 2 * e.numel for e in self.tensors) / n) if n else 0.0
        return {"target": self.target, "quantized_tensors": len(self.tensors),
                "rel_rmse": round(mean, 6),
                "max_rel_rmse": round(max((e.rel_rmse for e in self.tensors), default=0.0), 6),
                "by_type": {k: {"tensors": v["tensors"], "rel_rmse": round(v["rel_rmse"], 6),
                                "max_rel_rmse": round(v["max_rel_rmse"], 6)}
                            for k, v in self.by_type().items()},
                "worst": [[e.name, e.qtype, round(e.rel_rmse, 6)] for e in self.worst(worst)],
                "clamped_values": sum(self.clamped.values())}

    def summary_text(self, width: int = REPORT_WIDTH) -> str:
        """The summary as JSON no longer than ``width`` bytes (fewer worst tensors if needed)."""
        for k in (5, 3, 1, 0):
            s = self.summary(k)
            text = json.dumps(s, separators=(",", ":"))
            if len(text) <= width:
                return text
            s["by_type"] = {}
            text = json.dumps(s, separators=(",", ":"))
            if len(text) <= width:
                return text
        return json.dumps({"rel_rmse": self.summary(0)["rel_rmse"]})

    def to_dict(self) -> dict:
        d = self.summary(20)
        d["tensors"] = [{"name": e.name, "type": e.qtype, "numel": e.numel,
                         "rel_rmse": e.rel_rmse, "max_abs_err": e.max_abs} for e in self.tensors]
        d["clamped"] = self.clamped
        return d

    def format(self, worst: int = 10) -> str:
        s = self.summary(worst)
        lines = [f"quantization error ({self.target}): {s['quantized_tensors']} tensors, "
                 f"relative RMSE {s['rel_rmse']:.4g} overall, worst {s['max_rel_rmse']:.4g}"]
        for t, v in sorted(s["by_type"].items()):
            lines.append(f"  {t:<8} {v['tensors']:>5} tensors  rel RMSE {v['rel_rmse']:.4g} "
                         f"(worst {v['max_rel_rmse']:.4g})")
        if s["worst"]:
            lines.append("  worst tensors:")
            for name, qt, r in s["worst"]:
                lines.append(f"    {r:.4g}  {qt:<8} {name}")
        if self.clamped:
            lines.append(f"  {sum(self.clamped.values())} values in {len(self.clamped)} tensors "
                         "were clamped to the fp8 range")
        return "\n".join(lines)
