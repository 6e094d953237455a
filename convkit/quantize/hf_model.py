"""The diffusion model of an input seen as a diffusers model: its class, its config, and every
tensor of its ``state_dict`` by diffusers name, read lazily from the input.

Inputs: a diffusers folder (``unet/`` or ``transformer/`` and its ``config.json``), a lone
component folder, a single file in diffusers names, or a single file in SGM/LDM, BFL or
ComfyUI names (mapped with :mod:`convkit.keymap`; a fused tensor such as Flux ``qkv`` is read
once and split into its diffusers parts). A single file carries no config: the one used is the
first of (the ``config`` argument, the released model's config in ``formats/configs/<arch>/``,
convkit's tiny test model of that architecture) whose model has exactly the file's tensor names
and shapes — checked on a ``meta``-device model, so nothing is allocated.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dtypes
from ..errors import InputFormatError, UsageError
from ..keymap import _bwd  # noqa: F401  (hf_libs decodes through it)
from ..loading import DTensor, component_tensors


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


def diffusers_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise UsageError(f"diffusers has no model class '{name}'")
    return cls


def meta_model(cls_name: str, config: dict) -> torch.nn.Module:
    """The model built from ``config`` on the meta device (names and shapes, no memory)."""
    cls = diffusers_class(cls_name)
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return cls.from_config(cfg)


def _read_config(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputFormatError(f"cannot read the model config ({e})", path=path) from None
    if not isinstance(d, dict) or "_class_name" not in d:
        raise InputFormatError("not a diffusers model config (no _class_name)", path=path)
    return d


def _mismatch(meta: torch.nn.Module, tensors: list[DTensor]) -> list[str]:
    want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    got = {t.name: t.shape for t in tensors}
    problems = [f"missing {k}" for k in want if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in want]
    problems += [f"{k}: {list(got[k])}, the model has {list(s)}" for k, s in want.items()
                 if k in got and got[k] != s]
    return problems


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
    for where, cfg in given:
        # a quantized input folder: the view has decoded its weights; its model is the same
        cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
        m = meta_model(cfg["_class_name"], cfg)
        problems = _mismatch(m, tensors)
        if problems:
            raise InputFormatError(f"the weights do not fit {where}: " + "; ".join(problems[:4])
                                   + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""),
                                   path=src.path)
        return ModelInput(cfg["_class_name"], cfg, where, tensors, m)
    from .. import configs

    r = configs.resolve(det.arch.name, comp, {t.name: t.shape for t in tensors}, path=src.path,
                        hint=f"quantize its diffusers folder instead (the config.json of {comp}/ "
                             "is used), or call convkit.quantize.hf_libs.quantize_hf(..., "
                             "config=<its config.json>)")
    return ModelInput(r.class_name, r.config, r.source, tensors, meta_model(r.class_name, r.config))


def model_dtype(tensors: list[DTensor], rest: str | None) -> str:
    """The torch_dtype equivalent: ``rest`` if given, else the float type holding most bytes."""
    if rest:
        return rest
    by: dict[str, int] = {}
    for t in tensors:
        if dtypes.is_float(t.dtype):
            by[t.dtype] = by.get(t.dtype, 0) + t.src_bytes
    return max(by, key=by.get) if by else "F32"
