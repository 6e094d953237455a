"""What ``convkit quantize`` returns: the plan, run statistics and the error reports."""
from __future__ import annotations

from dataclasses import dataclass

from ..engine import RunStats
from .plan import QuantizePlan
from .report import ErrorReport


@dataclass
class QuantizeResult:
    plan: QuantizePlan
    stats: RunStats | None = None
    report: ErrorReport | None = None
    extras: list[str] | None = None
    extras_reports: dict | None = None      # {path: ErrorReport} of GGUF extras

    def to_dict(self) -> dict:
        d = {"output": str(self.plan.out), "target": self.plan.target.name,
             "format": self.plan.fmt, "architecture": self.plan.detection.arch.name,
             "tensors": len(self.plan.main_items()), "types": self.plan.counts(),
             "in_bytes": self.plan.in_bytes, "out_bytes": self.plan.out_bytes,
             "fallbacks": [{"name": i.name, "wanted": i.wanted, "used": i.qtype}
                           for i in self.plan.fallbacks],
             "notes": self.plan.notes, "dry_run": self.stats is None}
        if self.stats:
            d.update({"seconds": round(self.stats.seconds, 3),
                      "bytes_written": self.stats.bytes_written,
                      "verified_tensors": self.stats.verified,
                      "verify_seconds": round(self.stats.verify_seconds, 3)})
        if self.report:
            d["error"] = self.report.summary(10)
        if self.extras:
            d["extras"] = self.extras
        if self.extras_reports:
            d["extras_error"] = {p: r.summary(3) for p, r in self.extras_reports.items()}
        return d
