"""Building the key map of one component kind (the engines are in ``_engine``)."""
from __future__ import annotations

import functools
from typing import Iterable, Mapping

import torch

from ..errors import ConvkitError
from ._data import load_config, load_toml
from ._engine import KeyMap, PatternMap, PrefixMap
from .unet import UNetStructure, unet_map
from .vae import VAEStructure, vae_map

KINDS = ("unet", "vae", "clip_l", "openclip", "t5", "flux")

# component folder whose full-size config describes a kind (formats/configs/<arch>/<name>.json)
_KIND_CONFIG = {"unet": "unet", "vae": "vae", "clip_l": "text_encoder", "openclip": "text_encoder_2",
                "t5": "text_encoder_2", "flux": "transformer"}


class KeyMapError(ConvkitError, KeyError):
    """A tensor name that the key map of its component does not know, or an incomplete fused set."""

    exit_code = 3

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return self._compose()


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


def _resolve_config(kind: str, config) -> dict | None:
    if config is None or isinstance(config, Mapping):
        return config
    if isinstance(config, str):
        return load_config(config, _KIND_CONFIG[kind])
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def _hidden(kind: str, cfg: dict | None, sd: Mapping | None, side: str) -> int | None:
    if kind == "flux":
        if cfg and "num_attention_heads" in cfg:
            return int(cfg["num_attention_heads"]) * int(cfg.get("attention_head_dim", 128))
        key = "x_embedder.weight" if side == "d" else "img_in.weight"
        if sd is not None and key in sd:
            return int(sd[key].shape[0])
    if kind == "openclip":
        if cfg and "hidden_size" in cfg:
            return int(cfg["hidden_size"])
        if sd is not None:
            key = ("text_model.embeddings.token_embedding.weight" if side == "d" else "token_embedding.weight")
            if key in sd:
                return int(sd[key].shape[1])
    return None


def get_map(kind: str, config=None, names: Iterable[str] | None = None, side: str = "d",
            sd: Mapping | None = None) -> KeyMap:
    """The :class:`KeyMap` of one component. ``side`` says which naming ``names`` use ("d"/"s")."""
    if kind not in KINDS:
        from ..errors import UnknownNameError
        raise UnknownNameError("component kind", kind, KINDS)
    cfg = _resolve_config(kind, config)
    if kind == "unet":
        if cfg is not None:
            st = UNetStructure.from_config(cfg)
        elif names is not None:
            st = (UNetStructure.from_diffusers_names(names) if side == "d"
                  else UNetStructure.from_single_names(names))
        else:
            raise KeyMapError("the unet key map needs a config (dict or arch name) or the state-dict names")
        return unet_map(st)
    if kind == "vae":
        if cfg is not None:
            st = VAEStructure.from_config(cfg)
        elif names is not None:
            st = (VAEStructure.from_diffusers_names(names) if side == "d"
                  else VAEStructure.from_single_names(names))
        else:
            st = VAEStructure()
        return vae_map(st)
    if kind == "clip_l":
        flat = _clip_is_flat()
        return PrefixMap(kind, load_toml("clip_l"),
                         out_name=(lambda n: n.removeprefix("text_model.")) if flat else None)
    if kind == "t5":
        return PrefixMap(kind, load_toml("t5"))
    data = load_toml("openclip" if kind == "openclip" else "flux_bfl")
    return PatternMap(kind, data, hidden=_hidden(kind, cfg, sd, side))


