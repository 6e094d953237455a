"""Building the key map of one component kind (the engines are in ``_engine``)."""
from __future__ import annotations

import functools
import re
from typing import Iterable, Mapping

import torch

from ..data import per_formats
from ._data import load_config, load_toml
from ._engine import KeyMap, KeyMapError, PatternMap, PrefixMap
from .unet import UNetStructure, unet_map
from .vae import VAEStructure, vae_map


@per_formats
def _index() -> dict[str, dict]:
    """formats/keymaps/index.toml: kind -> engine, data file, flags."""
    return load_toml("index")["kinds"]


def kinds() -> tuple[str, ...]:
    return tuple(_index())


def kind_info(kind: str) -> dict:
    if kind not in _index():
        from ..errors import UnknownNameError
        raise UnknownNameError("key map kind", kind, tuple(_index()))
    return _index()[kind]


def diffusion_kinds() -> tuple[str, ...]:
    """Kinds that are diffusion models (formats/keymaps/index.toml diffusion_model = true)."""
    return tuple(k for k, v in _index().items() if v.get("diffusion_model"))


# --------------------------------------------------------------------------- map construction


@functools.lru_cache(maxsize=1)
def _clip_is_flat() -> bool:
    """True when the installed transformers' CLIPTextModel has no ``text_model.`` wrapper.

    Known versions are answered from the version number (importing transformers' CLIP model
    costs seconds, a large share of planning a layout change): 4.x has the wrapper, >= 5.6 has
    not; anything else is asked of the class itself."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("transformers").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        major = minor = -1
    if major == 4:
        return False
    if (major, minor) >= (5, 6):
        return True
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                         vocab_size=8, max_position_embeddings=4, projection_dim=8,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        m = CLIPTextModel(cfg)
    return not any(k.startswith("text_model.") for k in m.state_dict())


def _config_component(kind: str, arch: str) -> str:
    """The component of ``arch`` whose key map is ``kind`` (its config describes the kind)."""
    from .. import archs

    hits = [c.name for c in archs.get(arch).components.values() if c.keymap == kind]
    if not hits:
        raise KeyMapError(f"{arch} has no component with key map '{kind}'")
    return hits[0]


def _resolve_config(kind: str, config) -> dict | None:
    if config is None or isinstance(config, Mapping):
        return config
    if isinstance(config, str):
        return load_config(config, _config_component(kind, config))
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def _hidden(data: dict, cfg: dict | None, sd: Mapping | None, side: str) -> int | None:
    """The hidden size a patterns map's fused parts use ("h"), from its data file's [hidden]:
    the product of config fields, else a tensor's shape."""
    h = data.get("hidden")
    if not h:
        return None
    fields = h.get("config", [])
    if cfg and fields and all(f in cfg for f in fields):
        out = 1
        for f in fields:
            out *= int(cfg[f])
        return out
    key = h.get("diffusers" if side == "d" else "single")
    if sd is not None and key and key in sd:
        return int(sd[key].shape[int(h.get("dim", 0))])
    return None


def _depth(data: dict, cfg: dict | None, names: Iterable[str] | None, side: str) -> int | None:
    """Number of {i} blocks, from the config field or the highest block number in the names."""
    d = data.get("depth")
    if not d:
        return None
    if cfg and d.get("config") in cfg:
        return int(cfg[d["config"]])
    pattern = d.get("diffusers" if side == "d" else "single")
    if names is None or not pattern:
        return None
    rx = re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)"))
    found = [int(m.group(1)) for n in names if (m := rx.match(n))]
    return max(found) + 1 if found else None


def get_map(kind: str, config=None, names: Iterable[str] | None = None, side: str = "d",
            sd: Mapping | None = None) -> KeyMap:
    """The :class:`KeyMap` of one component. ``side`` says which naming ``names`` use ("d"/"s")."""
    info = kind_info(kind)
    cfg = _resolve_config(kind, config)
    engine, data = info["engine"], load_toml(info["file"])
    if engine == "unet":
        if cfg is not None:
            st = UNetStructure.from_config(cfg)
        elif names is not None:
            st = (UNetStructure.from_diffusers_names(names) if side == "d"
                  else UNetStructure.from_single_names(names))
        else:
            raise KeyMapError("the unet key map needs a config (dict or arch name) or the state-dict names")
        return unet_map(st)
    if engine == "vae":
        if cfg is not None:
            st = VAEStructure.from_config(cfg)
        elif names is not None:
            st = (VAEStructure.from_diffusers_names(names) if side == "d"
                  else VAEStructure.from_single_names(names))
        else:
            st = VAEStructure()
        return vae_map(st)
    if engine == "prefix":
        flat = info.get("clip_spelling") and _clip_is_flat()
        return PrefixMap(kind, data, out_name=(lambda n: n.removeprefix("text_model.")) if flat else None)
    if engine == "patterns":
        if names is None and sd is not None:
            names = list(sd.keys())
        return PatternMap(kind, data, hidden=_hidden(data, cfg, sd, side),
                          depth=_depth(data, cfg, names, side))
    raise KeyMapError(f"formats/keymaps/index.toml: unknown engine '{engine}' for kind '{kind}'")
