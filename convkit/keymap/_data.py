"""Loading the key-map data files (formats/keymaps/*.toml) and config JSON (formats/configs/)."""
from __future__ import annotations

import functools
import json
import os
import tomllib
from pathlib import Path


def formats_dir() -> Path:
    """formats/ as installed (package ``convkit.formats``); CONVKIT_FORMATS_DIR overrides."""
    env = os.environ.get("CONVKIT_FORMATS_DIR")
    if env:
        return Path(env)
    from importlib import resources

    return Path(str(resources.files("convkit.formats")))


@functools.lru_cache(maxsize=None)
def load_toml(name: str) -> dict:
    path = formats_dir() / "keymaps" / f"{name}.toml"
    with open(path, "rb") as f:
        return tomllib.load(f)


@functools.lru_cache(maxsize=None)
def load_config(arch: str, component: str) -> dict:
    """Full-size diffusers/transformers config of one component, from formats/configs/<arch>/."""
    path = formats_dir() / "configs" / arch / f"{component}.json"
    with open(path) as f:
        return json.load(f)
