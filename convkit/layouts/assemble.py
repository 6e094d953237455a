"""``convkit assemble``: parts (any layout, naming or encoding) -> one model, e.g. a Lightning
UNet with a custom model's text encoders and VAE in one single file for Forge.

The diffusion model fixes the architecture. Every other input is either a full checkpoint (its
component of that name is taken; it must be the same architecture) or a lone part file
(:mod:`convkit.layouts.parts`). Parts given twice, parts of another architecture and parts
whose sizes do not fit together (``formats/layouts/consistency.toml``, checked on the resolved
configs) are refused before anything is written."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from .. import archs
from ..casts import CastContext
from ..data import load_toml
from ..engine import OutFile, Plan
from ..errors import (
    ConvkitError,
    InputFormatError,
    UnknownArchitectureError,
    UsageError,
)
from ..sources import open_source
from .build import PART_KEY, Source, add_component, resolve_configs, step_metadata
from .convert import target_layout, write_folder
from .plan import Placement
from .targets import component_of, part_names


def flag(part: str) -> str:
    return "--" + part.replace("_", "-")


def _one_per_part(given: dict[str, list]) -> dict[str, str]:
    out = {}
    for part, paths in given.items():
        paths = [p for p in (paths or ()) if p]
        if len(paths) > 1:
            raise UsageError(f"{part} given twice: {flag(part)} {paths[0]} and {flag(part)} "
                             f"{paths[1]}")
        if paths:
            out[part] = str(paths[0])
    if "unet" not in out:
        raise UsageError("assemble needs the diffusion model: --unet FILE")
    return out


def resolve_part(src, arch: archs.Arch, part: str, path: str) -> Source:
    """Where ``part`` of ``arch`` is in ``src``: its component of a full checkpoint of the same
    architecture, or a lone part file that fits."""
    comp = component_of(arch, part)
    if comp is None:
        raise UsageError(f"{arch.title} has no {part} ({part_names()[part]['title']}): "
                         f"drop {flag(part)}", path=path)
    try:
        det = archs.detect(src)
    except UnknownArchitectureError:
        det = None
    if det is not None and len(det.component_keys) > 0 and not _is_lone(det):
        if det.arch.name != arch.name:
            raise UsageError(f"{flag(part)} is a {det.arch.title} checkpoint; --unet is "
                             f"{arch.title}", path=path)
        if not det.component_keys.get(comp):
            raise UsageError(f"{flag(part)}: this {det.arch.title} file has no {comp}", path=path)
        return Source(0, src, det, comp, flag(part))
    from .parts import as_detection, detect_part

    m = detect_part(src)
    if m is None:
        raise InputFormatError(f"{flag(part)}: not a {part_names()[part]['title']} convkit "
                               "recognises (no known key names)", path=path)
    spec = part_names()[part]
    # the component decides which key map reads the file (its own part name, or the part's
    # table); names several maps read (transformers CLIP with projection: SDXL's CLIP-G, SD3's
    # CLIP-L and CLIP-G) fit each of them (PartMatch.also)
    keymap = arch.components[comp].keymap
    if keymap not in {m.kind, *(k for k, _ in m.also)}:
        from .parts import rules

        raise UsageError(f"{flag(part)} is a {m.title}; {arch.title}'s {comp} is a "
                         f"{rules().kind_titles.get(keymap, spec['title'])} ({keymap})", path=path)
    if (arch.name, comp) not in m.archs:
        others = sorted({archs.get(a).title for a, _ in m.archs})
        raise UsageError(f"{flag(part)} is the {m.title} of {', '.join(others)}; --unet is "
                         f"{arch.title}", path=path)
    return Source(0, src, as_detection(src, m, arch.name, comp), comp, flag(part))


def _is_lone(det: archs.Detection) -> bool:
    return len(det.layout.prefixes) == 1 and not det.layout.folder


def check_consistency(arch: archs.Arch, sources: dict[str, Source], cfgs: dict) -> None:
    """The relations of ``formats/layouts/consistency.toml``; every broken one reported."""
    problems = []
    for rule in load_toml("layouts/consistency.toml")["rule"]:
        if arch.name not in rule["archs"]:
            continue
        lc, lf = rule["left"]
        right = [(c, f) for c, f in rule["right"] if c in arch.components]
        if lc not in cfgs or any(c not in cfgs for c, _ in right):
            continue
        lv = cfgs[lc].config.get(lf)
        rv = [cfgs[c].config.get(f) for c, f in right]
        if lv is None or None in rv:
            continue
        want = sum(rv) * rule.get("factor", 1)
        if lv != want:
            terms = " + ".join(f"{sources[c].flag} {f} {v}" for (c, f), v in zip(right, rv))
            k = rule.get("factor", 1)
            terms = f"{k} x ({terms})" if k != 1 else terms
            problems.append(f"{rule['what']}: {sources[lc].flag} {lf} is {lv}, but {terms} "
                            f"= {want}")
    if problems:
        raise UsageError("the parts do not fit together: " + "; ".join(problems))


def plan_assemble(srcs: dict[str, object], paths: dict[str, str], out: Path, *,
                  layout: str | None = None, dtype=None, ctx: CastContext | None = None,
                  config_from=None) -> Plan:
    """``srcs``: part -> opened input (``unet`` required)."""
    unet_src = srcs["unet"]
    try:
        udet = archs.detect(unet_src)
    except UnknownArchitectureError as e:
        raise UsageError(f"--unet: {e.detail}", path=paths["unet"]) from None
    arch = udet.arch
    dm = arch.diffusion_component
    if not udet.component_keys.get(dm):
        raise UsageError(f"--unet has no {dm}", path=paths["unet"])
    inputs: list = []
    index: dict[int, int] = {}
    sources: dict[str, Source] = {}
    for part in part_names():           # formats/layouts/part_names.toml order
        if part not in srcs:
            continue
        s = srcs[part]
        if id(s) not in index:
            index[id(s)] = len(inputs)
            inputs.append(s)
        src_ = (Source(0, s, udet, dm, "--unet") if part == "unet"
                else resolve_part(s, arch, part, paths[part]))
        src_.inp = index[id(s)]
        sources[src_.comp] = src_
    ctx = ctx or CastContext(path=paths["unet"])
    cfgs = _configs(arch, sources, config_from)
    lay = target_layout(arch, layout or "single-file")
    plan = Plan("assemble", inputs)
    left = [c for c in sources if c not in lay.prefixes]
    if left:
        raise UsageError(f"layout '{lay.name}' holds {', '.join(lay.prefixes)} only; "
                         f"{', '.join(sources[c].flag for c in left)} would be lost",
                         hint="choose --layout single-file or diffusers")
    missing = [c for c in lay.prefixes if c not in sources]
    if missing:
        plan.notes.append(f"no {', '.join(missing)} given: the output has none")
    meta = step_metadata(inputs, {"op": "assemble", "layout": lay.name,
                                  "parts": {p: Path(v).name for p, v in paths.items()}})
    order = [c for c in arch.components if c in sources]
    if lay.folder:
        write_folder(plan, arch, {c: sources[c] for c in order}, out, dtype, ctx, meta,
                     config_from, cfgs=cfgs)
        return plan
    f = OutFile("", Path(out), metadata={"format": "pt"})
    for n, c in enumerate(order):
        add_component(plan, sources[c], Placement(c, lay.naming, lay.prefixes[c], "", dtype),
                      ctx, meta, file=f if n == 0 else None)
    if len(order) == 1:
        plan.files[""].metadata[PART_KEY] = f"{arch.name}/{order[0]}"
    return plan


def _configs(arch, sources, config_from):
    given = None
    if config_from:
        from .folder import read_config_from

        given = read_config_from(Path(config_from))
    # resolve the parts one by one first: a part that does not fit its neighbours must be
    # reported as such, not as a config that cannot be inferred
    solo = {}
    failed: ConvkitError | None = None
    for c, s in sources.items():
        try:
            solo.update(resolve_configs(arch, {c: s}, given))
        except ConvkitError as e:
            failed = failed or e
    check_consistency(arch, sources, solo)
    if failed is None:
        return solo
    # a config that could only be inferred with its neighbours' widths (the pooled text
    # embedding of an SDXL UNet): resolve once more, all together
    return resolve_configs(arch, sources, given)


def assemble(parts: dict[str, list], out, *, layout: str | None = None, dtype: str | None = None,
             on_overflow: str = "clamp", config_from=None, overwrite: bool = False,
             dry_run: bool = False, progress=None):
    """``parts``: part name -> the paths given for it (one each). Returns a :class:`~convkit.layouts.result.LayoutResult`."""
    from .. import registry
    from ..engine import execute

    paths = _one_per_part(parts)
    cast = registry.get("cast", dtype) if dtype else None
    ctx = CastContext(on_overflow=on_overflow, path=paths["unet"])
    with ExitStack() as stack:
        opened: dict[str, object] = {}
        srcs = {}
        for part, p in paths.items():
            key = str(Path(p).resolve())
            if key not in opened:
                opened[key] = stack.enter_context(open_source(p))
            srcs[part] = opened[key]
        plan = plan_assemble(srcs, paths, Path(out), layout=layout, dtype=cast, ctx=ctx,
                             config_from=config_from)
        from ..convert import dequant_note

        for s in plan.inputs:
            note = dequant_note(s, "its float dtype")
            if note:
                plan.notes.insert(0, f"{Path(s.path).name}: {note}")
        plan.check(overwrite)
        stats = None if dry_run else execute(plan, overwrite=overwrite, progress=progress)
        from .result import LayoutResult

        return LayoutResult(plan, stats)
