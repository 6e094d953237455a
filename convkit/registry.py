"""One registry of converters, reached the same way by the CLI, recipes and tests.

A converter is a small function registered under a kind and a name::

    @register("cast", "fp16")
    def to_fp16(tensor, ctx): ...

``get("cast", "fp61")`` fails with the nearest known name suggested.
"""
from __future__ import annotations

from typing import Callable

from .errors import UnknownNameError

_REGISTRY: dict[str, dict[str, Callable]] = {}


def register(kind: str, name: str, *aliases: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        table = _REGISTRY.setdefault(kind, {})
        for n in (name, *aliases):
            if n in table and table[n] is not fn:
                raise ValueError(f"{kind} converter '{n}' registered twice")
            table[n] = fn
        fn.converter_name = name
        return fn
    return deco


def get(kind: str, name: str) -> Callable:
    _load_builtin()
    table = _REGISTRY.get(kind, {})
    if name not in table:
        raise UnknownNameError(f"{kind} target", name, table)
    return table[name]


def names(kind: str) -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY.get(kind, {}))


def _load_builtin() -> None:
    # Importing the converter modules registers them.
    from . import casts  # noqa: F401
