"""LoRA name data shipped in formats/lora/*.toml (package ``convkit.formats``).

``FORMATS`` (the output formats of convert-lora / extract-lora) is read from
formats/lora/writers.toml like everything else here: every table there with a ``names`` table
is a format.
"""
from __future__ import annotations

import functools
import os

from .. import data


@functools.cache
def _cached(name: str, root: str) -> dict:
    return data.load_toml(f"lora/{name}.toml")


def _load(name: str) -> dict:
    # keyed by the override folder: finding the installed formats/ folder costs ~0.1 ms a call
    # and the module table asks for keys.toml thousands of times while it is built
    return _cached(name, os.environ.get("CONVKIT_FORMATS_DIR", ""))


def keys_data() -> dict:
    """Adapter suffixes, component prefixes, rewrites (formats/lora/keys.toml)."""
    return _load("keys")


def writers_data() -> dict:
    """Output formats (formats/lora/writers.toml)."""
    return _load("writers")


def lora_formats() -> tuple[str, ...]:
    """The output format names, in writers.toml order (kohya, comfy, peft)."""
    return tuple(k for k, v in writers_data().items() if isinstance(v, dict) and "names" in v)


@functools.cache
def suffixes() -> list[tuple[str, dict]]:
    """(suffix, {algo, role}) longest first."""
    return sorted(keys_data()["suffix"].items(), key=lambda kv: -len(kv[0]))


@functools.cache
def prefixes() -> list[tuple[str, dict]]:
    return sorted(keys_data()["prefix"].items(), key=lambda kv: -len(kv[0]))


def __getattr__(name: str):
    if name == "FORMATS":            # data, not a Python tuple: formats/lora/writers.toml
        return lora_formats()
    raise AttributeError(name)
