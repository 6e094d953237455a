"""Public names-and-rows view of a component's key map: which diffusers tensors make up a
single-file tensor, and at which rows.

:func:`parts` answers for one single-file name; :class:`ComponentMap` answers many names of one
component without rebuilding the map (build it from the state-dict names, as tools that read a
checkpoint's header do).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

from ._engine import KeyMap, Target


class Part(NamedTuple):
    """One diffusers tensor inside a single-file tensor: rows ``start:stop`` along ``dim``.

    ``start``/``stop`` are None when the sizes cannot be known (no config, no total size).
    """

    name: str
    dim: int
    start: int | None
    stop: int | None


@dataclass(frozen=True)
class Split:
    """A single-file tensor, its keymap transform (diffusers -> single) and its parts."""

    single: str
    transform: str | None      # None | "transpose" | "conv1x1" | "swap_halves"
    parts: tuple[Part, ...]

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


def _sizes(target: Target, total: int | None, hidden: int | None,
           mlp_ratio: float | None = None) -> list[int] | None:
    n = len(target.parts)
    if n == 1:
        return None if total is None else [total]
    if target.sizes is None:        # equal parts (of the hidden size, as resolve() assumes)
        if total is None:
            return None if hidden is None else [hidden] * n
        return None if total % n else [total // n] * n
    if "h" in target.sizes and hidden is None:
        return None
    fixed = [hidden if s == "h" else (None if s == "*" else int(s)) for s in target.sizes]
    if total is None:   # "*" is the rest; without the total, the map's MLP ratio (data) says it
        rest = int(mlp_ratio * hidden) if hidden and mlp_ratio else None
    else:
        rest = total - sum(s for s in fixed if s is not None)
    out = [s if s is not None else rest for s in fixed]
    if None in out or (total is not None and sum(out) != total):
        return None
    return out


def _split(target: Target, total: int | None, hidden: int | None,
           mlp_ratio: float | None = None) -> Split:
    sizes = _sizes(target, total, hidden, mlp_ratio)
    parts, start = [], 0
    for i, name in enumerate(target.parts):
        if sizes is None:
            parts.append(Part(name, 0, None, None))
            continue
        parts.append(Part(name, 0, start, start + sizes[i]))
        start += sizes[i]
    return Split(target.single, target.transform, tuple(parts))


class ComponentMap:
    """The key map of one component kind, for many lookups.

    ``names`` (in the naming ``side``: "d" diffusers, "s" single file) and ``sd`` (tensors or
    anything with ``.shape``, e.g. meta tensors) stand in for a config when there is none.
    """

    def __init__(self, kind: str, config=None, *, names: Iterable[str] | None = None,
                 side: str = "d", sd: Mapping | None = None):
        from .maps import get_map

        self.kind = kind
        self._km: KeyMap = get_map(kind, config, names=names, side=side, sd=sd)
        self._ratio = getattr(self._km, "mlp_ratio", None)

    @property
    def hidden(self) -> int | None:
        return self._km.hidden

    def split(self, single_name: str, total: int | None = None) -> Split | None:
        """The parts of a single-file tensor; ``total`` = its size along dim 0 (resolves sizes)."""
        t = self._km.s2d(single_name)
        return None if t is None else _split(t, total, self._km.hidden, self._ratio)

    def locate(self, diffusers_name: str, total: int | None = None) -> tuple[Split, int] | None:
        """``(split of its single-file tensor, index of this part)`` of a diffusers name."""
        hit = self._km.d2s(diffusers_name)
        if hit is None:
            return None
        t, k = hit
        return _split(t, total, self._km.hidden, self._ratio), k


def parts(kind: str, single_name: str, config=None, *, total: int | None = None
          ) -> list[tuple[str, int, int | None, int | None]]:
    """``[(diffusers_name, dim, start, stop), ...]`` of one single-file tensor (one item when it is
    not fused). Sizes come from ``config`` (dict or architecture name) or ``total``.

    >>> parts("openclip", "transformer.resblocks.0.attn.in_proj_weight", "sdxl")[1]
    Part(name='text_model.encoder.layers.0.self_attn.k_proj.weight', dim=0, start=1280, stop=2560)
    """
    from .maps import KeyMapError

    sp = ComponentMap(kind, config).split(single_name, total)
    if sp is None:
        raise KeyMapError(f"no diffusers name for this {kind} name", key=single_name)
    return list(sp.parts)
