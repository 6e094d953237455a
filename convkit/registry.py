"""The registry: every converter, target, format and sink, by kind and name.

The CLI, recipes and tests reach converters only through here; the CLI's choices and the
"did you mean" suggestions come from it. Kinds:

* ``cast`` - float dtype casts (:mod:`convkit.casts`): ``fp16``, ``bf16``, ``fp32``;
* ``quantize`` - quantization targets (:mod:`convkit.quantize.targets`): objects that plan their
  items and produce their bytes;
* ``lora-format`` - LoRA output formats (:mod:`convkit.lora.write`): ``kohya``, ``comfy``, ``peft``;
* ``sink`` - output file writers (:mod:`convkit.engine.sinks`): ``safetensors``, ``gguf``;
* ``layout-target`` - split targets (:mod:`convkit.layouts.targets`): ``comfyui``, ``forge``, ...;
* ``operation`` - what a recipe step can run (:mod:`convkit.recipes.ops`): ``convert``,
  ``quantize``, ``merge-lora``, ... with their option schemas.

Modules register what they provide when imported; the registry imports a kind's providers by
name the first time that kind is asked for (``PROVIDERS``), so it imports none of them
statically (no import cycles) and a library caller needs no set-up.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .errors import UnknownNameError

#: kind -> modules that register entries of that kind when imported
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cast": ("convkit.casts",),
    "quantize": ("convkit.quantize.targets",),
    "lora-format": ("convkit.lora.write",),
    "sink": ("convkit.engine.sinks",),
    "layout-target": ("convkit.layouts.targets",),
    "operation": ("convkit.recipes.ops",),
}

#: how a kind is called in messages ("unknown quantize target 'gguf:Q4K'")
KIND_NAMES = {"cast": "dtype", "quantize": "quantize target", "lora-format": "LoRA format",
              "sink": "output format", "layout-target": "split target (--for)",
              "operation": "operation"}


@dataclass
class Entry:
    kind: str
    name: str
    obj: Any
    aliases: tuple[str, ...] = ()
    help: str = ""
    options: dict[str, Any] = field(default_factory=dict)   # option name -> default


_REGISTRY: dict[str, dict[str, Entry]] = {}
_LOADED: set[str] = set()


def add(kind: str, name: str, obj: Any, *aliases: str, help: str = "",
        options: dict[str, Any] | None = None) -> Any:
    """Register ``obj`` under ``kind``/``name`` (and ``aliases``); returns ``obj``."""
    table = _REGISTRY.setdefault(kind, {})
    entry = Entry(kind, name, obj, tuple(aliases), help, dict(options or {}))
    for n in (name, *aliases):
        if n in table and table[n].obj is not obj:
            raise ValueError(f"{kind} '{n}' registered twice")
        table[n] = entry
    return obj


def register(kind: str, name: str, *aliases: str, help: str = "",
             options: dict[str, Any] | None = None):
    """Decorator form of :func:`add`."""
    def deco(obj):
        add(kind, name, obj, *aliases, help=help, options=options)
        return obj
    return deco


def _load(kind: str) -> None:
    if kind in _LOADED:
        return
    _LOADED.add(kind)
    for mod in PROVIDERS.get(kind, ()):
        importlib.import_module(mod)


def entry(kind: str, name: str) -> Entry:
    _load(kind)
    table = _REGISTRY.get(kind, {})
    if name not in table:
        raise UnknownNameError(KIND_NAMES.get(kind, kind), name, canonical(kind))
    return table[name]


def get(kind: str, name: str) -> Any:
    """The object registered as ``name``; unknown names fail with the nearest one suggested."""
    return entry(kind, name).obj


def names(kind: str, aliases: bool = True) -> list[str]:
    """Every name of ``kind`` (with aliases unless ``aliases=False``), sorted."""
    _load(kind)
    table = _REGISTRY.get(kind, {})
    return sorted(table if aliases else {e.name for e in table.values()})


def canonical(kind: str) -> list[str]:
    return names(kind, aliases=False)


def entries(kind: str) -> list[Entry]:
    _load(kind)
    seen: dict[str, Entry] = {}
    for e in _REGISTRY.get(kind, {}).values():
        seen.setdefault(e.name, e)
    return [seen[n] for n in sorted(seen)]
