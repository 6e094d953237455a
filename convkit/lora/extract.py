"""``convkit extract-lora``: ΔW = TUNED − BASE per module, truncated SVD in fp32 -> a LoRA.

For each module (linear, 1×1 conv; k×k convs with ``conv_rank``) the difference is factored as
``up = U·S``, ``down = Vh`` (alpha = rank, scale 1). Full SVD, or a randomized one when the rank is
small against the matrix. Modules whose relative change ‖ΔW‖/‖W‖ is below ``min_diff`` are
skipped. The relative error ‖ΔW − up·down‖/‖ΔW‖ is reported per module and in total.
"""
from __future__ import annotations

import math
import os
import queue
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import archs, dtypes
from ..casts import CAST_TARGET
from ..errors import UsageError
from ..progress import Progress
from ..sources import open_source
from .data import writers_data
from .merge import _unit_weight, quantized_problem
from .svd import SVD_METHODS, factor, residual
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
    svd: str = "auto"
    sq_err: float = field(default=0.0, repr=False)
    sq_tot: float = field(default=0.0, repr=False)

    def worst(self, n: int = 10) -> list[tuple[str, float]]:
        return sorted(self.errors.items(), key=lambda kv: -kv[1])[:n]

    def to_dict(self) -> dict:
        return {"output": str(self.output), "architecture": self.arch, "modules": self.modules,
                "skipped": self.skipped, "min_diff": self.min_diff,
                "total_error": self.total_error, "worst": dict(self.worst()),
                "ranks": self.ranks, "seconds": round(self.seconds, 3), "svd": self.svd,
                "notes": self.notes}


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


class _Cached:
    """A source wrapper that keeps the last loaded tensor (fused tensors are read per part)."""

    def __init__(self, src):
        self.src, self.key, self.t = src, None, None

    def load(self, key):
        if key != self.key:
            self.key, self.t = key, self.src.load(key).float()
        return self.t


def _direct_key(table: ModuleTable, unit: Unit, src) -> str | None:
    """The base tensor holding exactly this unit's weight, stored as plain fp32 (readable
    straight into a buffer), or None (fused rows, transposes, other dtypes: _unit_weight)."""
    locs = table.unit_weight_locs(unit)
    if len(locs) != 1 or locs[0].rows or locs[0].transform not in (None, "conv1x1") \
            or unit.transform not in (None, "conv1x1") or not src.supports_ranges:
        return None
    info = src.info(locs[0].key)
    if info.dtype != "F32" or info.nbytes != math.prod(unit.shape) * 4 \
            or getattr(info, "stored_as", "F32") != "F32":
        return None
    return locs[0].key


class _Buffers:
    """Reusable fp32 (base, tuned) buffer pairs: the reader takes one, the SVD side gives it
    back. Two pairs circulate (one being read, one being factored); no per-module allocation."""

    def __init__(self, elems: int):
        self.elems, self.free = elems, queue.SimpleQueue()

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            return (torch.empty(self.elems, dtype=torch.float32),
                    torch.empty(self.elems, dtype=torch.float32))

    def give(self, pair) -> None:
        if pair is not None:
            self.free.put(pair)


def read_ahead(fn, items):
    """Yield ``fn(item)`` for each item, computing the next one in a helper thread meanwhile
    (reading the next module's weights overlaps the SVD of this one; one module ahead)."""
    from concurrent.futures import ThreadPoolExecutor

    if not items:
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convkit-extract-reader")
    try:
        nxt = pool.submit(fn, items[0])
        for i in range(len(items)):
            got = nxt.result()
            nxt = pool.submit(fn, items[i + 1]) if i + 1 < len(items) else None
            yield got
            del got
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


def _extract_one(u: Unit, wb: torch.Tensor, wt: torch.Tensor, res: ExtractResult, rank: int,
                 conv_rank, dyn, clamp_quantile, svd: str, min_diff: float, keep, in_place: bool
                 ) -> OutModule | None:
    """Factor one module's ΔW = wt − wb (into wt's storage when ``in_place``)."""
    bn = float(wb.norm())
    d = wt.sub_(wb) if in_place else wt - wb
    dn = float(d.norm())
    if dn <= min_diff * bn or dn == 0.0:
        res.skipped += 1
        return None
    is_conv = len(u.shape) == 4 and math.prod(u.shape[2:]) > 1
    m = d.reshape(u.shape[0], -1)
    up, down = factor(m, conv_rank if is_conv else rank, dyn, clamp_quantile, svd)
    err = residual(m, up, down, dn, clamp_quantile is None)
    name = f"{u.component}.{u.name}"
    res.errors[name] = err / dn
    res.sq_err += err ** 2
    res.sq_tot += dn ** 2
    rk = res.ranks[name] = up.shape[1]
    if keep is not None:            # the output dtype now: half the memory until written
        up, down = up.to(keep), down.to(keep)
    if len(u.shape) == 4:
        up = up.reshape(u.shape[0], rk, 1, 1)
        down = down.reshape(rk, *u.shape[1:])
    return OutModule(u, "lora", {"up": up, "down": down}, float(rk))


def extract_lora(tuned: str | os.PathLike, base: str | os.PathLike, output: str | os.PathLike, *,
                 rank: int = 32, conv_rank: int | None = None, dynamic: str | None = None,
                 clamp_quantile: float | None = None, min_diff: float = 1e-5,
                 fmt: str = "kohya", dtype: str = "fp16", components: list[str] | None = None,
                 svd: str = "auto", overwrite: bool = False, progress: Progress | None = None
                 ) -> ExtractResult:
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UsageError("--rank and --conv-rank must be >= 1")
    if svd not in SVD_METHODS:
        raise UsageError(f"--svd must be one of {', '.join(SVD_METHODS)}, got '{svd}'")
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
        res = ExtractResult(Path(output), db.arch.name, min_diff=min_diff, svd=svd)
        cb, ct = _Cached(bs), _Cached(ts)
        mods: list[OutModule] = []
        direct = {}
        for u in units:
            ut = tt.units.get((u.component, u.name))
            if ut is not None and ut.shape == u.shape:
                kb, kt = _direct_key(tb, u, bs), _direct_key(tt, ut, ts)
                direct[u] = (kb, kt) if kb and kt else None
        bufs = _Buffers(max((math.prod(u.shape) for u, k in direct.items() if k), default=0))
        keep = dtypes.to_torch(CAST_TARGET[dtype]) if dtype in CAST_TARGET else None

        def pair(u: Unit):
            """(unit, (base, tuned) fp32, buffer pair or None), or (unit, note, None); runs in
            the read-ahead thread."""
            if u not in direct:
                return u, f"{u.component}.{u.name}: not in TUNED (or another shape)", None
            if direct[u] is None:
                ut = tt.units[(u.component, u.name)]
                return u, (_unit_weight(tb, u, None, None, cb),
                           _unit_weight(tt, ut, None, None, ct)), None
            n = math.prod(u.shape)
            got = bufs.take()
            wb, wt = got[0][:n], got[1][:n]
            bs.read_range(direct[u][0], 0, wb.view(torch.uint8))
            ts.read_range(direct[u][1], 0, wt.view(torch.uint8))
            return u, (wb, wt), got

        with (progress or Progress(enabled=False)).bar(total=len(units), desc="extract") as bar:
            for u, got, held in read_ahead(pair, units):
                bar.update(1)
                if isinstance(got, str):
                    res.notes.append(got)
                    continue
                try:
                    mod = _extract_one(u, *got, res, rank, conv_rank, dyn, clamp_quantile, svd,
                                       min_diff, keep, in_place=held is not None)
                finally:
                    del got
                    bufs.give(held)
                if mod is not None:
                    mods.append(mod)
        res.modules = len(mods)
        res.total_error = math.sqrt(res.sq_err / res.sq_tot) if res.sq_tot else 0.0
        if not mods:
            raise UsageError(f"TUNED and BASE differ in no module by more than {min_diff:g} "
                             f"(relative); nothing to extract",
                             hint="lower --min-diff, or check that the files differ")
        meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                "convkit.extract": f"rank={rank} conv_rank={conv_rank} dynamic={dynamic} "
                                   f"min_diff={min_diff} svd={svd}",
                "convkit.tuned": Path(tuned).name, "convkit.base": Path(base).name}
        if conv_rank:
            meta["ss_network_args"] = f'{{"conv_dim": "{conv_rank}", "conv_alpha": "{conv_rank}"}}'
        write_lora(output, db.arch.name, mods, fmt, dtype=dtype, metadata=meta,
                   overwrite=overwrite, inputs=[tuned, base])
    res.seconds = time.perf_counter() - t0
    return res
