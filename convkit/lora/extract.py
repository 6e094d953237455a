"""``convkit extract-lora``: ΔW = TUNED − BASE per module, truncated SVD in fp32 -> a LoRA.

For each module (linear, 1×1 conv; k×k convs with ``conv_rank``) the difference is factored as
``up = U·S``, ``down = Vh`` (alpha = rank, scale 1). Full SVD, or a randomized one when the rank is
small against the matrix. Modules whose relative change ‖ΔW‖/‖W‖ is below ``min_diff`` are
skipped. The relative error ‖ΔW − up·down‖/‖ΔW‖ is reported per module and in total.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import archs
from ..errors import UsageError
from ..progress import Progress
from ..sources import open_source
from .data import writers_data
from .merge import _unit_weight, quantized_problem
from .table import ModuleTable, Unit, table_for_source
from .write import OutModule, naming, write_lora

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass
class ExtractResult:
    output: Path
    arch: str
    modules: int = 0
    skipped: int = 0
    min_diff: float = 0.0
    total_error: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)       # module -> relative error
    ranks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def worst(self, n: int = 10) -> list[tuple[str, float]]:
        return sorted(self.errors.items(), key=lambda kv: -kv[1])[:n]

    def to_dict(self) -> dict:
        return {"output": str(self.output), "architecture": self.arch, "modules": self.modules,
                "skipped": self.skipped, "min_diff": self.min_diff,
                "total_error": self.total_error, "worst": dict(self.worst()),
                "ranks": self.ranks, "seconds": round(self.seconds, 3), "notes": self.notes}


def parse_dynamic(text: str | None) -> tuple[str, float] | None:
    if not text:
        return None
    name, sep, val = text.partition("=")
    if not sep or name not in DYNAMIC:
        raise UsageError(f"--dynamic takes {'|'.join(d + '=X' for d in DYNAMIC)}, got '{text}'")
    try:
        return name, float(val)
    except ValueError:
        raise UsageError(f"--dynamic value '{val}' is not a number") from None


def dynamic_rank(s: torch.Tensor, method: str, x: float, max_rank: int) -> int:
    """kohya resize_lora's rules on singular values ``s`` (descending)."""
    if method == "sv_ratio":      # keep s_i >= s_0 / x
        r = int((s >= s[0] / x).sum())
    elif method == "sv_fro":      # keep enough for x of the Frobenius norm
        c = torch.sqrt(torch.cumsum(s**2, 0) / (s**2).sum())
        r = int((c < x).sum()) + 1
    else:                         # sv_cumulative: x of the sum of singular values
        c = torch.cumsum(s, 0) / s.sum()
        r = int((c < x).sum()) + 1
    return max(1, min(r, max_rank, s.numel()))


def factor(m: torch.Tensor, rank: int, dynamic=None, clamp_quantile: float | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U·S, Vh) of rank <= ``rank`` for a 2-D fp32 matrix."""
    k = min(m.shape)
    rank = min(rank, k)
    if dynamic is None and rank * 4 < k and k >= 256:
        u, s, v = torch.svd_lowrank(m, q=min(k, rank + 16), niter=4)
        vh = v.t()
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    if dynamic is not None:
        rank = dynamic_rank(s, dynamic[0], dynamic[1], rank)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if clamp_quantile is not None:
        dist = torch.cat([up.flatten(), down.flatten()]).abs()
        if dist.numel() > 1 << 24:
            dist = dist[torch.randperm(dist.numel())[: 1 << 24]]
        hi = torch.quantile(dist, clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return up.contiguous(), down.contiguous()


class _Cached:
    """A source wrapper that keeps the last loaded tensor (fused tensors are read per part)."""

    def __init__(self, src):
        self.src, self.key, self.t = src, None, None

    def load(self, key):
        if key != self.key:
            self.key, self.t = key, self.src.load(key).float()
        return self.t


def extract_units(table: ModuleTable, fmt: str, conv: bool, components: list[str] | None
                  ) -> list[Unit]:
    skip = [re.compile(p) for p in writers_data()["extract"]["skip"]]
    arch = archs.get(table.arch)
    units = []
    for comp in table.kinds:
        if arch.components[comp].kind == "vae" or (components and comp not in components):
            continue
        space = naming(fmt, table.arch, comp)[1]
        pool = table.single_units(comp) if space == "single" else table.diffusers_units(comp)
        if space == "single":  # modules that only have diffusers names (none in practice)
            covered = {p for u in pool for p in u.parts}
            pool += [u for u in table.diffusers_units(comp) if u.parts[0] not in covered]
        for u in pool:
            if len(u.shape) not in (2, 4):
                continue
            if any(rx.search(p) for p in u.parts for rx in skip):
                continue
            if len(u.shape) == 4 and math.prod(u.shape[2:]) > 1 and not conv:
                continue
            units.append(u)
    return units


def extract_lora(tuned: str | os.PathLike, base: str | os.PathLike, output: str | os.PathLike, *,
                 rank: int = 32, conv_rank: int | None = None, dynamic: str | None = None,
                 clamp_quantile: float | None = None, min_diff: float = 1e-5,
                 fmt: str = "kohya", dtype: str = "fp16", components: list[str] | None = None,
                 overwrite: bool = False, progress: Progress | None = None) -> ExtractResult:
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UsageError("--rank and --conv-rank must be >= 1")
    dyn = parse_dynamic(dynamic)
    t0 = time.perf_counter()
    with open_source(tuned) as ts, open_source(base) as bs:
        dt, db = archs.detect(ts), archs.detect(bs)
        if dt.arch.name != db.arch.name:
            raise UsageError(f"TUNED is {dt.arch.name} but BASE is {db.arch.name}; both must be "
                             f"the same architecture")
        for s in (ts, bs):
            e = quantized_problem(s, None)
            if e:
                raise e
        tt, tb = table_for_source(ts, dt), table_for_source(bs, db)
        units = extract_units(tb, fmt, conv_rank is not None, components)
        res = ExtractResult(Path(output), db.arch.name, min_diff=min_diff)
        cb, ct = _Cached(bs), _Cached(ts)
        mods: list[OutModule] = []
        sq_err = sq_tot = 0.0
        with (progress or Progress(enabled=False)).bar(total=len(units), desc="extract") as bar:
            for u in units:
                bar.update(1)
                ut = tt.units.get((u.component, u.name))
                if ut is None or ut.shape != u.shape:
                    res.notes.append(f"{u.component}.{u.name}: not in TUNED (or another shape)")
                    continue
                wb = _unit_weight(tb, u, None, None, cb)
                d = _unit_weight(tt, ut, None, None, ct) - wb
                dn = float(d.norm())
                if dn <= min_diff * float(wb.norm()) or dn == 0.0:
                    res.skipped += 1
                    continue
                is_conv = len(u.shape) == 4 and math.prod(u.shape[2:]) > 1
                r = conv_rank if is_conv else rank
                m = d.reshape(u.shape[0], -1)
                up, down = factor(m, r, dyn, clamp_quantile)
                err = float((m - up @ down).norm())
                sq_err += err ** 2
                sq_tot += dn ** 2
                name = f"{u.component}.{u.name}"
                res.errors[name] = err / dn
                res.ranks[name] = up.shape[1]
                rk = up.shape[1]
                if len(u.shape) == 4:
                    up = up.reshape(u.shape[0], rk, 1, 1)
                    down = down.reshape(rk, *u.shape[1:])
                mods.append(OutModule(u, "lora", {"up": up, "down": down}, float(rk)))
        res.modules = len(mods)
        res.total_error = math.sqrt(sq_err / sq_tot) if sq_tot else 0.0
        if not mods:
            raise UsageError(f"TUNED and BASE differ in no module by more than {min_diff:g} "
                             f"(relative); nothing to extract",
                             hint="lower --min-diff, or check that the files differ")
        meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                "convkit.extract": f"rank={rank} conv_rank={conv_rank} dynamic={dynamic} "
                                   f"min_diff={min_diff}",
                "convkit.tuned": Path(tuned).name, "convkit.base": Path(base).name}
        if conv_rank:
            meta["ss_network_args"] = f'{{"conv_dim": "{conv_rank}", "conv_alpha": "{conv_rank}"}}'
        write_lora(output, db.arch.name, mods, fmt, dtype=dtype, metadata=meta,
                   overwrite=overwrite, inputs=[tuned, base])
    res.seconds = time.perf_counter() - t0
    return res
