"""Key-map data files (formats/keymaps/*.toml) and full-size configs (formats/configs/)."""
from __future__ import annotations

from .. import data


def load_toml(name: str) -> dict:
    return data.load_toml(f"keymaps/{name}.toml")


def load_config(arch: str, component: str) -> dict:
    """Full-size diffusers/transformers config of one component, from formats/configs/<arch>/."""
    return data.load_json(f"configs/{arch}/{component}.json")
