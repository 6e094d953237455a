"""``convkit convert``: change float precision (fp32/fp16/bf16), streaming, any layout.

Any input encoding is read through the logical-weights view, so a quantized input (fp8 plain
or scaled, NF4/FP4, GGUF, quanto/torchao folders) is dequantized on the way (the plan says so
per tensor, and a note says it for the file) and the output holds none of its scales, quant
states or storage metadata.

Library API: :func:`plan_convert` builds the plan, :func:`convert` checks, plans and runs it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import archs, registry, sampling
from .casts import CastContext
from .engine import Item, Out, OutFile, OutFolder, Plan, RunStats, Src, execute
from .engine.ops import Cast
from .engine.plan import shard_name, shards
from .errors import UsageError
from .progress import Progress
from .provenance import output_metadata
from .sources import open_source
from .sources.view import WeightsView

DEFAULT_SHARD_BYTES = 5 * 1000**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth", ".msgpack", ".onnx", ".gguf")


@dataclass
class ConvertResult:
    plan: Plan
    detection: archs.Detection | None
    stats: RunStats | None = None
    overflows: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"output": str(self.plan.out), "tensors": len(self.plan.items),
             "in_bytes": self.plan.in_bytes, "out_bytes": self.plan.out_bytes,
             "architecture": self.detection.arch.name if self.detection else None,
             "layout": self.detection.layout.name if self.detection else None,
             "dequantized": sum(1 for i in self.plan.items if i.storage),
             "overflows": self.overflows, "notes": self.plan.notes, "dry_run": self.stats is None}
        if self.stats:
            d["seconds"] = round(self.stats.seconds, 3)
        return d


def select_keys(src, det: archs.Detection | None, components: str | None
                ) -> tuple[list[str], list[str], list[str]]:
    """(keys to keep, selected component names, notes)."""
    notes: list[str] = []
    if det is None:
        if components:
            raise UsageError("--components needs a recognised architecture (drop --no-detect)")
        return src.keys(), [], notes
    chosen = archs.select_components(det.arch, components, det.component_keys)
    if not components:
        keep = src.keys()
        if det.unexpected:
            notes.append(f"{len(det.unexpected)} keys outside the known components are kept "
                         f"as they are (first: {det.unexpected[0]})")
    else:
        wanted = {k for c in chosen for k in det.component_keys[c]}
        keep = [k for k in src.keys() if k in wanted]
        dropped = len(src) - len(keep)
        if dropped:
            notes.append(f"{dropped} tensors of other components left out")
    if not keep:
        raise UsageError(f"none of the requested components ({components}) is in this file; "
                         f"it has: {', '.join(det.component_keys)}", path=src.path)
    return keep, chosen, notes


def dequant_note(src: WeightsView, target: str) -> str | None:
    what = src.describe_encoding()
    if what is None:
        return None
    return f"input is quantized ({what}): dequantized to {target}; its scales and quant states " \
           "are not copied"


def plan_convert(src: WeightsView, out: Path, dtype: str, det: archs.Detection | None,
                 components: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 ctx: CastContext | None = None) -> Plan:
    cast = registry.get("cast", dtype)     # unknown names fail here, with a suggestion
    keep, chosen, notes = select_keys(src, det, components)
    step = {"op": "convert", "dtype": cast.name}
    if components:
        step["components"] = chosen
    op = Cast(ctx or CastContext(path=str(src.path)))
    plan = Plan("convert", [src], notes=notes)
    note = dequant_note(src, cast.name)
    if note:
        plan.notes.insert(0, note)
    items = []
    for k in keep:
        info = src.info(k)
        items.append(Item(op, (Src(0, k),), [Out(k, cast.target(info.dtype), info.shape)],
                          info.shape, info.dtype, info.storage, info.nbytes,
                          det.component_of(k) if det else None))
    meta = output_metadata(src, step)
    if src.format != "diffusers":
        plan.add_file(OutFile("", out, metadata=meta))
        plan.items = items
        return plan
    return _folder_plan(plan, src, out, items, chosen, meta, max_shard_bytes)


def _folder_plan(plan: Plan, src, out: Path, items: list[Item], chosen: list[str], meta: dict,
                 max_shard_bytes: int) -> Plan:
    """diffusers folder -> diffusers folder: same component files, sharded when large."""
    raw = src.raw
    folder = plan.folders.setdefault("", OutFolder("", out))
    meta = {"format": "pt", **meta}
    by_comp: dict[str, list[Item]] = {}
    for it in items:
        key = it.outs[0].key
        comp, _, inner = key.partition("/") if "/" in key and raw.model_index else ("", "", key)
        it.outs[0].key = inner
        by_comp.setdefault(comp, []).append(it)
    for comp, its in by_comp.items():
        stem = raw.components[comp][0].name.split(".")[0]
        sub = f"{comp}/" if comp else ""
        runs = shards(its, lambda it: it.out_bytes, max_shard_bytes)
        n = len(runs)
        weight_map = {}
        for i, shard in enumerate(runs, 1):
            name = shard_name(stem, i, n)
            fid = sub + name
            plan.add_file(OutFile(fid, out / fid, metadata=dict(meta), folder=""))
            for it in shard:
                it.outs[0].file = fid
                weight_map[it.outs[0].key] = name
        if n > 1:
            index = {"metadata": {"total_size": sum(i.out_bytes for i in its)},
                     "weight_map": weight_map}
            folder.extra_files[f"{sub}{stem}.safetensors.index.json"] = (
                json.dumps(index, indent=2) + "\n").encode()
        plan.items.extend(its)
    for rel in _non_weight_files(raw, set(by_comp)):
        folder.copies[rel] = raw.path / rel
    # a quantized component's config.json describes its quantization: the float copy must not
    for comp, cfg in getattr(raw, "configs", {}).items():
        if comp in by_comp and cfg.get("quantization_config"):
            rel = f"{comp}/config.json" if comp else "config.json"
            clean = {k: v for k, v in cfg.items() if k != "quantization_config"}
            folder.copies.pop(rel, None)
            folder.extra_files[rel] = (json.dumps(clean, indent=2, sort_keys=True) + "\n").encode()
            plan.notes.append(f"{rel}: quantization_config removed (the weights are floats now)")
    if raw.model_index and set(chosen) and set(by_comp) != set(raw.components):
        mi = dict(raw.model_index)
        for comp in raw.components:
            if comp not in by_comp:
                mi[comp] = [None, None]
                plan.notes.append(f"component '{comp}' left out (model_index.json marks it absent)")
        folder.copies.pop("model_index.json", None)
        folder.extra_files["model_index.json"] = (json.dumps(mi, indent=2) + "\n").encode()
    # a stated prediction type / sampler, where diffusers reads it (the copied scheduler)
    sampling.patch_folder(folder, meta, plan.notes)
    return plan


def _changes_layout(det: archs.Detection, layout: str) -> bool:
    from .layouts.convert import target_layout

    return target_layout(det.arch, layout).name != det.layout.name


def _non_weight_files(raw, kept: set[str]) -> list[str]:
    root: Path = raw.path
    dropped = set(raw.components) - kept
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts and rel_dir.parts[0] in dropped:
            continue
        for fn in filenames:
            if fn.startswith(".") or fn.endswith(WEIGHT_SUFFIXES) or fn.endswith(".index.json"):
                continue
            if not (Path(dirpath) / fn).is_file():
                continue
            out.append(str(rel_dir / fn) if rel_dir.parts else fn)
    return sorted(out)


def convert(input: str | os.PathLike, output: str | os.PathLike, dtype: str = "fp16", *,
            components: str | None = None, overwrite: bool = False, dry_run: bool = False,
            on_overflow: str = "clamp", detect: bool = True, variant: str | None = None,
            max_shard_bytes: int | None = None, progress: Progress | None = None,
            layout: str | None = None, config_from: str | os.PathLike | None = None
            ) -> ConvertResult:
    """Convert ``input`` to ``dtype``, writing ``output`` (a file, or a folder for diffusers);
    ``layout``: another layout of the architecture (``single-file``, ``diffusers``, ...; see
    :mod:`convkit.layouts.convert`), with configs taken from ``config_from`` when given."""
    ctx = CastContext(on_overflow=on_overflow, path=str(input))
    cast = registry.get("cast", dtype)
    if (layout or config_from) and not detect:
        raise UsageError("--layout and --config-from need a recognised architecture "
                         "(drop --no-detect)")
    with open_source(input, variant=variant) as src:
        det = archs.detect(src) if detect else None
        if config_from and not layout:
            layout = det.layout.name
        if layout and det is not None and (_changes_layout(det, layout) or config_from):
            from .layouts.convert import plan_layout

            note = dequant_note(src, cast.name)
            plan = plan_layout(src, det, Path(output), layout, cast, ctx, components=components,
                               config_from=config_from,
                               **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes
                                  else {}))
            if note:
                plan.notes.insert(0, note)
        else:
            plan = plan_convert(src, Path(output), dtype, det, components,
                                max_shard_bytes or DEFAULT_SHARD_BYTES, ctx)
        plan.check(overwrite)
        result = ConvertResult(plan, det)
        if dry_run:
            return result
        result.stats = execute(plan, overwrite=overwrite, progress=progress)
        result.overflows = dict(ctx.overflows)
        if ctx.overflows:
            n = sum(ctx.overflows.values())
            worst = max(ctx.overflows, key=ctx.overflows.get)
            verb = {"clamp": "clamped to the finite range", "inf": "became inf"}[on_overflow]
            plan.notes.append(f"{n} values in {len(ctx.overflows)} tensors exceeded the "
                              f"{dtype} range and {verb} (most in '{worst}': {ctx.overflows[worst]})")
        return result
