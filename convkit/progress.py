"""Progress display: a tqdm bar on stderr, off for --quiet/--json or when asked."""
from __future__ import annotations

import contextlib
import sys


class _Null:
    def update(self, n: int = 1) -> None:
        pass


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @contextlib.contextmanager
    def bar(self, total: int, desc: str = "", unit: str = "B"):
        if not self.enabled:
            yield _Null()
            return
        from tqdm import tqdm

        scaled = unit == "B"
        with tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, unit_divisor=1024,
                  file=sys.stderr, leave=False, dynamic_ncols=True) as t:
            yield t
