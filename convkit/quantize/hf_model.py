"""The diffusion model of an input seen as a diffusers model: its class, its config, and every
tensor of its ``state_dict`` by diffusers name, read lazily from the input.

Inputs: a diffusers folder (``unet/`` or ``transformer/`` and its ``config.json``), a lone
component folder, a single file in diffusers names, or a single file in SGM/LDM, BFL or
ComfyUI names (mapped with :mod:`convkit.keymap`; a fused tensor such as Flux ``qkv`` is read
once and split into its diffusers parts). A single file carries no config:
:func:`convkit.configs.resolve` gives the one whose model has exactly the file's tensor
names and shapes (the ``config`` argument, the released model's, convkit's tiny one, or one
inferred from the shapes) — checked on a ``meta``-device model, so nothing is allocated.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dtypes
from ..errors import InputFormatError, UsageError
from ..loading import DTensor, component_tensors
from ..models import meta_model


@dataclass
class ModelInput:
    cls_name: str
    config: dict                    # the diffusers config (as config.json holds it)
    config_from: str
    tensors: list[DTensor]          # in source read order
    meta: torch.nn.Module = field(repr=False)

    @property
    def state_dict_order(self) -> list[str]:
        return list(self.meta.state_dict())


def _read_config(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputFormatError(f"cannot read the model config ({e})", path=path) from None
    if not isinstance(d, dict) or "_class_name" not in d:
        raise InputFormatError("not a diffusers model config (no _class_name)", path=path)
    return d


def resolve(src, det, raw, config: dict | str | os.PathLike | None = None) -> ModelInput:
    """The diffusion model of ``src`` (``raw`` is the source as opened, before any view)."""
    comp = det.arch.diffusion_component
    if not det.component_keys.get(comp):
        raise UsageError(f"no diffusion model ({comp}) in this input; it has: "
                         f"{', '.join(det.component_keys) or 'nothing known'}", path=src.path)
    tensors = component_tensors(src, det, comp)
    given: list[tuple[str, dict]] = []
    if isinstance(config, dict):
        given.append(("the config passed in", dict(config)))
    elif config is not None:
        p = Path(config)
        p = p / "config.json" if p.is_dir() else p
        given.append((str(p), _read_config(p)))
    elif raw.format == "diffusers":
        root = Path(raw.path)
        p = root / "config.json" if getattr(raw, "lone_component", False) else root / comp / "config.json"
        if p.is_file():
            given.append((str(p), _read_config(p)))
    from .. import configs

    shapes = {t.name: t.shape for t in tensors}
    if given:
        where, cfg = given[0]
        # a quantized input folder: the view has decoded its weights; its model is the same
        cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
        r = configs.resolve(det.arch.name, comp, shapes, given=cfg, given_source=where,
                            path=src.path)
    else:
        r = configs.resolve(det.arch.name, comp, shapes, path=src.path,
                            hint=f"quantize its diffusers folder instead (the config.json of "
                                 f"{comp}/ is used), or call convkit.quantize.hf_libs."
                                 "quantize_hf(..., config=<its config.json>)")
    return ModelInput(r.class_name, r.config, r.source, tensors,
                      meta_model(r.class_name, r.config))


def model_dtype(tensors: list[DTensor], rest: str | None) -> str:
    """The torch_dtype equivalent: ``rest`` if given, else the float type holding most bytes."""
    if rest:
        return rest
    by: dict[str, int] = {}
    for t in tensors:
        if dtypes.is_float(t.dtype):
            by[t.dtype] = by.get(t.dtype, 0) + t.src_bytes
    return max(by, key=by.get) if by else "F32"
