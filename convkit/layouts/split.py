"""``convkit split``: one checkpoint -> its parts, each under the names, prefix and folder the
tool that loads it expects (``formats/layouts/<tool>.toml``), each in its own dtype if asked,
plus ``manifest.json`` (what came from where, sizes, sha256). One plan, one read of every
stored tensor; the output folder is staged and renamed into place as a whole."""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, archs, registry
from ..casts import CastContext
from ..engine import OutFile, OutFolder, Plan
from ..errors import UsageError
from ..provenance import safe_name
from .build import PART_KEY, Source, add_component, step_metadata
from .convert import write_folder
from .plan import Placement
from .targets import LayoutTarget, component_of, part_names, part_of

MANIFEST = "manifest.json"
#: --dtype/--to PART= accepts these groups too
GROUPS = {"te": ("clip_l", "clip_g", "t5"), "all": ("unet", "clip_l", "clip_g", "t5", "vae")}


def parse_per_part(values, what: str) -> dict[str, str]:
    """``["fp16", "unet=bf16"]`` -> ``{"*": "fp16", "unet": "bf16"}`` (PART= or a group)."""
    out: dict[str, str] = {}
    names = set(part_names()) | set(GROUPS)
    for v in values or ():
        part, eq, val = v.partition("=")
        if not eq:
            out["*"] = v
            continue
        if part not in names:
            from ..errors import UnknownNameError
            raise UnknownNameError(f"part in {what}", part, sorted(names))
        for p in GROUPS.get(part, (part,)):
            out[p] = val
    return out


def casts_for(parts, dtype_opts: dict[str, str]) -> dict[str, object]:
    """part -> registered cast (None: keep each tensor's logical dtype)."""
    out = {}
    for p in parts:
        name = dtype_opts.get(p, dtype_opts.get("*"))
        out[p] = registry.get("cast", name) if name else None
    return out


def choose_parts(src, det: archs.Detection, parts: list[str] | None) -> dict[str, str]:
    """part -> component, in the architecture's order; refuses a file that is one part."""
    arch = det.arch
    present = [c for c in arch.components if det.component_keys.get(c)]
    if len(present) < 2:
        what = part_of(arch, present[0]) if present else "nothing known"
        raise UsageError(f"this file is already one part ({what}, {det.layout.title}): nothing "
                         "to split", path=src.path,
                         hint="use convkit convert --layout to change its names or dtype")
    if not parts:
        return {part_of(arch, c): c for c in present}
    out = {}
    for p in parts:
        comp = component_of(arch, p)
        if comp is None:
            raise UsageError(f"{arch.title} has no {p} "
                             f"({part_names()[p]['title']})", path=src.path,
                             hint="its parts: " + ", ".join(part_of(arch, c) for c in present))
        if comp not in present:
            raise UsageError(f"this {arch.title} file has no {p} ({comp})", path=src.path,
                             hint="its parts: " + ", ".join(part_of(arch, c) for c in present))
        out[p] = comp
    return {p: out[p] for p in (part_of(arch, c) for c in arch.components) if p in out}


@dataclass
class LoraPart:
    """``--parts lora``: the difference to ``base`` as a LoRA (extract-lora)."""

    base: str
    rank: int = 64
    format: str | None = None       # None: the target's (formats/layouts/<tool>.toml)
    dtype: str = "fp16"


def plan_split(src, det: archs.Detection, out: Path, target: LayoutTarget, *,
               parts: list[str] | None = None, name: str | None = None,
               dtypes: dict[str, str] | None = None, ctx: CastContext | None = None,
               config_from: Path | None = None, to: dict[str, str] | None = None,
               lora: LoraPart | None = None) -> Plan:
    arch = det.arch
    ctx = ctx or CastContext(path=str(src.path))
    parts = list(parts) if parts else None
    want_lora = bool(parts and "lora" in parts)
    if want_lora:
        parts.remove("lora")
        if lora is None:
            raise UsageError("--parts lora needs --base BASE (the model the LoRA applies to)")
    elif lora is not None:
        raise UsageError("--base/--rank are for --parts lora", hint="add lora to --parts")
    name = name or Path(src.path).name.split(".")[0]
    if want_lora and not parts:
        plan = Plan("split", [src])
        folder = plan.folders.setdefault("", OutFolder("", Path(out)))
        records = [_add_lora(plan, folder, src, det, out, target, name, lora)]
        folder.late_files.append(_manifest_maker(plan, src, det, target, records, out))
        return plan
    chosen = choose_parts(src, det, parts)
    casts = casts_for(chosen, dtypes or {})
    to = _check_to(to or {}, chosen, target)
    plan = Plan("split", [src])
    folder = plan.folders.setdefault("", OutFolder("", Path(out)))
    step = {"op": "split", "for": target.name, "parts": list(chosen)}
    meta = step_metadata(src, step)
    records = []
    if target.diffusers_folder:
        sources = {c: Source(0, src, det, c) for c in chosen.values()}
        write_folder(plan, arch, sources, out, None, ctx, meta, config_from,
                     casts={c: casts[p] for p, c in chosen.items()})
        for p, c in chosen.items():
            rule = target.rule(arch, p)
            records.append((p, c, rule, [f for f in plan.files.values()
                                         if f.path.parent.name == c]))
    else:
        files_of = {p: target.rule(arch, p).file.format(name=name, component=c)
                    for p, c in chosen.items()}
        for p, comp in chosen.items():
            rule = target.rule(arch, p)
            rel = files_of[p]
            if p in to:
                f = _add_quantized(plan, src, det, out, rel, to[p], target, p, files_of)
                if f.sink == "gguf" and rule.gguf_loader:
                    from dataclasses import replace

                    rule = replace(rule, loader=rule.gguf_loader)
                records.append((p, comp, rule, [f]))
                continue
            naming = "diffusers" if rule.naming == "diffusers" else "single"
            new = rel not in plan.files
            f = OutFile(rel, Path(out) / rel, metadata={"format": "pt"}, folder="") if new \
                else None
            place = Placement(comp, naming, rule.prefix_for(arch, comp), rel, casts[p])
            add_component(plan, Source(0, src, det, comp), place, ctx, meta, file=f)
            made = plan.files[rel]
            tag = f"{arch.name}/{comp}"
            made.metadata[PART_KEY] = (made.metadata[PART_KEY] + "," + tag
                                       if PART_KEY in made.metadata and not new else tag)
            records.append((p, comp, rule, [made]))
    for p, comp, rule, files in records:
        where = ", ".join(str(f.path.relative_to(out)) for f in files)
        plan.notes.append(f"{p} ({comp}) -> {where}: {rule.loader}".replace(
            "{component}", comp))
    if want_lora:
        records.append(_add_lora(plan, folder, src, det, out, target, name, lora))
    command = _command_line(records, out)
    if command:
        plan.notes.append(f"load with: {command}")
    folder.late_files.append(_manifest_maker(plan, src, det, target, records, out))
    return plan


def _command_line(records, out: Path) -> str:
    """The tool's command line for the parts, when its loaders are flags (sd.cpp: `sd-cli -m
    FILE --vae FILE`, formats/layouts/sdcpp.toml)."""
    args, seen = [], set()
    for _, _, rule, files in records:
        words = rule.loader.split()
        if len(words) < 2 or words[0] != "sd-cli" or not words[1].startswith("-"):
            continue
        path = str(files[0].path.relative_to(out))
        if (words[1], path) not in seen and "(inside" not in rule.loader:
            seen.add((words[1], path))
            args += [words[1], path]
    return " ".join(["sd-cli"] + args) if args else ""


@dataclass
class _Written:
    """A file some other command writes into the staged folder (the LoRA)."""

    id: str
    path: Path


def _add_lora(plan, folder, src, det, out: Path, target: LayoutTarget, name: str,
              lora: LoraPart):
    from ..lora.extract import extract_lora

    rule = target.rule(det.arch, "lora")
    fmt = lora.format or rule.format
    rel = rule.file.format(name=name, rank=lora.rank, component=det.arch.diffusion_component)
    if lora.rank < 1:
        raise UsageError(f"--rank must be >= 1, got {lora.rank}")
    if not Path(lora.base).exists():
        raise UsageError("--base does not exist", path=lora.base)

    def make(stage: Path) -> dict[str, bytes]:
        # extract-lora streams the two models itself (its own plan): the diffusion model is
        # read a second time, for its differences to the base
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        extract_lora(src.path, lora.base, stage / rel, rank=lora.rank, fmt=fmt,
                     dtype=lora.dtype)
        return {}
    folder.late_files.append(make)
    plan.notes.append(f"lora: the difference to {Path(lora.base).name} at rank {lora.rank} "
                      f"({fmt} names) -> {rel}, by extract-lora after the other parts (it reads "
                      "the diffusion model again)")
    return ("lora", None, rule, [_Written(rel, Path(out) / rel)])


def _check_to(to: dict[str, str], chosen: dict[str, str], target: LayoutTarget) -> dict:
    to = {p: t for p, t in to.items() if p == "*" or p in chosen}
    if "*" in to:
        to.setdefault("unet", to.pop("*"))
    other = [p for p in to if p != "unet"]
    if other:
        raise UsageError(f"--to {other[0]}=...: quantize targets apply to the diffusion model "
                         "(unet); give text encoders and the VAE a --dtype")
    if to and target.diffusers_folder:
        raise UsageError("--to does not apply to --for diffusers (diffusers folders hold "
                         "float weights here)", hint="use --dtype")
    if to:
        from ..quantize import parse_target

        parse_target(to["unet"])                    # unknown names fail with a suggestion
    return to


def _add_quantized(plan: Plan, src, det, out: Path, rel: str, target_name: str,
                   target: LayoutTarget, part: str, files_of: dict[str, str]) -> OutFile:
    """The diffusion model quantized exactly as ``convkit quantize --to`` writes it (its
    items and file, moved into this plan), under the part's folder and name."""
    from ..quantize import parse_target, plan_quantize

    shared = [p for p, f in files_of.items() if f == rel and p != part]
    if shared:
        raise UsageError(f"--for {target.name} keeps {', '.join(shared)} in the same file as "
                         f"the {part}: a quantized {part} needs a file of its own",
                         hint="use --dtype, or --for comfyui (every part its own file)")
    tgt = parse_target(target_name)
    if src.format == "diffusers" or det.layout.naming == "diffusers":
        raise UsageError("--to needs single-file names (SGM/LDM or BFL) in the input",
                         path=src.path, hint="convkit convert --layout single-file first")
    layout = "sdcpp" if target.name == "sdcpp" and tgt.kind == "gguf" else "comfy"
    stem = rel.rsplit(".", 1)[0]
    suffix = tgt.qtype if tgt.kind == "gguf" else tgt.name.replace(":", "-")
    new_rel = f"{stem}-{suffix}.{'gguf' if tgt.output_format == 'gguf' else 'safetensors'}"
    qplan = plan_quantize(src, Path(out) / new_rel, tgt, det, layout=layout)
    comp = det.arch.diffusion_component
    for it in qplan.items:
        if it.srcs and not (it.extra.get("in_model", True)):
            continue                    # other components: their own parts
        it.srcs = tuple(type(s)(0, s.key) for s in it.srcs)    # split reads one input
        it.component = comp
        for o in it.outs:
            o.file = new_rel
        plan.items.append(it)
    f = qplan.files[""]
    f.id, f.path, f.folder = new_rel, Path(out) / new_rel, ""
    f.metadata[PART_KEY] = f"{det.arch.name}/{comp}"
    plan.add_file(f)
    plan.notes += [f"{part}: {n}" for n in qplan.notes if "other components" not in n]
    return f


def _manifest_maker(plan: Plan, src, det, target: LayoutTarget, records, out: Path):
    def make(stage: Path) -> dict[str, bytes]:
        rels = sorted({str(f.path.relative_to(out)) for _, _, _, fs in records for f in fs})
        with ThreadPoolExecutor(max_workers=2) as pool:     # hashlib drops the GIL
            sums = dict(zip(rels, pool.map(lambda r: _sha256(stage / r), rels)))
        parts = []
        for p, comp, rule, files in records:
            entry = {"part": p, "component": comp,
                     "files": [_file_entry(stage, str(f.path.relative_to(out)), sums)
                               for f in files],
                     "loader": rule.loader.replace("{component}", comp or "")}
            if comp is not None:
                entry.update(naming=rule.naming,
                             prefix="" if target.diffusers_folder else
                             rule.prefix_for(det.arch, comp),
                             **{"from": {"prefix": det.layout.prefixes.get(comp, ""),
                                         "tensors": len(det.component_keys.get(comp, ()))}})
            parts.append(entry)
        doc = {"convkit_manifest": 1, "convkit_version": __version__, "command": "split",
               "target": target.name, "architecture": det.arch.name,
               "source": {"path": safe_name(src.path), "format": src.format,
                          "layout": det.layout.name,
                          "bytes": sum(f.stat().st_size for f in src.files())},
               "parts": parts, "notes": list(plan.notes)}
        return {MANIFEST: (json.dumps(doc, indent=2) + "\n").encode()}
    return make


def _file_entry(stage: Path, rel: str, sums: dict) -> dict:
    from ..sources.files import open_file

    p = stage / rel
    with open_file(p) as f:
        infos = list(f.infos())
    return {"path": rel, "bytes": p.stat().st_size, "sha256": sums[rel],
            "tensors": len(infos), "dtypes": sorted({i.storage or i.dtype for i in infos})}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def split(input, out, target: str = "comfyui", *, parts: list[str] | None = None,
          name: str | None = None, dtype=(), to=(), lora: LoraPart | None = None,
          on_overflow: str = "clamp",
          config_from=None, overwrite: bool = False, dry_run: bool = False, progress=None):
    """Plan (and unless ``dry_run`` run) a split; returns a :class:`~convkit.layouts.result.LayoutResult`."""
    from ..engine import execute
    from ..sources import open_source
    from .targets import get

    tgt = get(target)
    dt = parse_per_part(dtype, "--dtype")
    for v in set(dt.values()):
        registry.get("cast", v)
    ctx = CastContext(on_overflow=on_overflow, path=str(input))
    with open_source(input) as src:
        det = archs.detect(src)
        plan = plan_split(src, det, Path(out), tgt, parts=parts, name=name, dtypes=dt, ctx=ctx,
                          config_from=config_from, to=parse_per_part(to, "--to"), lora=lora)
        from ..convert import dequant_note

        note = dequant_note(src, "its float dtype")
        if note:
            plan.notes.insert(0, note)
        plan.check(overwrite)
        stats = None if dry_run else execute(plan, overwrite=overwrite, progress=progress)
        from .result import LayoutResult

        return LayoutResult(plan, stats)
