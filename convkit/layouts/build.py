"""Shared machinery of ``convert --layout``, ``split`` and ``assemble``: where each component
comes from (:class:`Source`), its resolved config, and the files a component becomes (a
single-file part, or a diffusers component folder with its config, sharded when large)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from .. import archs
from ..casts import CastContext
from ..configs import ResolvedConfig
from ..engine import OutFile, OutFolder, Plan
from ..engine.plan import shard_name, shards
from ..loading import resolve_config
from ..provenance import output_metadata
from .plan import EXTRAS_KEY, Placement, plan_component

PART_KEY = "convkit.part"           # "<arch>/<component>" on every part convkit writes
DEFAULT_SHARD_BYTES = 10 * 1000**3  # diffusers save_pretrained's default max_shard_size


@dataclass
class Source:
    """One component of one input."""

    inp: int                        # index in the plan's inputs
    src: object                     # the input's logical-weights view
    det: archs.Detection            # its detection (or a part's, one component)
    comp: str                       # component name in det.arch
    flag: str = ""                  # how the user named it (assemble: --clip-g), for messages


def resolve_configs(arch: archs.Arch, sources: dict[str, Source],
                    given: dict[str, dict] | None = None, given_source: str = "--config-from"
                    ) -> dict[str, ResolvedConfig]:
    """Every component's config (given, known or inferred from the shapes; no weight is read),
    text encoders first: the UNet's added embedding takes the last one's projection width."""
    out: dict[str, ResolvedConfig] = {}
    context: dict = {}
    order = sorted(sources, key=lambda c: arch.components[c].kind != "text_encoder")
    for comp in order:
        s = sources[comp]
        r = out[comp] = resolve_config(s.src, s.det, s.comp, config=(given or {}).get(comp),
                                       config_source=given_source, context=context)
        if r.class_name.endswith("WithProjection") and r.config.get("projection_dim"):
            context["pooled_dim"] = r.config["projection_dim"]
    return out


def weights_name(class_name: str) -> str:
    """diffusers models save ``diffusion_pytorch_model.safetensors``, transformers models
    ``model.safetensors`` (their ``save_pretrained``)."""
    return "model" if class_name.startswith(("CLIP", "T5")) else "diffusion_pytorch_model"


def clean_metadata(meta: dict) -> dict:
    """An output's metadata without what described the input's own layout."""
    return {k: v for k, v in meta.items() if k not in (EXTRAS_KEY, PART_KEY)}


def add_component(plan: Plan, s: Source, place: Placement, ctx: CastContext, meta: dict,
                  file: OutFile | None = None) -> None:
    """Plan ``s`` into ``place`` (a file the plan already has, or ``file``, added)."""
    items = plan_component(s.src, s.det, s.inp, place, ctx, plan.notes)
    if file is not None:
        file.metadata = {**clean_metadata(meta), **file.metadata, **place.metadata}
        plan.add_file(file)
    else:
        plan.files[place.file].metadata.update(place.metadata)
    plan.items.extend(items)


def add_diffusers_component(plan: Plan, folder: OutFolder, s: Source, comp: str,
                            cfg: ResolvedConfig, ctx: CastContext, cast, meta: dict,
                            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """``comp`` as a diffusers component folder ``<folder>/<comp>/``: weights under diffusers
    names (sharded with an index as save_pretrained does), the config the class writes."""
    from .folder import component_config_json

    stem = weights_name(cfg.class_name)
    sub = f"{comp}/"
    fid = f"{folder.id}:{sub}{stem}"
    place = Placement(comp, "diffusers", "", fid, cast)
    items = plan_component(s.src, s.det, s.inp, place, ctx, plan.notes)
    fmeta = {"format": "pt", **clean_metadata(meta), **place.metadata}
    outs, seen = [], set()
    for it in items:
        for o in it.outs:
            if id(o) not in seen:
                seen.add(id(o))
                outs.append(o)
    runs = shards(outs, lambda o: o.nbytes, max_shard_bytes)
    n = len(runs)
    weight_map = {}
    for i, shard in enumerate(runs, 1):
        name = shard_name(stem, i, n)
        sid = fid if n == 1 else f"{fid}-{i}"
        plan.add_file(OutFile(sid, folder.path / sub / name, metadata=dict(fmeta),
                              folder=folder.id))
        for o in shard:
            o.file = sid
            weight_map[o.key] = name
    if n > 1:
        index = {"metadata": {"total_size": sum(o.nbytes for o in outs)},
                 "weight_map": weight_map}
        folder.extra_files[f"{sub}{stem}.safetensors.index.json"] = (
            json.dumps(index, indent=2) + "\n").encode()
    folder.extra_files[f"{sub}config.json"] = component_config_json(cfg.class_name, cfg.config)
    plan.items.extend(items)


def step_metadata(srcs, step: dict) -> dict:
    return clean_metadata(output_metadata(srcs, step))


__all__ = [
    "PART_KEY",
    "Source",
    "add_component",
    "add_diffusers_component",
    "resolve_configs",
    "step_metadata",
    "weights_name",
]
