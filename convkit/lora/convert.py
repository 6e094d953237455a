"""``convkit convert-lora``: rewrite a LoRA in the kohya, ComfyUI or diffusers/PEFT format.

Names are translated through the module table of the LoRA's architecture (the released model's
names, or those of ``base`` when given). Renames are exact; fusing q/k/v LoRAs into one
single-file LoRA stacks them (exact, rank adds up); splitting a fused LoRA copies its down
factor (exact). The PEFT format folds alpha/rank into lora_B (same product) and cannot hold
LoHa/LoKr/Tucker/full modules or input-axis DoRA scales: those are refused, never dropped.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError, raise_all
from ..sources import open_source
from .data import FORMATS
from .formats import LoraFile, match, read_lora, validate
from .merge import UnmatchedLoraError, guess_arch
from .table import ModuleTable, table_for_arch, table_for_source
from .write import OutModule, relabel, write_lora


@dataclass
class ConvertLoraResult:
    output: Path
    arch: str
    format: str
    modules: int
    notes: list[str] = field(default_factory=list)
    lossless: bool = True

    def to_dict(self) -> dict:
        return {"output": str(self.output), "architecture": self.arch, "format": self.format,
                "modules": self.modules, "lossless": self.lossless, "notes": self.notes}


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


def out_modules(lf: LoraFile, table: ModuleTable) -> list[OutModule]:
    mods, unmatched = [], list(lf.stray)
    for ad in lf.adapters:
        unit = match(ad, table)
        if unit is None:
            unmatched.append(ad.ref)
            continue
        tensors = {r: lf.source.load(k) for r, k in ad.keys.items() if r != "alpha"}
        mods.append(OutModule(unit, ad.algo, tensors, ad.alpha))
    if unmatched:
        raise UnmatchedLoraError(f"{len(unmatched)} LoRA modules match no {table.arch} module: "
                                 + ", ".join(unmatched[:12]), path=lf.path)
    return mods


def convert_lora(input: str | os.PathLike, output: str | os.PathLike, fmt: str, *,
                 arch: str | None = None, base: str | os.PathLike | None = None,
                 dtype: str | None = None, overwrite: bool = False) -> ConvertLoraResult:
    if fmt not in FORMATS:
        from ..errors import UnknownNameError
        raise UnknownNameError("LoRA format", fmt, FORMATS)
    lf = read_lora(input)
    try:
        raise_all(validate(lf, scan=False))
        table = lora_table(lf, arch, base)
        mods = out_modules(lf, table)
        algos = Counter(m.algo for m in mods)
        relabeled, notes = relabel(mods, table, fmt)
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
        meta = {k: v for k, v in lf.metadata.items() if k.startswith(("ss_", "modelspec."))}
        meta["convkit.source"] = Path(input).name
        write_lora(output, table.arch, relabeled, fmt, dtype=dtype, metadata=meta,
                   overwrite=overwrite, inputs=[input])
        return result
    finally:
        lf.close()
