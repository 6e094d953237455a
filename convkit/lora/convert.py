"""``convkit convert-lora``: rewrite a LoRA in the kohya, ComfyUI or diffusers/PEFT format.

Names are translated through the module table of the LoRA's architecture (the released model's
names, or those of ``base`` when given). Renames are exact; fusing q/k/v LoRAs into one
single-file LoRA stacks them (exact, rank adds up), or, when they share one down factor (a
fused LoRA split into its parts: kohya SD3/Flux qkv written as diffusers to_q/to_k/to_v),
concatenates their up factors (exact, rank kept: kohya -> diffusers -> kohya gives the input's
tensors back); splitting a fused LoRA copies its down factor (exact). The PEFT format folds alpha/rank into lora_B (same product) and cannot hold
LoHa/LoKr/Tucker/full modules or input-axis DoRA scales: those are refused, never dropped.

It runs on the engine (:mod:`convkit.engine`): the plan is made from the LoRA's header (names and
shapes) and the down factors of parts that may be joined (see above; ``dry_run`` stops there), then each output module (or group of modules that
are stacked or split together) is one item that reads its input tensors through the
logical-weights view and writes the renamed ones. The output keeps the input's ``ss_*`` and
``modelspec.*`` metadata and gets convkit's provenance (the steps of the input, this one added).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dtypes, registry
from ..casts import CastContext
from ..engine import Plan, RunStats, Src
from ..errors import UsageError, raise_all
from ..progress import Progress
from ..provenance import output_metadata
from ..sources import open_source
from .formats import LoraFile, match, read_lora, validate
from .merge import UnmatchedLoraError, guess_arch
from .table import ModuleTable, table_for_arch, table_for_source
from .write import OutModule, Piece, get_format, relabel, shared_down, write_lora

KEPT_METADATA = ("ss_", "modelspec.")     # the LoRA's own metadata that a converted file keeps


@dataclass
class ConvertLoraResult:
    output: Path
    arch: str
    format: str
    modules: int
    notes: list[str] = field(default_factory=list)
    lossless: bool = True
    plan: Plan | None = field(default=None, repr=False)
    stats: RunStats | None = field(default=None, repr=False)

    @property
    def dry_run(self) -> bool:
        return self.stats is None

    def to_dict(self) -> dict:
        d = {"output": str(self.output), "architecture": self.arch, "format": self.format,
             "modules": self.modules, "lossless": self.lossless, "notes": self.notes,
             "tensors": sum(len(i.outs) for i in self.plan.items) if self.plan else None,
             "dry_run": self.dry_run}
        if self.stats:
            d["seconds"] = round(self.stats.seconds, 3)
        return d


def lora_table(lf: LoraFile, arch: str | None, base: str | os.PathLike | None) -> ModuleTable:
    if base is not None:
        with open_source(base) as src:
            return table_for_source(src)
    if arch is None:
        guess = guess_arch(lf, exclude="")
        if guess is None:
            raise UsageError("cannot tell which architecture this LoRA is for", path=lf.path,
                             hint="pass --arch (sd15, sdxl, flux_dev, ...) or --base MODEL")
        arch = guess[0]
    return table_for_arch(arch)


def _meta_tensor(src, key: str) -> torch.Tensor:
    info = src.info(key)
    return torch.empty(info.shape, dtype=dtypes.to_torch(info.dtype), device="meta")


def out_modules(lf: LoraFile, table: ModuleTable, load: bool = False
                ) -> tuple[list[OutModule], list[dict[str, str]]]:
    """The LoRA's modules on ``table``'s units, and for each its tensor keys by role. Tensors
    are ``meta`` (shapes and dtypes only) unless ``load``."""
    mods, keys, unmatched = [], [], list(lf.stray)
    for ad in lf.adapters:
        unit = match(ad, table)
        if unit is None:
            unmatched.append(ad.ref)
            continue
        roles = {r: k for r, k in ad.keys.items() if r != "alpha"}
        tensors = {r: (lf.source.load(k) if load else _meta_tensor(lf.source, k))
                   for r, k in roles.items()}
        mods.append(OutModule(unit, ad.algo, tensors, ad.alpha))
        keys.append(roles)
    if unmatched:
        raise UnmatchedLoraError(f"{len(unmatched)} LoRA modules match no {table.arch} module: "
                                 + ", ".join(unmatched[:12]), path=lf.path)
    return mods, keys


class _Maker:
    """Builds one group's output modules from the tensors its item read."""

    def __init__(self, group: list[tuple[OutModule, dict[str, str]]], index: dict[str, int],
                 table: ModuleTable, fmt: str, shared: frozenset = frozenset()):
        self.group, self.index, self.table, self.fmt = group, index, table, fmt
        self.shared = shared

    def __call__(self, xs: list) -> list[OutModule]:
        ms = [OutModule(m.unit, m.algo, {r: xs[self.index[k]] for r, k in roles.items()},
                        m.alpha) for m, roles in self.group]
        return relabel(ms, self.table, self.fmt, self.shared)[0]


def _label(origin: tuple[int, ...], outs: list[OutModule], mods: list[OutModule],
           fold: bool) -> str:
    if len(origin) > 1:
        what = f"stack {len(origin)} -> 1 (rank {outs[0].rank})"
    elif len(outs) > 1:
        what = f"split 1 -> {len(outs)}"
    else:
        src, dst = mods[origin[0]].unit, outs[0].unit
        what = "rename" if (src.name, src.space) != (dst.name, dst.space) else "copy"
    if fold and any(m.algo == "lora" and m.alpha is not None and m.alpha != m.rank
                    for m in (mods[i] for i in origin)):
        what += ", alpha/rank folded into up"
    return what


def convert_lora(input: str | os.PathLike, output: str | os.PathLike, fmt: str, *,
                 arch: str | None = None, base: str | os.PathLike | None = None,
                 dtype: str | None = None, overwrite: bool = False, dry_run: bool = False,
                 progress: Progress | None = None) -> ConvertLoraResult:
    spec = get_format(fmt)              # unknown names fail here, with a suggestion
    cast = registry.get("cast", dtype) if dtype else None
    lf = read_lora(input)
    try:
        raise_all(validate(lf, scan=False))
        table = lora_table(lf, arch, base)
        mods, keys = out_modules(lf, table)
        algos = Counter(m.algo for m in mods)
        shared = shared_down(mods, table, fmt, lambda i: lf.source.load(keys[i]["down"]))
        relabeled, notes = relabel(mods, table, fmt, shared)
        result = ConvertLoraResult(Path(output), table.arch, fmt, len(relabeled), notes)
        if fmt == "peft" and any(m.alpha is not None and m.alpha != m.rank for m in mods
                                 if m.algo == "lora"):
            result.notes.append("alpha/rank folded into lora_B (same product; lora_B values "
                                "differ from the input's)")
        if any(m.algo == "lora" and m.alpha is None for m in mods) and fmt != "peft":
            result.notes.append("modules without alpha written with alpha = rank (same scale)")
        if fmt != "peft" and algos.get("lora") and any("magnitude" in m.tensors for m in mods):
            result.notes.append("PEFT DoRA magnitudes written as output-axis dora_scale; ComfyUI "
                                "applies the weight differently from PEFT when it is not 1")
        groups: dict[tuple[int, ...], list[OutModule]] = {}
        for m in relabeled:
            groups.setdefault(m.origin, []).append(m)
        pieces = []
        for origin, outs in groups.items():
            srcs: list[Src] = []
            index: dict[str, int] = {}
            for i in origin:
                for k in keys[i].values():
                    if k not in index:
                        index[k] = len(srcs)
                        srcs.append(Src(0, k))
            maker = _Maker([(mods[i], keys[i]) for i in origin], index, table, fmt, shared)
            pieces.append(Piece(outs, tuple(srcs), maker,
                                _label(origin, outs, mods, bool(spec.spec.get("fold_alpha")))))
        step = {"op": "convert-lora", "format": fmt, "arch": table.arch}
        if cast is not None:
            step["dtype"] = cast.name
        meta = {k: v for k, v in lf.metadata.items() if k.startswith(KEPT_METADATA)}
        meta.update(output_metadata(lf.source, step, keep_source=False))
        inputs = [lf.source] + ([Path(base)] if base is not None else [])
        ctx = CastContext(path=str(input))
        written = write_lora(output, table.arch, pieces, fmt, dtype=dtype, metadata=meta,
                             overwrite=overwrite, inputs=inputs, dry_run=dry_run,
                             command="convert-lora", progress=progress, ctx=ctx)
        result.plan, result.stats = written.plan, written.stats
        result.plan.notes += result.notes
        if ctx.overflows:
            result.notes.append(f"{sum(ctx.overflows.values())} values beyond the {cast.name} "
                                f"range were clamped ({len(ctx.overflows)} tensors)")
        return result
    finally:
        lf.close()


__all__ = ["ConvertLoraResult", "convert_lora", "lora_table", "out_modules"]
