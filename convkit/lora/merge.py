"""``convkit merge-lora``: add LoRA/LyCORIS deltas into a base checkpoint, one tensor at a time.

Each base tensor is read, every delta that targets it (ΔW·alpha/rank·weight, in fp32, in the order
the LoRAs were given) is added, and the result is cast and written. Only one base tensor and the
LoRA factors it needs are in memory at a time.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import archs, registry, sampling
from ..casts import CastContext
from ..convert import plan_convert
from ..errors import ConvkitError, UsageError, raise_all
from ..engine import Plan, RunStats, execute
from ..provenance import output_metadata, safe_name
from ..progress import Progress
from ..sources import open_source
from . import adapters as A
from .formats import Adapter, LoraFile, check_shape, match, read_lora, validate
from .lowrank import LowRank, add_lowrank_
from .rows import MergeOp
from .table import ModuleTable, Unit, table_for_source

SANE_WEIGHT = 2.0
# key map transforms that only reorder a tensor's output rows (applied to a LoRA's up factor)
_ROW_ORDER = (None, "swap_halves")


class UnmatchedLoraError(ConvkitError, KeyError):
    """LoRA modules that target nothing in the base."""

    exit_code = 3

    def __str__(self) -> str:
        return self._compose()


@dataclass
class LoraSpec:
    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: "str | os.PathLike | LoraSpec | tuple") -> "LoraSpec":
        if isinstance(text, LoraSpec):
            return text
        if isinstance(text, tuple):
            return cls(Path(text[0]), float(text[1]))
        s = str(text)
        head, sep, tail = s.rpartition(":")
        if sep and head and not Path(s).exists():
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                raise UsageError(f"cannot read the LoRA weight in '{s}' (use PATH:WEIGHT, e.g. "
                                 f"lora.safetensors:0.8)") from None
        return cls(Path(s), 1.0)


@dataclass
class LoraReport:
    path: str
    weight: float
    modules: int = 0                       # modules of the base this LoRA changes
    adapters: int = 0
    unmatched: list[str] = field(default_factory=list)
    algos: dict[str, int] = field(default_factory=dict)
    alpha_defaulted: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Patch:
    lf: LoraFile
    ad: Adapter
    unit: Unit
    strength: float
    bias: bool = False


@dataclass
class MergeResult:
    plan: Plan
    detection: archs.Detection
    loras: list[LoraReport]
    stats: RunStats | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {"output": str(self.plan.out), "architecture": self.detection.arch.name,
             "layout": self.detection.layout.name, "tensors": len(self.plan.items),
             "merged_tensors": sum(1 for i in self.plan.items if i.action.startswith("merge")),
             "loras": [r.to_dict() for r in self.loras], "notes": self.notes,
             "dry_run": self.stats is None}
        if self.stats:
            d["seconds"] = round(self.stats.seconds, 3)
        return d


def quantized_problem(src, dtype: str | None) -> ConvkitError | None:
    q = Counter(i.stored_as for i in src.infos()
                if i.stored_as != i.dtype or i.stored_as.startswith("F8"))
    if not q:
        return None
    kinds = ", ".join(f"{k} ({n})" for k, n in q.most_common(3))
    if dtype is None:
        return UsageError(f"base is quantized ({kinds}); a LoRA cannot be added to quantized "
                          f"weights", path=src.path,
                          hint="dequantize first (convkit convert BASE base-fp16.safetensors "
                               "--dtype fp16) or pass --dtype fp16/bf16 to dequantize while merging")
    return None


def collect_patches(table: ModuleTable, loras: list[tuple[LoraSpec, LoraFile]],
                    allow_unmatched: bool) -> tuple[dict[str, list[Patch]], list[LoraReport]]:
    patches: dict[str, list[Patch]] = {}
    reports = []
    problems: list[ConvkitError] = []
    for spec, lf in loras:
        rep = LoraReport(str(spec.path), spec.weight, adapters=len(lf.adapters),
                         algos=dict(lf.algos()))
        problems += validate(lf)
        if not (-SANE_WEIGHT <= spec.weight <= SANE_WEIGHT):
            rep.notes.append(f"weight {spec.weight:g} is outside the usual range "
                             f"[-{SANE_WEIGHT:g}, {SANE_WEIGHT:g}]; the result may be broken")
        if spec.weight == 0:
            rep.notes.append("weight 0: this LoRA changes nothing")
        unmatched, shape_bad = list(lf.stray), []
        for ad in lf.adapters:
            unit = match(ad, table)
            if unit is None:
                unmatched.append(ad.ref)
                continue
            why = check_shape(ad, lf, unit)
            if why:
                shape_bad.append(f"{ad.ref}: {why}")
                continue
            if ad.alpha is None and ad.algo in ("lora", "loha"):
                rep.alpha_defaulted += 1
            rep.modules += 1
            for loc in table.unit_weight_locs(unit):
                lst = patches.setdefault(loc.key, [])
                if not lst or lst[-1].ad is not ad:
                    lst.append(Patch(lf, ad, unit, spec.weight))
            if "diff_b" in ad.keys:
                for part in unit.parts:
                    bl = table.bias_loc(unit, part)
                    if bl is not None:
                        patches.setdefault(bl.key, []).append(Patch(lf, ad, unit, spec.weight, True))
        if rep.alpha_defaulted:
            rep.notes.append(f"{rep.alpha_defaulted} modules have no alpha; alpha = rank "
                             f"(scale 1) was used")
        rep.unmatched = unmatched
        if shape_bad or (unmatched and not allow_unmatched) or rep.modules == 0:
            names, n = arch_candidates(lf, exclude=table.arch)
            if names and (shape_bad or len(unmatched) > rep.modules):
                problems.append(UsageError(
                    f"this LoRA is for {' or '.join(names)} ({n} of {len(lf.adapters)} modules "
                    f"match {'its' if len(names) == 1 else 'their'} names), the base is "
                    f"{table.arch}", path=spec.path,
                    hint="use a LoRA made for the base's architecture"))
                reports.append(rep)
                continue
        if shape_bad:
            problems.append(UsageError(f"{len(shape_bad)} LoRA modules do not fit the base "
                                       f"{table.arch} weights: " + "; ".join(shape_bad[:5]),
                                       path=spec.path))
        if unmatched and not allow_unmatched:
            problems.append(UnmatchedLoraError(
                f"{len(unmatched)} of {len(lf.adapters) + len(lf.stray)} LoRA modules match no "
                f"{table.arch} module: " + ", ".join(unmatched[:12]) +
                (" ..." if len(unmatched) > 12 else ""), path=spec.path,
                hint="pass --allow-unmatched to merge the rest"))
        elif unmatched:
            rep.notes.append(f"{len(unmatched)} modules matched nothing and were skipped "
                             f"(first: {unmatched[0]})")
        reports.append(rep)
    raise_all(problems)
    return patches, reports


def guess_arch(lf: LoraFile, exclude: str) -> tuple[str, int] | None:
    """The architecture whose module names match most adapters (the first of
    :func:`arch_candidates`) and how many match, or None."""
    names, n = arch_candidates(lf, exclude)
    return (names[0], n) if names else None


def arch_candidates(lf: LoraFile, exclude: str) -> tuple[list[str], int]:
    """The architectures (not ``exclude``) whose module names match most adapters, and how
    many. A tie on names (SD3 medium / SD3.5 medium / SD3.5 large share their module names up
    to the depth) is broken by how many adapters fit the released model's weight shapes. A
    variant (``variant_of``: sd35_large_turbo) is not looked at unless its base is
    ``exclude``: it has its base's names and shapes."""
    from .table import table_for_arch

    counts: dict[str, int] = {}
    tables = {}
    every = archs.load_all()
    for name, spec in every.items():
        if name == exclude or spec.variant_of in every and spec.variant_of != exclude:
            continue            # a variant matches what its base matches
        try:
            t = table_for_arch(name)
        except Exception:  # pragma: no cover - a broken arch file must not hide the real error
            continue
        n = 0
        for ad in lf.adapters:
            saved = ad.unit
            try:
                n += match(ad, t) is not None
            except ConvkitError:
                pass
            ad.unit = saved
        if n:
            counts[name], tables[name] = n, t
    if not counts:
        return [], 0
    best = max(counts.values())
    tied = [a for a, n in counts.items() if n == best]
    if len(tied) > 1:
        fits = {a: _shape_fits(lf, tables[a]) for a in tied}
        tied = [a for a in tied if fits[a] == max(fits.values())]
    return tied, best


def _shape_fits(lf: LoraFile, table: ModuleTable) -> int:
    n = 0
    for ad in lf.adapters:
        saved = ad.unit
        try:
            u = match(ad, table)
            n += u is not None and check_shape(ad, lf, u) is None
        except ConvkitError:
            pass
        ad.unit = saved
    return n


# ----------------------------------------------------------------- streaming application

def _unit_weight(table: ModuleTable, unit: Unit, key: str, w: torch.Tensor, src) -> torch.Tensor:
    """The unit's current weight in the unit's own form (fp32)."""
    parts = []
    for loc in table.unit_weight_locs(unit):
        t = w if loc.key == key else src.load(loc.key).float()
        if loc.rows:
            t = t[loc.rows[0]:loc.rows[1]]
        parts.append(A.to_diffusers(loc.transform, t).reshape(loc.dshape))
    d = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    return A.to_base(unit.transform, d) if unit.space == "single" else d


def apply_patch(table: ModuleTable, p: Patch, key: str, w: torch.Tensor, src) -> None:
    unit = p.unit
    locs = table.unit_weight_locs(unit)
    if p.bias:
        start = 0
        for part, size in zip(unit.parts, unit.sizes):
            bl = table.bias_loc(unit, part)
            if bl is not None and bl.key == key:
                d = A.bias_delta(p.ad, p.lf)[start:start + size]
                tgt = w[bl.rows[0]:bl.rows[1]] if bl.rows else w
                tgt += p.strength * d.reshape(tgt.shape)
            start += size
        return
    mine = [i for i, loc in enumerate(locs) if loc.key == key]
    offsets = [sum(unit.sizes[:i]) for i in range(len(unit.sizes) + 1)]
    if p.ad.is_fused_lora and not p.ad.dora and not unit.transform \
            and all(locs[i].transform in (None, "conv1x1") for i in mine):
        # fast path: W[rows] += (alpha/r·weight) · up[rows] @ down, in place
        lr = LowRank(p.lf.load(p.ad, "up"), p.lf.load(p.ad, "down"))
        s = p.ad.scale(p.lf.source) * p.strength
        for i in mine:
            loc = locs[i]
            tgt = w[loc.rows[0]:loc.rows[1]] if loc.rows else w
            rows = slice(offsets[i], offsets[i + 1]) if len(locs) > 1 else None
            add_lowrank_(tgt.view(tgt.shape[0], -1), lr, s, rows)
        return
    if p.ad.is_fused_lora and not p.ad.dora and unit.transform in _ROW_ORDER \
            and all(locs[i].transform in _ROW_ORDER + ("conv1x1",) for i in mine):
        # halves swapped (SD3/Flux adaLN scale/shift): a reordering of output rows, done on
        # the up factor; the product is then the fast path's, on the rows in the base's order,
        # so a LoRA gives the same bits whichever naming it was written in
        up, down = p.lf.load(p.ad, "up"), p.lf.load(p.ad, "down")
        if unit.space == "single":
            up = A.to_diffusers(unit.transform, up)
        s = p.ad.scale(p.lf.source) * p.strength
        for i in mine:
            loc = locs[i]
            tgt = w[loc.rows[0]:loc.rows[1]] if loc.rows else w
            u = up[offsets[i]:offsets[i + 1]] if len(locs) > 1 else up
            if loc.transform in _ROW_ORDER:
                u = A.to_base(loc.transform, u)
            add_lowrank_(tgt.view(tgt.shape[0], -1), LowRank(u, down), s)
        return
    if p.ad.dora:
        wu = _unit_weight(table, unit, key, w, src)
        d = A.delta(p.ad, p.lf, unit)
        full = A.dora_weight(p.ad, p.lf, wu, d, p.strength) - wu
        strength = 1.0
    else:
        full = None
        strength = p.strength
    simple_rows = unit.space == "diffusers" or unit.transform is None
    if full is None and not (p.ad.algo == "lora" and simple_rows):
        full = A.delta(p.ad, p.lf, unit)
    if full is not None and unit.space == "single":
        full = A.to_diffusers(unit.transform, full)
    for i in mine:
        loc = locs[i]
        rows = slice(offsets[i], offsets[i + 1])
        if full is not None:
            pd = full[rows] if len(locs) > 1 else full
        else:
            pd = A.delta(p.ad, p.lf, unit, rows if len(locs) > 1 else None)
        tgt = w[loc.rows[0]:loc.rows[1]] if loc.rows else w
        b = A.to_base(loc.transform, pd.reshape(loc.dshape))
        tgt += strength * b.reshape(tgt.shape)


def merge_lora(base: str | os.PathLike, loras, output: str | os.PathLike, *,
               dtype: str | None = None, allow_unmatched: bool = False, overwrite: bool = False,
               dry_run: bool = False, on_overflow: str = "clamp", variant: str | None = None,
               progress: Progress | None = None) -> MergeResult:
    """Merge ``loras`` (paths, ``"path:weight"`` strings, (path, weight) or LoraSpec) into
    ``base``; write ``output`` (a file for a single file, a folder for a diffusers folder).

    The base is read through the logical-weights view: a quantized base (fp8, scaled fp8,
    NF4, GGUF, ...) is dequantized first when ``dtype`` is given (and refused without it)."""
    specs = [LoraSpec.parse(x) for x in loras]
    if not specs:
        raise UsageError("give at least one LoRA")
    if dtype is not None:
        registry.get("cast", dtype)  # raises with a suggestion
    files: list[tuple[LoraSpec, LoraFile]] = []
    try:
        with open_source(base, variant=variant) as src:
            det = archs.detect(src)
            raise_all([e for e in [quantized_problem(src, dtype)] if e])
            table = table_for_source(src, det)
            for s in specs:
                files.append((s, read_lora(s.path)))
            patches, reports = collect_patches(table, files, allow_unmatched)
            ctx = CastContext(on_overflow=on_overflow, path=str(base))
            plan = plan_convert(src, Path(output), dtype or "fp32", det, ctx=ctx)
            plan.command = "merge-lora"
            op = MergeOp(table, patches, ctx, src, apply_patch)
            for it in plan.items:
                if dtype is None:
                    it.outs[0].dtype = it.src_dtype
                it.op = op
            step = {"op": "merge-lora", "loras": [{"file": safe_name(s.path), "weight": s.weight}
                                                  for s in specs]}
            if dtype:
                step["dtype"] = registry.get("cast", dtype).name
            # a LoRA that says how its merge samples (convkit.sampler / convkit.prediction,
            # e.g. one extracted from a 1-step model) says it for the merge
            meta = output_metadata(src, step, facts_from=[lf.metadata for s, lf in files
                                                          if s.weight])
            for f in plan.files.values():
                f.metadata = {"format": "pt", **meta} if plan.folder else dict(meta)
            if plan.folder:
                sampling.patch_folder(plan.folders[""], meta, plan.notes)
            plan.check(overwrite)
            result = MergeResult(plan, det, reports)
            for r in reports:
                result.notes += [f"{Path(r.path).name}: {n}" for n in r.notes]
            result.notes += plan.notes
            if dry_run:
                return result
            result.stats = execute(plan, overwrite=overwrite, progress=progress)
            if ctx.overflows:
                result.notes.append(f"{sum(ctx.overflows.values())} values beyond the "
                                    f"{dtype} range were {on_overflow}ed")
            return result
    finally:
        for _, lf in files:
            lf.close()
