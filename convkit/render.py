"""Any artifact convkit reads, as the diffusers pipeline a user would render it with.

Every model component comes through the logical-weights view (:mod:`convkit.loading`: any
encoding, decoded; configs given, known or inferred), a component the artifact lacks from
``base`` (a UNet-only file plus the model it belongs to). Tokenizers and the scheduler come from
the first folder that has them — ``config_from``, the artifact, ``base`` — else from what
convkit ships (``formats/tokenizers/``, ``formats/configs/<arch>/scheduler.json``); nothing is
downloaded.
"""
from __future__ import annotations

import inspect
import json
from contextlib import ExitStack
from pathlib import Path

import torch

from . import archs, data
from .errors import UsageError
from .layouts.folder import tokenizer_folder
from .loading import load_component, resolve_config
from .sources import open_source


def _folders(*paths) -> list[Path]:
    return [Path(p) for p in paths if p is not None and Path(p).is_dir()]


def _component_config(folders: list[Path], comp: str) -> tuple[dict | None, str]:
    for f in folders:
        p = f / comp / "config.json"
        if p.is_file():
            cfg = json.loads(p.read_text())
            if "_class_name" not in cfg and cfg.get("architectures"):
                cfg["_class_name"] = cfg["architectures"][0]
            return cfg, str(p)
    return None, ""


def pipeline_slots(arch: archs.Arch) -> list[str]:
    """The pipeline constructor's arguments a model fills or leaves empty, from
    ``formats/<arch>.toml``: every component, each text encoder's tokenizer (text_encoder_3 ->
    tokenizer_3) and the optional slots the released model_index.json writes [null, null]
    (``[model_index] absent``: safety checker, IP-Adapter image encoder, ...). A stage that
    loads one family of components passes None for the others."""
    slots: list[str] = []
    for c in arch.components.values():
        slots.append(c.name)
        if c.kind == "text_encoder":
            slots.append(tokenizer_folder(c.name))
    return slots + [a for a in arch.model_index.get("absent", []) if a not in slots]


def tokenizer_for(arch: archs.Arch, comp: str, folders: list[Path]):
    from transformers import AutoTokenizer

    folder_name = tokenizer_folder(comp)
    for f in folders:
        if (f / folder_name).is_dir():
            return AutoTokenizer.from_pretrained(str(f / folder_name), local_files_only=True)
    kind = arch.components[comp].tokenizer
    from . import tokenizers

    if kind in tokenizers.kinds():
        return tokenizers.tokenizer(kind)
    raise UsageError(f"no tokenizer for {arch.name}'s {comp} ({kind or 'unknown kind'}): convkit "
                     "ships CLIP's and T5's only", hint=f"give a model folder with {folder_name}/ "
                                                        "as --config-from")


def scheduler_for(arch: archs.Arch, folders: list[Path], class_name: str | None = None,
                  **overrides):
    """The model's scheduler (``class_name``: another scheduler class from its config, as
    diffusers' ``from_config`` does; ``overrides``: config values, e.g. timestep_spacing)."""
    import diffusers

    cfg = None
    for f in folders:
        p = f / "scheduler" / "scheduler_config.json"
        if p.is_file():
            cfg = json.loads(p.read_text())
            break
    if cfg is None:
        try:
            cfg = dict(data.load_json(f"configs/{arch.name}/scheduler.json"))
        except OSError:
            raise UsageError(f"no scheduler config known for {arch.name}",
                             hint="give a model folder with scheduler/ as --config-from") from None
    cls = getattr(diffusers, class_name or cfg["_class_name"])
    # "_source" and the like are notes in convkit's files, not scheduler settings
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
    return cls.from_config({**cfg, **overrides})


class ConfigOnly:
    """A component that is not loaded, as far as a pipeline reads it: its config."""

    def __init__(self, config: dict):
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(config)

    def __bool__(self) -> bool:          # `if pipe.vae` still means "a VAE is loaded"
        return False


#: the component kinds of a pipeline, in the order a render uses them
KINDS = ("text_encoder", "diffusion_model", "vae")


def vae_scale_factor(vae_config: dict) -> int:
    """How much the VAE downsamples: diffusers' pipelines take 2 ** (levels - 1)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def pipeline_for(path, *, base=None, config_from=None, dtype: torch.dtype = torch.float32,
                 keep_stored: bool = False, scheduler_class: str | None = None,
                 scheduler_overrides: dict | None = None, kinds=None):
    """The diffusers pipeline of ``path`` (components missing from it taken from ``base``);
    ``keep_stored``: layers hold their weights as stored and decode them when they run
    (:class:`convkit.loading.StoredWeight`). ``kinds``: load only the components of these
    kinds (:data:`KINDS`); the others are None, so that a render can hold one family of
    weights at a time. Every component's config is resolved either way (no weight read);
    they are in ``pipe.convkit_configs``."""
    import diffusers

    if kinds is not None and not set(kinds) <= set(KINDS):
        raise ValueError(f"kinds must be among {KINDS}, got {sorted(kinds)}")
    folders = _folders(config_from, path, base)
    with ExitStack() as stack:
        src = stack.enter_context(open_source(path))
        det = archs.detect(src)
        arch = det.arch
        bsrc = bdet = None
        if base is not None:
            bsrc = stack.enter_context(open_source(base))
            bdet = archs.detect(bsrc)
            if bdet.arch.name != arch.name:
                raise UsageError(f"the artifact is {arch.title}, --base is {bdet.arch.title}",
                                 path=path)
        kwargs: dict = {}
        resolved: dict = {}
        context: dict = {}
        # text encoders first: the UNet's config may need their widths (the pooled text
        # embedding SDXL's added embedding takes is the last text encoder's projection)
        order = sorted(arch.components, key=lambda c: arch.components[c].kind != "text_encoder")
        for comp in order:
            if det.component_keys.get(comp):
                s, d = src, det
            elif bdet is not None and bdet.component_keys.get(comp):
                s, d = bsrc, bdet
            else:
                raise UsageError(f"no '{comp}' in this file" + ("" if base is None else
                                                              " nor in --base"),
                                 path=path, hint="give the full model it belongs to as --base")
            cfg, where = _component_config(folders, comp)
            r = resolved[comp] = resolve_config(s, d, comp, config=cfg, config_source=where,
                                                context=context)
            if r.class_name.endswith("WithProjection") and r.config.get("projection_dim"):
                context["pooled_dim"] = r.config["projection_dim"]
            kind = arch.components[comp].kind
            if kinds is not None and kind not in kinds:
                continue
            kwargs[comp], _ = load_component(s, d, comp, dtype=dtype, keep_stored=keep_stored,
                                             resolved=r)
            if kind == "text_encoder":
                kwargs[tokenizer_folder(comp)] = tokenizer_for(arch, comp, folders)
    kwargs["scheduler"] = scheduler_for(arch, folders, scheduler_class,
                                        **(scheduler_overrides or {}))
    cls = getattr(diffusers, arch.pipeline)
    params = inspect.signature(cls.__init__).parameters
    for opt in pipeline_slots(arch):
        if opt in params and opt not in kwargs:
            kwargs[opt] = None
    kwargs.update(arch.pipeline_config)
    pipe = cls(**{k: v for k, v in kwargs.items() if k in params})
    vae = next((c for c in resolved if arch.components[c].kind == "vae"), None)
    if vae is not None and kwargs.get(vae) is None:
        # without its VAE a pipeline assumes factor 8; latents must have the model's size
        pipe.vae_scale_factor = vae_scale_factor(resolved[vae].config)
        # img2img pipelines read the VAE's config (latents_mean/std) even when given latents;
        # set past the pipeline's registry, which would record it as a component
        pipe.__dict__[vae] = ConfigOnly(resolved[vae].config)
    pipe.convkit_configs = {c: r.config for c, r in resolved.items()}
    return pipe
