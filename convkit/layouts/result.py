"""What split/assemble return: the plan, and the run's numbers unless it was a dry run."""
from __future__ import annotations

from dataclasses import dataclass

from ..engine import Plan, RunStats


@dataclass
class LayoutResult:
    plan: Plan
    stats: RunStats | None = None

    def to_dict(self) -> dict:
        d = {"command": self.plan.command, "output": str(self.plan.out),
             "inputs": [str(s.path) for s in self.plan.inputs],
             "files": [str(f.path) for f in self.plan.files.values()],
             "tensors": len(self.plan.items), "in_bytes": self.plan.in_bytes,
             "out_bytes": self.plan.out_bytes, "notes": self.plan.notes,
             "dry_run": self.stats is None}
        if self.stats:
            d["seconds"] = round(self.stats.seconds, 3)
            d["bytes_written"] = self.stats.bytes_written
        return d
