"""Names and shapes of the REAL full-size checkpoints, without any weights.

The real diffusers/transformers classes are instantiated with the full-size configs from
``formats/configs/<arch>/<component>.json`` on the meta device, and their state-dict names are
mapped through :mod:`convkit.keymap` to the single-file (SGM/ComfyUI) layout, with prefixes.
"""
from __future__ import annotations

import functools

import torch

from .. import keymap
from ..keymap._data import load_config
from ..models import instantiate
from . import component_state_dict


def full_size_config(arch: str, component: str) -> dict:
    cfg = dict(load_config(arch, component))
    cfg.pop("_class_name", None)
    return cfg


@functools.lru_cache(maxsize=None)
def _meta_component(arch: str, component: str) -> torch.nn.Module:
    raw = load_config(arch, component)
    with torch.device("meta"):
        return instantiate(raw["_class_name"], full_size_config(arch, component))


def meta_state_dicts(arch: str, layout: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{component: diffusers state dict of meta tensors}`` of the full-size model."""
    return {name: component_state_dict(_meta_component(arch, name))
            for name in keymap.components(arch, layout)}


def full_size_state_dict(arch: str, layout: str | None = None) -> dict[str, torch.Tensor]:
    """The single-file state dict of the full-size model as meta tensors (real names, shapes, dtypes
    float32 except int64 ``position_ids``)."""
    configs = {name: full_size_config(arch, name) for name in keymap.components(arch, layout)}
    return keymap.arch_to_single_file(arch, meta_state_dicts(arch, layout), layout=layout, configs=configs)


def full_size_shapes(arch: str, layout: str | None = None) -> dict[str, tuple[int, ...]]:
    """``{single-file name: shape}`` of the real full-size checkpoint."""
    return {k: tuple(v.shape) for k, v in full_size_state_dict(arch, layout).items()}


def full_size_component_shapes(arch: str, component: str) -> dict[str, tuple[int, ...]]:
    """``{single-file name without the component's prefix: shape}`` of one component of the
    real full-size checkpoint (only that component is instantiated)."""
    kind, _ = keymap.components(arch)[component]
    sd = component_state_dict(_meta_component(arch, component))
    return {k: tuple(v.shape) for k, v in
            keymap.to_single_file(kind, sd, full_size_config(arch, component)).items()}


def full_size_dtypes(arch: str, layout: str | None = None) -> dict[str, torch.dtype]:
    """``{single-file name: torch dtype}``: float32 for weights, int64 for ``position_ids``."""
    return {k: v.dtype for k, v in full_size_state_dict(arch, layout).items()}


def full_size_param_counts(arch: str) -> dict[str, int]:
    """``{component: number of parameters}`` of the diffusers model (tied weights counted once)."""
    return {name: sum(p.numel() for p in _meta_component(arch, name).parameters())
            for name in keymap.components(arch)}
