"""LoRA name data shipped in formats/lora/*.toml (package ``convkit.formats``)."""
from __future__ import annotations

import functools
import tomllib
from importlib import resources


@functools.cache
def _load(name: str) -> dict:
    return tomllib.loads((resources.files("convkit.formats") / "lora" / f"{name}.toml")
                        .read_text(encoding="utf-8"))


def keys_data() -> dict:
    """Adapter suffixes, component prefixes, rewrites (formats/lora/keys.toml)."""
    return _load("keys")


def writers_data() -> dict:
    """Output formats (formats/lora/writers.toml)."""
    return _load("writers")


@functools.cache
def suffixes() -> list[tuple[str, dict]]:
    """(suffix, {algo, role}) longest first."""
    return sorted(keys_data()["suffix"].items(), key=lambda kv: -len(kv[0]))


@functools.cache
def prefixes() -> list[tuple[str, dict]]:
    return sorted(keys_data()["prefix"].items(), key=lambda kv: -len(kv[0]))


FORMATS = ("kohya", "peft", "comfy")
