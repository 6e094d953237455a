"""``convkit convert --layout``: the same model under another layout (single file <-> diffusers
folder, full <-> diffusion model only), streaming, one read of every stored tensor."""
from __future__ import annotations

from pathlib import Path

from .. import archs, sampling
from ..casts import CastContext
from ..engine import OutFile, OutFolder, Plan
from ..errors import UsageError
from .build import (
    DEFAULT_SHARD_BYTES,
    Source,
    add_component,
    add_diffusers_component,
    resolve_configs,
    step_metadata,
)
from .plan import Placement

SINGLE_FILE = "single-file"     # alias: the architecture's full single-file layout


def layout_names(arch: archs.Arch) -> list[str]:
    return [SINGLE_FILE] + [x.name for x in arch.layouts]


def target_layout(arch: archs.Arch, name: str) -> archs.Layout:
    return arch.layout(arch.single_file_layout if name == SINGLE_FILE else name)


def wanted_components(det: archs.Detection, lay: archs.Layout, components: str | None,
                      notes: list[str]) -> list[str]:
    arch = det.arch
    chosen = archs.select_components(arch, components, det.component_keys)
    comps = [c for c in arch.components if c in chosen and det.component_keys.get(c)]
    left = [c for c in comps if c not in lay.prefixes]
    if left:
        notes.append(f"layout '{lay.name}' holds {', '.join(lay.prefixes)} only: "
                     f"{', '.join(left)} left out")
    comps = [c for c in comps if c in lay.prefixes]
    if not comps:
        raise UsageError(f"layout '{lay.name}' holds {', '.join(lay.prefixes)}, which this "
                         f"input does not have (it has {', '.join(det.component_keys)})")
    if det.unexpected:
        notes.append(f"{len(det.unexpected)} keys outside the known components have no place "
                     f"in layout '{lay.name}' and are left out (first: {det.unexpected[0]})")
    return comps


def plan_layout(src, det: archs.Detection, out: Path, layout: str, cast, ctx: CastContext, *,
                components: str | None = None, config_from: Path | None = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, step: dict | None = None) -> Plan:
    """Plan ``src`` (detected as ``det``) into ``layout`` at ``out`` (a folder for diffusers)."""
    arch = det.arch
    lay = target_layout(arch, layout)
    plan = Plan("convert", [src])
    comps = wanted_components(det, lay, components, plan.notes)
    step = step or {"op": "convert", "dtype": getattr(cast, "name", "keep"), "layout": lay.name}
    meta = step_metadata(src, step)
    if lay.folder:
        write_folder(plan, arch, {c: Source(0, src, det, c) for c in comps}, out, cast, ctx,
                     meta, config_from, max_shard_bytes)
        return plan
    f = OutFile("", out, metadata={"format": "pt"})
    for n, c in enumerate(comps):
        add_component(plan, Source(0, src, det, c), Placement(c, lay.naming, lay.prefixes[c], "",
                                                              cast), ctx, meta,
                      file=f if n == 0 else None)
    return plan


def write_folder(plan: Plan, arch: archs.Arch, sources: dict[str, Source], out: Path, cast,
                 ctx: CastContext, meta: dict, config_from: Path | None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, folder_id: str = "",
                 casts: dict | None = None, cfgs: dict | None = None) -> OutFolder:
    """A diffusers pipeline folder of ``sources`` (component -> where it comes from);
    ``casts``: a cast per component instead of ``cast``; ``cfgs``: configs already resolved."""
    from .folder import pipeline_files, read_config_from

    folder = plan.folders.setdefault(folder_id, OutFolder(folder_id, Path(out)))
    given = read_config_from(Path(config_from)) if config_from else None
    cfgs = cfgs if cfgs is not None else resolve_configs(arch, sources, given)
    for comp in arch.components:            # the architecture's order
        if comp in sources:
            add_diffusers_component(plan, folder, sources[comp], comp, cfgs[comp], ctx,
                                    (casts or {}).get(comp, cast), meta, max_shard_bytes)
    files, copies, notes = pipeline_files(arch, {c: r.config for c, r in cfgs.items()},
                                          config_from=Path(config_from) if config_from else None)
    folder.extra_files.update(files)
    folder.copies.update(copies)
    plan.notes += notes
    # a stated or inherited prediction type / sampler, where diffusers reads it
    sampling.patch_folder(folder, meta, plan.notes)
    return folder
