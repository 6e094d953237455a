"""The real diffusers/transformers model classes, by name: build one from a config, or only
its parameter names and shapes (on the meta device: no memory, no weights)."""
from __future__ import annotations

import functools
import json
import warnings

import torch

from .errors import UsageError


def model_class(name: str):
    import diffusers
    import transformers

    cls = getattr(diffusers, name, None) or getattr(transformers, name, None)
    if cls is None or not isinstance(cls, type):
        raise UsageError(f"neither diffusers nor transformers has a model class '{name}'")
    return cls


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items()
            if not k.startswith("_") and k not in ("quantization_config", "architectures")}


def instantiate(cls_name: str, config: dict) -> torch.nn.Module:
    """``cls_name`` built from ``config`` (diffusers: keyword arguments; transformers: its
    config class), on the current default device."""
    cls = model_class(cls_name)
    cfg = _public(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls.__module__.startswith("transformers"):
            return cls(cls.config_class(**cfg))
        # from_config, not cls(**cfg): a config.json written by another diffusers version may
        # carry fields this one does not take
        return cls.from_config(cfg)


def meta_model(cls_name: str, config: dict) -> torch.nn.Module:
    """The model ``config`` describes, built on the meta device (names and shapes only)."""
    with torch.device("meta"):
        return instantiate(cls_name, config)


def meta_shapes(cls_name: str, config: dict) -> dict[str, tuple[int, ...]]:
    """``{parameter or buffer name: shape}`` of the model the config describes, as its
    ``state_dict`` names them."""
    # memoised: config resolution asks for the same model's shapes again and again (each
    # component of each artifact of a verify run), and building one takes up to a second
    return dict(_meta_shapes(cls_name, json.dumps(config, sort_keys=True, default=str))[0])


def tied_aliases(cls_name: str, config: dict) -> frozenset[str]:
    """State-dict names that are another name's tensor (T5's ``encoder.embed_tokens.weight``
    is ``shared.weight``): files carry one of them."""
    return _meta_shapes(cls_name, json.dumps(config, sort_keys=True, default=str))[1]


@functools.lru_cache(maxsize=32)
def _meta_shapes(cls_name: str, config_json: str):
    m = meta_model(cls_name, json.loads(config_json))
    sd = m.state_dict(keep_vars=True)
    seen: dict[int, str] = {}
    aliases = set()
    for k, v in sd.items():
        if id(v) in seen:
            aliases.add(k)
        seen.setdefault(id(v), k)
    return tuple((k, tuple(v.shape)) for k, v in sd.items()), frozenset(aliases)


# transformers 5 dropped the ``text_model.`` wrapper of CLIPTextModel's state dict; files saved
# by transformers 4 (every text encoder on the Hub) still carry it. Either spelling is accepted.
_WRAPPERS = ("text_model.",)


def align_names(expected, names) -> dict[str, str]:
    """``{name in the file: name in the model}`` for names that differ only by a wrapper
    prefix the installed transformers does (not) use; names that match stay as they are."""
    expected = set(expected)
    out = {}
    for n in names:
        if n in expected:
            out[n] = n
            continue
        for w in _WRAPPERS:
            if n.startswith(w) and n[len(w):] in expected:
                out[n] = n[len(w):]
                break
            if w + n in expected:
                out[n] = w + n
                break
        else:
            out[n] = n
    return out
