"""The one loader of convkit's knowledge files (``formats/``: TOML and JSON).

Architectures, key maps, quantization rules, LoRA names, storage metadata rules and configs
all live as data in ``formats/`` (installed as the package ``convkit.formats``). Every module
reads them through this loader, so ``CONVKIT_FORMATS_DIR`` (a folder with the same layout)
replaces them everywhere at once, e.g. to try a new architecture without reinstalling.
"""
from __future__ import annotations

import functools
import json
import os
import tomllib
from pathlib import Path


def formats_dir() -> Path:
    """formats/ as installed; ``CONVKIT_FORMATS_DIR`` overrides."""
    return _formats_dir(os.environ.get("CONVKIT_FORMATS_DIR") or "")


@functools.lru_cache(maxsize=None)
def _formats_dir(env: str) -> Path:
    if env:
        return Path(env)
    from importlib import resources

    return Path(str(resources.files("convkit.formats")))


def per_formats(fn):
    """``functools.cache`` for a function of formats/ data: one cache per formats folder, so a
    ``CONVKIT_FORMATS_DIR`` set later (a test, a tool trying a new architecture) is seen."""
    cached = functools.lru_cache(maxsize=None)(lambda root, *a, **k: fn(*a, **k))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return cached(str(formats_dir()), *args, **kwargs)

    wrapper.cache_clear = cached.cache_clear
    return wrapper


def path(rel: str) -> Path:
    return formats_dir() / rel


@functools.lru_cache(maxsize=None)
def _toml(root: str, rel: str) -> dict:
    with open(Path(root) / rel, "rb") as f:
        return tomllib.load(f)


@functools.lru_cache(maxsize=None)
def _json(root: str, rel: str) -> dict:
    with open(Path(root) / rel, encoding="utf-8") as f:
        return json.load(f)


def load_toml(rel: str) -> dict:
    """``formats/<rel>`` parsed (cached per formats folder)."""
    return _toml(str(formats_dir()), rel)


def load_json(rel: str) -> dict:
    return _json(str(formats_dir()), rel)


def list_files(subdir: str = "", suffix: str = ".toml") -> list[str]:
    """Relative names of the data files directly in ``formats/<subdir>``, sorted."""
    root = formats_dir() / subdir
    if not root.is_dir():
        return []
    return sorted((f"{subdir}/{p.name}" if subdir else p.name)
                  for p in root.iterdir() if p.is_file() and p.name.endswith(suffix))
