"""``convkit convert``: change float precision (fp32/fp16/bf16), streaming, any layout.

Library API: :func:`plan_convert` builds the plan, :func:`convert` checks, plans and runs it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import archs, registry
from .casts import CAST_TARGET, CastContext, cast_into, target_dtype
from .errors import UsageError
from .plan import Plan, PlanItem, RunStats, execute, provenance
from .progress import Progress
from .sources import TensorSource, open_source

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
             "overflows": self.overflows, "notes": self.plan.notes, "dry_run": self.stats is None}
        if self.stats:
            d["seconds"] = round(self.stats.seconds, 3)
        return d


def select_keys(src: TensorSource, det: archs.Detection | None, components: str | None
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


def plan_convert(src: TensorSource, out: Path, dtype: str, det: archs.Detection | None,
                 components: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Plan:
    target = CAST_TARGET.get(dtype)
    registry.get("cast", dtype)  # unknown names fail here, with a suggestion
    keep, chosen, notes = select_keys(src, det, components)
    step = {"op": "convert", "dtype": dtype}
    if components:
        step["components"] = chosen
    items = []
    for k in keep:
        info = src.info(k)
        tdt = target_dtype(info.dtype, target)
        items.append(PlanItem(k, k, info.shape, info.dtype, tdt,
                              det.component_of(k) if det else None, "", info.nbytes,
                              "cast" if tdt != info.dtype else "copy"))
    if src.format != "diffusers":
        plan = Plan(src, out, items, notes=notes)
        plan.metadata[""] = {**src.metadata, **provenance(src, step, src.metadata)}
        return plan
    return _folder_plan(src, out, items, chosen, step, notes, max_shard_bytes)


def _folder_plan(src, out: Path, items: list[PlanItem], chosen: list[str], step: dict,
                 notes: list[str], max_shard_bytes: int) -> Plan:
    """diffusers folder -> diffusers folder: same component files, sharded when large."""
    plan = Plan(src, out, [], folder=True, notes=notes)
    meta = {"format": "pt", **provenance(src, step, src.metadata)}
    by_comp: dict[str, list[PlanItem]] = {}
    for it in items:
        comp, _, inner = it.key.partition("/") if "/" in it.key and src.model_index else ("", "", it.key)
        it.out_key = inner
        by_comp.setdefault(comp, []).append(it)
    for comp, its in by_comp.items():
        stem = src.components[comp][0].name.split(".")[0]
        folder = f"{comp}/" if comp else ""
        total = sum(i.out_bytes for i in its)
        shards: list[list[PlanItem]] = [[]]
        size = 0
        for it in its:
            if shards[-1] and size + it.out_bytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(it)
            size += it.out_bytes
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"{stem}.safetensors" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.safetensors"
            for it in shard:
                it.out_file = folder + name
                weight_map[it.out_key] = name
            plan.metadata[folder + name] = dict(meta)
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            plan.extra_files[f"{folder}{stem}.safetensors.index.json"] = (
                json.dumps(index, indent=2) + "\n").encode()
        plan.items.extend(its)
    plan.copies = _non_weight_files(src, set(by_comp))
    if src.model_index and set(chosen) and set(by_comp) != set(src.components):
        mi = dict(src.model_index)
        for comp in src.components:
            if comp not in by_comp:
                mi[comp] = [None, None]
                notes.append(f"component '{comp}' left out (model_index.json marks it absent)")
        plan.copies = [c for c in plan.copies if c != "model_index.json"]
        plan.extra_files["model_index.json"] = (json.dumps(mi, indent=2) + "\n").encode()
    return plan


def _non_weight_files(src, kept: set[str]) -> list[str]:
    root: Path = src.path
    dropped = set(src.components) - kept
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts and rel_dir.parts[0] in dropped:
            continue
        for fn in filenames:
            if fn.startswith(".") or fn.endswith(WEIGHT_SUFFIXES) or fn.endswith(".index.json"):
                continue
            out.append(str(rel_dir / fn) if rel_dir.parts else fn)
    return sorted(out)


def convert(input: str | os.PathLike, output: str | os.PathLike, dtype: str = "fp16", *,
            components: str | None = None, overwrite: bool = False, dry_run: bool = False,
            on_overflow: str = "clamp", detect: bool = True, variant: str | None = None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None
            ) -> ConvertResult:
    """Convert ``input`` to ``dtype``, writing ``output`` (a file, or a folder for diffusers)."""
    ctx = CastContext(on_overflow=on_overflow, path=str(input))
    cast = registry.get("cast", dtype)
    with open_source(input, variant=variant) as src:
        det = archs.detect(src) if detect else None
        plan = plan_convert(src, Path(output), dtype, det, components, max_shard_bytes)
        plan.check(overwrite)
        result = ConvertResult(plan, det)
        if dry_run:
            return result
        result.stats = execute(plan, lambda it, t: cast(it.key, t, ctx), overwrite=overwrite,
                               progress=progress,
                               chunk_fn=lambda it, start, a, b: cast_into(it.key, a, b, ctx))
        result.overflows = dict(ctx.overflows)
        if ctx.overflows:
            n = sum(ctx.overflows.values())
            worst = max(ctx.overflows, key=ctx.overflows.get)
            verb = {"clamp": "clamped to the finite range", "inf": "became inf"}[on_overflow]
            plan.notes.append(f"{n} values in {len(ctx.overflows)} tensors exceeded the "
                              f"{dtype} range and {verb} (most in '{worst}': {ctx.overflows[worst]})")
        return result
