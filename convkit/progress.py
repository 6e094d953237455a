"""Progress display: a tqdm bar on stderr, off for --quiet/--json or when asked."""
from __future__ import annotations

import contextlib
import sys


class _Null:
    def update(self, n: int = 1) -> None:
        pass


class Progress:
    """``label`` prefixes every bar (a recipe's artifact name); ``position`` pins the bars to a
    terminal line (one per worker process of a recipe run)."""

    def __init__(self, enabled: bool = True, label: str = "", position: int | None = None):
        self.enabled, self.label, self.position = enabled, label, position

    @contextlib.contextmanager
    def bar(self, total: int, desc: str = "", unit: str = "B"):
        if not self.enabled:
            yield _Null()
            return
        from tqdm import tqdm

        scaled = unit == "B"
        if self.label:
            desc = f"{self.label}: {desc}" if desc else self.label
        with tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, unit_divisor=1024,
                  position=self.position, file=sys.stderr, leave=False,
                  dynamic_ncols=True) as t:
            yield t
