"""Sizes as people write them: 5GB, 500MB, 1.5TB (decimal units, as the Hub and save_pretrained)."""
from __future__ import annotations

from .errors import UsageError


def parse_size(text: str) -> int:
    t = text.strip().upper().replace("IB", "B")
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1}
    for u, m in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * m)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise UsageError(f"cannot read size '{text}' (e.g. 5GB, 500MB)") from None
