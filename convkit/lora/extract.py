"""``convkit extract-lora``: ΔW = TUNED − BASE per module, truncated SVD in fp32 -> a LoRA.

For each module (linear, 1×1 conv and k×k conv) the difference is factored as ``up = U·S``,
``down = Vh`` (alpha = rank, scale 1): k×k convs as kohya LoCon / ComfyUI read them, ``down``
(r, in, k, k) and ``up`` (out, r, 1, 1), at ``conv_rank`` (default: ``rank``; 0 leaves them out).
Full SVD, or a randomized one when the rank is small against the matrix. Modules whose relative
change ‖ΔW‖/‖W‖ is below ``min_diff`` are skipped.

Both inputs are read through the logical-weights view (a quantized TUNED or BASE is decoded: ΔW
is the difference of the dequantized weights) by the engine (:mod:`convkit.engine`), in two
plans:

1. *read and factor*: one item per module (or per group of modules that share a stored tensor,
   e.g. q/k/v in OpenCLIP's ``in_proj_weight``) reads its tensors from both inputs, whole, into a
   worker's buffers, and factors ΔW in that worker; the factors stay in memory (they are small).
   Every other tensor that differs is read in chunks for its ‖ΔW‖² only, to report what the LoRA
   leaves out. No file is written.
2. *write*: the factors as a LoRA file in the chosen format (:func:`convkit.lora.write.plan_lora`).

Everything that differs is accounted for: the relative error ‖ΔW − up·down‖/‖ΔW‖ is reported per
module, over the extracted modules, and in total over the whole model difference, where the part
no LoRA module carries counts in full; what was left out is listed by reason with its share of
‖ΔW‖² (:data:`LEFT_OUT`).
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import archs, dtypes, registry
from ..engine import Item, Plan, RunStats, Src, execute
from ..engine.ops import Op
from ..errors import TensorValueError, UsageError, raise_all
from ..progress import Progress
from ..provenance import output_metadata, safe_name
from ..sources import open_source
from ..writer import check_output
from .adapters import to_diffusers
from .data import writers_data
from .merge import _unit_weight
from .svd import SVD_METHODS, factor, residual
from .table import Loc, ModuleTable, Unit, table_for_source
from .write import OutModule, get_format, naming, write_lora

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")

#: why a part of TUNED − BASE is not in the LoRA (report order)
LEFT_OUT = {
    "unchanged": "modules changed less than --min-diff (‖ΔW‖/‖W‖)",
    "conv": "k×k convs left out by --conv-rank 0",
    "not-lora": "tensors no LoRA module carries (norms, biases, embeddings, conv_in/conv_out, "
                "...)",
    "vae": "VAE (LoRAs do not carry VAE weights)",
    "unselected": "components not selected (--components)",
    "other": "tensors outside the architecture's components",
}


@dataclass
class LeftOut:
    """One reason's part of the difference: tensors (modules for ``unchanged``) and Σ‖ΔW‖²."""

    reason: str
    tensors: int = 0
    sq: float = 0.0
    examples: list[str] = field(default_factory=list)

    def add(self, name: str, sq: float) -> None:
        self.tensors += 1
        self.sq += sq
        if len(self.examples) < 3:
            self.examples.append(name)


@dataclass
class ExtractResult:
    output: Path
    arch: str
    modules: int = 0
    skipped: int = 0                 # modules below --min-diff
    min_diff: float = 0.0
    total_error: float = 0.0         # ‖ΔW_total − Σ up·down‖/‖ΔW_total‖ over all that differs
    modules_error: float = 0.0       # the same over the extracted modules only
    errors: dict[str, float] = field(default_factory=dict)       # module -> relative error
    ranks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    svd: str = "auto"
    rank: int = 0
    conv_rank: int = 0               # effective rank of k×k convs (0: left out)
    left_out: dict[str, LeftOut] = field(default_factory=dict)
    plan: Plan | None = field(default=None, repr=False)         # 1: read and factor
    write_plan: Plan | None = field(default=None, repr=False)   # 2: write the LoRA
    stats: RunStats | None = field(default=None, repr=False)
    sq_err: float = field(default=0.0, repr=False)
    sq_tot: float = field(default=0.0, repr=False)

    @property
    def dry_run(self) -> bool:
        return self.stats is None

    @property
    def sq_left(self) -> float:
        return sum(v.sq for v in self.left_out.values())

    @property
    def sq_all(self) -> float:
        """‖TUNED − BASE‖² over every tensor both have."""
        return self.sq_tot + self.sq_left

    def share(self, reason: str) -> float:
        lo = self.left_out.get(reason)
        return lo.sq / self.sq_all if lo and self.sq_all else 0.0

    def worst(self, n: int = 10) -> list[tuple[str, float]]:
        return sorted(self.errors.items(), key=lambda kv: -kv[1])[:n]

    def left_out_dict(self) -> dict:
        return {r: {"tensors": v.tensors, "share": self.share(r), "what": LEFT_OUT[r],
                    "examples": v.examples}
                for r, v in self.left_out.items() if v.tensors}

    def to_dict(self) -> dict:
        return {"output": str(self.output), "architecture": self.arch, "modules": self.modules,
                "skipped": self.skipped, "min_diff": self.min_diff, "rank": self.rank,
                "conv_rank": self.conv_rank, "total_error": self.total_error,
                "modules_error": self.modules_error, "left_out": self.left_out_dict(),
                "worst": dict(self.worst()), "ranks": self.ranks,
                "seconds": round(self.seconds, 3), "svd": self.svd, "notes": self.notes,
                "dry_run": self.dry_run}

    def summary_lines(self, worst: int = 8) -> list[str]:
        """The report the CLI prints."""
        if self.dry_run:
            return [f"dry run: {self.plan.format(limit=40) if self.plan else ''}"]
        conv = f"k×k convs rank {self.conv_rank}" if self.conv_rank else "k×k convs left out"
        lines = [(f"wrote {self.output}: {self.modules} modules (rank {self.rank}, {conv}), "
                  f"{self.skipped} skipped as unchanged (‖ΔW‖/‖W‖ < {self.min_diff:g}), "
                  f"{self.seconds:.1f} s"),
                 (f"relative error ‖ΔW − BA‖/‖ΔW‖ over the whole difference: "
                  f"{self.total_error:.3e} (extracted modules alone: {self.modules_error:.3e})")]
        left = {r: d for r, d in self.left_out_dict().items() if self.left_out[r].sq > 0}
        if left:
            lines.append("left out (share of ‖ΔW‖² of the whole difference):")
            for d in left.values():
                lines.append(f"  {d['share']:8.3%}  {d['tensors']:5d} {d['what']} "
                             f"(e.g. {', '.join(d['examples'][:2])})")
        else:
            lines.append("left out: nothing that differs")
        if self.errors:
            lines.append("worst modules:")
            lines += [f"  {e:.3e}  {n} (rank {self.ranks[n]})" for n, e in self.worst(worst)]
        lines += [f"note: {n}" for n in self.notes[:10]]
        return lines


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


# ----------------------------------------------------------------- which modules

def is_kxk(u: Unit) -> bool:
    return len(u.shape) == 4 and math.prod(u.shape[2:]) > 1


def _is_vae(arch: archs.Arch, comp: str | None) -> bool:
    return comp in arch.components and arch.components[comp].kind == "vae"


def select_units(table: ModuleTable, fmt: str, components: list[str] | None = None
                 ) -> list[Unit]:
    """Every module extract-lora factors (k×k convs included), in the naming space of
    ``fmt``: 2-D and 4-D weights of the selected components except the VAE and the modules
    of writers.toml ``[extract] skip``."""
    skip = [re.compile(p) for p in writers_data()["extract"]["skip"]]
    arch = archs.get(table.arch)
    units = []
    for comp in table.kinds:
        if _is_vae(arch, comp) or (components and comp not in components):
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
            units.append(u)
    return units


def extract_units(table: ModuleTable, fmt: str, conv: bool = True,
                  components: list[str] | None = None) -> list[Unit]:
    """:func:`select_units`, without the k×k convs unless ``conv``."""
    return [u for u in select_units(table, fmt, components) if conv or not is_kxk(u)]


# ----------------------------------------------------------------- phase 1: read and factor

@dataclass(frozen=True, eq=False)
class _Job:
    unit: Unit          # BASE's unit (names as the output format wants)
    tunit: Unit         # the same module in TUNED
    rank: int


class _Given:
    """The tensors an item read, by key, where :func:`merge._unit_weight` expects a source."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def load(self, key: str) -> torch.Tensor:
        return self.tensors[key]


class _Acc:
    """What phase 1 finds (results of all workers, under a lock)."""

    def __init__(self, res: ExtractResult, *, dyn, clamp_quantile, svd: str, keep,
                 paths: tuple[str, str]):
        self.res, self.dyn, self.clamp, self.svd, self.keep = res, dyn, clamp_quantile, svd, keep
        self.paths = paths
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id(unit) -> (up, down)
        self.partial: dict[int, float] = {}                                # id(item) -> Σ so far
        self.nonfinite: list[str] = []
        self.units: list[Unit] = []         # the modules factored, in the table's order
        self.lock = threading.Lock()

    def factor(self, job: _Job, m: torch.Tensor, bn: float, min_diff: float) -> None:
        """Factor one module's ΔW ``m`` (2-D fp32, overwritten); ``bn`` = ‖W_base‖."""
        u = job.unit
        name = f"{u.component}.{u.name}"
        dn = float(m.norm())
        if not math.isfinite(dn):
            raise TensorValueError("TUNED − BASE holds NaN/Inf in this module", path=self.paths[0],
                                   key=name, hint="check both inputs (convkit inspect --scan)")
        if dn <= min_diff * bn or dn == 0.0:
            with self.lock:
                self.res.skipped += 1
                self.res.left_out["unchanged"].add(name, dn * dn)
            return
        up, down = factor(m, job.rank, self.dyn, self.clamp, self.svd)
        err = residual(m, up, down, dn, self.clamp is None)
        rk = up.shape[1]
        if self.keep is not None:       # the output dtype now: half the memory until written
            up, down = up.to(self.keep), down.to(self.keep)
        # a row slice of Vh keeps all of Vh alive: keep only the rows
        if down.untyped_storage().nbytes() > down.numel() * down.element_size():
            down = down.clone()
        if len(u.shape) == 4:
            up = up.reshape(u.shape[0], rk, 1, 1)
            down = down.reshape(rk, *u.shape[1:])
        with self.lock:
            self.res.errors[name] = err / dn
            self.res.sq_err += err * err
            self.res.sq_tot += dn * dn
            self.res.ranks[name] = rk
            self.factors[id(u)] = (up, down)

    def add_partial(self, it: Item, s: float) -> None:
        with self.lock:
            self.partial[id(it)] = self.partial.get(id(it), 0.0) + s

    def left_done(self, it: Item) -> None:
        with self.lock:
            s = self.partial.pop(id(it), 0.0)
            if not math.isfinite(s):
                self.nonfinite.append(it.key)
            elif s > 0:
                self.res.left_out[it.extra["reason"]].add(it.extra.get("name", it.key), s)


class SvdOp(Op):
    """ΔW of one module (or of modules that share stored tensors) from the values read, then its
    truncated SVD; the factors go to the accumulator, nothing is written."""

    name = "svd"

    def __init__(self, acc: _Acc, tables: tuple[ModuleTable, ModuleTable], min_diff: float):
        self.acc, self.tables, self.min_diff = acc, tables, min_diff

    def granule(self, it) -> int:
        # a direct pair is read as one range: whole tensors into the worker's reusable buffers
        return math.prod(it.shape) if it.extra["direct"] else 0

    def describe(self, it) -> str:
        jobs = it.extra["jobs"]
        ranks = "/".join(str(r) for r in sorted({j.rank for j in jobs}))
        many = f", {len(jobs)} modules" if len(jobs) > 1 else ""
        return f"ΔW -> SVD rank {ranks}{many}"

    def run(self, it, worker, start, count, xs):
        # torch sets a new thread's intra-op thread count on first use of its thread pool, which
        # LAPACK calls bypass: without this, MKL's SVD in a worker runs on the OpenMP default
        # (all cores, in every worker) and its results vary from run to run
        torch.get_num_threads()
        jobs: list[_Job] = it.extra["jobs"]
        if it.extra["direct"]:
            xt, xb = (x.reshape(-1) for x in xs)
            n = xt.numel()
            bn = float(torch.linalg.vector_norm(xb, dtype=torch.float32))
            if count is not None and xt.dtype == torch.float32:
                d = xt                  # the worker's own read buffer: ΔW in place
            else:
                d = worker.tensor("delta", "F32", n)
                d.copy_(xt)
            d.sub_(xb)
            u = jobs[0].unit
            self.acc.factor(jobs[0], d.view(u.shape[0], -1), bn, self.min_diff)
            return []
        tt, tb = self.tables
        got_t = _Given({s.key: x for s, x in zip(it.srcs, xs) if s.input == 0})
        got_b = _Given({s.key: x for s, x in zip(it.srcs, xs) if s.input == 1})
        for job in jobs:
            wb = _unit_weight(tb, job.unit, None, None, got_b)
            wt = _unit_weight(tt, job.tunit, None, None, got_t)
            bn = float(wb.norm())
            d = (wt - wb).reshape(job.unit.shape[0], -1)
            del wt, wb
            self.acc.factor(job, d, bn, self.min_diff)
        return []


def _part(x: torch.Tensor, loc: Loc) -> torch.Tensor:
    """One diffusers parameter out of a stored tensor, in diffusers form."""
    t = x.float()
    if loc.rows:
        t = t[loc.rows[0]:loc.rows[1]]
    return to_diffusers(loc.transform, t).reshape(loc.dshape)


class DiffOp(Op):
    """‖TUNED − BASE‖² of a tensor the LoRA does not carry (chunks for a same-named pair)."""

    name = "diff"

    def __init__(self, acc: _Acc):
        self.acc = acc

    def granule(self, it) -> int:
        return 1 if it.extra["pairs"] is None else 0

    def describe(self, it) -> str:
        return f"‖ΔW‖² only (left out: {it.extra['reason']})"

    def run(self, it, worker, start, count, xs):
        pairs = it.extra["pairs"]
        if pairs is None:
            xt, xb = (x.reshape(-1) for x in xs)
            d = worker.tensor("delta", "F32", xt.numel())
            d.copy_(xt)
            d.sub_(xb)
            s = float(torch.linalg.vector_norm(d)) ** 2
        else:
            got_t = {s.key: x for s, x in zip(it.srcs, xs) if s.input == 0}
            xb = xs[-1]
            s = sum(float((_part(got_t[lt.key], lt) - _part(xb, lb)).norm()) ** 2
                    for lt, lb in pairs)
        self.acc.add_partial(it, s)
        return []

    def finish(self, it) -> None:
        self.acc.left_done(it)


@dataclass
class _ReadPlan(Plan):
    """Phase 1 reads both inputs and writes nothing. The engine's ``Plan.out`` (progress label,
    error messages) wants an output file; this plan names the LoRA it prepares instead."""

    target: Path = Path("lora.safetensors")

    @property
    def out(self) -> Path:
        return self.target

    def targets(self) -> list[tuple[Path, bool, int]]:
        # what the printed plan shows; its size is known after the SVD (phase 2 writes it)
        return [(self.target, False, 0)]


def _direct_key(table: ModuleTable, unit: Unit, src) -> str | None:
    """The stored tensor holding exactly this unit's weight, values in the unit's order (no
    rows of a fused tensor, no transpose), or None (then :func:`merge._unit_weight`)."""
    locs = table.unit_weight_locs(unit)
    if len(locs) != 1 or locs[0].rows or locs[0].transform not in (None, "conv1x1") \
            or unit.transform not in (None, "conv1x1"):
        return None
    k = locs[0].key
    return k if k in src and math.prod(src.info(k).shape) == math.prod(unit.shape) else None


def _item(op, srcs: list[Src], views, shape, component, extra) -> Item:
    infos = [views[s.input].info(s.key) for s in srcs]
    return Item(op, tuple(srcs), [], tuple(shape), src_dtype=infos[0].dtype,
                storage=infos[0].storage, src_bytes=sum(i.nbytes for i in infos),
                component=component, extra=extra)


def plan_extract(ts, bs, dt: archs.Detection, db: archs.Detection, tt: ModuleTable,
                 tb: ModuleTable, acc: _Acc, *, fmt: str, rank: int, conv_rank: int,
                 components: list[str] | None, min_diff: float, output: Path) -> _ReadPlan:
    """Phase 1: an :class:`SvdOp` item per module (group), a :class:`DiffOp` item per other
    tensor of BASE, inputs ``[TUNED, BASE]``."""
    res = acc.res
    views = [ts, bs]
    svd_op, diff_op = SvdOp(acc, (tt, tb), min_diff), DiffOp(acc)
    units = select_units(tb, fmt, components)
    covered: set[tuple[str, str]] = set()       # (component, diffusers param) in a module
    conv_out: set[tuple[str, str]] = set()      # ... of a k×k conv left out by --conv-rank 0
    used_t: set[str] = set()
    svd_items: list[Item] = []
    general: list[tuple[_Job, list[str], list[str]]] = []
    missing_units: list[str] = []
    for u in units:
        params = {(u.component, p + ".weight") for p in u.parts}
        if is_kxk(u) and conv_rank == 0:
            conv_out |= params
            continue
        if u.component not in tt.kinds:       # a component TUNED does not have: noted below
            continue
        ut = tt.unit(u.component, u.name)
        if ut is None or ut.shape != u.shape:
            missing_units.append(f"{u.component}.{u.name}" + ("" if ut is None else
                                 f" ({list(ut.shape)} in TUNED, {list(u.shape)} in BASE)"))
            continue
        covered |= params
        acc.units.append(u)
        job = _Job(u, ut, conv_rank if is_kxk(u) else rank)
        kb, kt = _direct_key(tb, u, bs), _direct_key(tt, ut, ts)
        if kb and kt:
            used_t.add(kt)
            svd_items.append(_item(svd_op, [Src(0, kt), Src(1, kb)], views, u.shape,
                                   u.component, {"jobs": [job], "direct": True}))
        else:
            general.append((job, list(dict.fromkeys(loc.key for loc in tt.unit_weight_locs(ut))),
                            list(dict.fromkeys(loc.key for loc in tb.unit_weight_locs(u)))))
    # modules that share a stored tensor (q/k/v rows of one in_proj) read it once, together
    groups: list[tuple[list[_Job], list[str], list[str]]] = []
    owner: dict[tuple[int, str], int] = {}
    for job, kts, kbs in general:
        hit = {owner[k] for k in [(0, k) for k in kts] + [(1, k) for k in kbs] if k in owner}
        if hit:
            g = min(hit)
            for other in sorted(hit - {g}, reverse=True):   # merge groups this one joins
                groups[g][0].extend(groups[other][0])
                groups[g][1].extend(groups[other][1])
                groups[g][2].extend(groups[other][2])
                groups[other] = ([], [], [])
        else:
            g = len(groups)
            groups.append(([], [], []))
        groups[g][0].append(job)
        groups[g][1].extend(kts)
        groups[g][2].extend(kbs)
        for k in [(0, k) for k in groups[g][1]] + [(1, k) for k in groups[g][2]]:
            owner[k] = g
    for jobs, kts, kbs in groups:
        if not jobs:
            continue
        kts, kbs = list(dict.fromkeys(kts)), list(dict.fromkeys(kbs))
        used_t.update(kts)
        srcs = [Src(0, k) for k in kts] + [Src(1, k) for k in kbs]
        svd_items.append(_item(svd_op, srcs, views, jobs[0].unit.shape, jobs[0].unit.component,
                               {"jobs": jobs, "direct": False}))
    svd_items.sort(key=lambda it: -math.prod(it.shape) * len(it.extra["jobs"]))

    # every other tensor of BASE: what the LoRA leaves out
    arch = db.arch
    same_layout = dt.layout.name == db.layout.name
    diff_items: list[Item] = []
    missing: list[str] = []

    def reason_of(comp: str | None, params) -> str:
        if comp is None:
            return "other"
        if _is_vae(arch, comp):
            return "vae"
        if components and comp not in components:
            return "unselected"
        if any(p in conv_out for p in params):
            return "conv"
        return "not-lora" if comp in tb.kinds else "other"

    for kb in bs.keys():
        comp = db.component_of(kb)
        selected = comp in tb.kinds and not _is_vae(arch, comp) and \
            (not components or comp in components)
        params = tb.by_key.get(kb, []) if selected else []     # (selected: table built)
        if params and all(p in covered for p in params):
            continue
        partly = any(p in covered for p in params)
        if same_layout and not partly and kb in ts and \
                tuple(ts.info(kb).shape) == tuple(bs.info(kb).shape):
            used_t.add(kb)
            diff_items.append(_item(diff_op, [Src(0, kb), Src(1, kb)], views, bs.info(kb).shape,
                                    comp, {"pairs": None, "reason": reason_of(comp, params)}))
            continue
        if comp in tb.kinds:
            tb.comp(comp)
            params = tb.by_key.get(kb, [])
        pairs = []
        for p in params:
            if p in covered:
                continue
            lb = tb.comp(p[0]).locs[p]
            lt = tt.comp(p[0]).locs.get(p) if p[0] in tt.kinds else None
            if lt is None or lt.dshape != lb.dshape:
                continue
            pairs.append((lt, lb))
        if not pairs:
            missing.append(kb)
            continue
        kts = list(dict.fromkeys(lt.key for lt, _ in pairs))
        used_t.update(kts)
        diff_items.append(_item(diff_op, [Src(0, k) for k in kts] + [Src(1, kb)], views,
                                bs.info(kb).shape, comp,
                                {"pairs": pairs, "reason": reason_of(comp, params)}))
    for it in diff_items:       # the name the report shows is BASE's
        it.extra["name"] = it.srcs[-1].key
    if missing_units:
        res.notes.append(f"{len(missing_units)} modules of BASE are not in TUNED or have another "
                         f"shape there, left out: {', '.join(missing_units[:3])}")
    if missing:
        comps = sorted({str(db.component_of(k)) for k in missing})
        res.notes.append(f"{len(missing)} tensors of BASE have no counterpart in TUNED "
                         f"(components {', '.join(comps)}; e.g. {missing[0]}): not compared")
    extra_t = [k for k in ts.keys() if k not in used_t]
    if extra_t and same_layout:
        res.notes.append(f"{len(extra_t)} tensors of TUNED are not in BASE (e.g. {extra_t[0]}): "
                         f"not compared")
    plan = _ReadPlan("extract-lora", [ts, bs], target=output)
    plan.items = svd_items + diff_items
    plan.notes = res.notes
    return plan


# ----------------------------------------------------------------- extract-lora

def extract_lora(tuned: str | os.PathLike, base: str | os.PathLike, output: str | os.PathLike, *,
                 rank: int = 32, conv_rank: int | None = None, dynamic: str | None = None,
                 clamp_quantile: float | None = None, min_diff: float = 1e-5,
                 fmt: str = "kohya", dtype: str = "fp16", components: list[str] | None = None,
                 svd: str = "auto", overwrite: bool = False, dry_run: bool = False,
                 progress: Progress | None = None, workers: int | None = None) -> ExtractResult:
    """Extract a LoRA of ``tuned`` − ``base`` (see the module docstring). ``conv_rank``: rank
    of k×k convs (None: ``rank``; 0: left out). ``dry_run``: plan and check, read no tensor."""
    if rank < 1:
        raise UsageError(f"--rank must be >= 1, got {rank}")
    if conv_rank is not None and conv_rank < 0:
        raise UsageError(f"--conv-rank must be >= 0 (0 leaves k×k convs out), got {conv_rank}")
    if svd not in SVD_METHODS:
        raise UsageError(f"--svd must be one of {', '.join(SVD_METHODS)}, got '{svd}'")
    get_format(fmt)                          # unknown names fail here, with a suggestion
    cast = registry.get("cast", dtype)
    dyn = parse_dynamic(dynamic)
    eff_conv = rank if conv_rank is None else conv_rank
    t0 = time.perf_counter()
    output = Path(output)
    with open_source(tuned) as ts, open_source(base) as bs:
        raise_all(check_output(output, ts.files() + [ts.path] + bs.files() + [bs.path],
                               overwrite, 0))
        dt, db = archs.detect(ts), archs.detect(bs)
        if dt.arch.name != db.arch.name:
            raise UsageError(f"TUNED is {dt.arch.name} but BASE is {db.arch.name}; both must be "
                             f"the same architecture")
        res = ExtractResult(output, db.arch.name, min_diff=min_diff, svd=svd, rank=rank,
                            conv_rank=eff_conv, left_out={r: LeftOut(r) for r in LEFT_OUT})
        for what, v in (("TUNED", ts), ("BASE", bs)):
            enc = v.describe_encoding()
            if enc:
                res.notes.append(f"{what} is quantized ({enc}): ΔW is taken between dequantized "
                                 f"weights, so its quantization error is part of ΔW")
        tt, tb = table_for_source(ts, dt), table_for_source(bs, db)
        keep = dtypes.to_torch(cast.dtype)
        acc = _Acc(res, dyn=dyn, clamp_quantile=clamp_quantile, svd=svd, keep=keep,
                   paths=(str(tuned), str(base)))
        plan = res.plan = plan_extract(ts, bs, dt, db, tt, tb, acc, fmt=fmt, rank=rank,
                                       conv_rank=eff_conv, components=components,
                                       min_diff=min_diff, output=output)
        if dry_run:
            n = sum(1 for it in plan.items if isinstance(it.op, SvdOp))
            res.notes.append(f"dry run: this plan reads both inputs and factors ({n} SVD items, "
                             f"{len(plan.items) - n} tensors compared only); the LoRA's modules "
                             f"and ranks are known after the SVD, then a second plan writes them")
            return res
        execute(plan, progress=progress, overwrite=overwrite, workers=workers)
        if acc.nonfinite:
            res.notes.append(f"{len(acc.nonfinite)} left-out tensors hold NaN/Inf in TUNED or "
                             f"BASE (not counted): {', '.join(acc.nonfinite[:3])}")
        mods = []
        for u in acc.units:
            got = acc.factors.pop(id(u), None)
            if got is not None:
                mods.append(OutModule(u, "lora", {"up": got[0], "down": got[1]},
                                      float(got[0].shape[1])))
        res.modules = len(mods)
        res.modules_error = math.sqrt(res.sq_err / res.sq_tot) if res.sq_tot else 0.0
        res.total_error = (math.sqrt((res.sq_err + res.sq_left) / res.sq_all) if res.sq_all
                           else 0.0)
        if not mods:
            left = ", ".join(f"{LEFT_OUT[r]}: {v['tensors']}"
                             for r, v in res.left_out_dict().items())
            raise UsageError(f"TUNED and BASE differ in no module by more than {min_diff:g} "
                             f"(relative); nothing to extract"
                             + (f" (left out: {left})" if left else ""),
                             hint="lower --min-diff, or check that the files differ")
        step = {"op": "extract-lora", "tuned": safe_name(tuned), "base": safe_name(base),
                "format": fmt, "rank": rank, "conv_rank": eff_conv, "min_diff": min_diff,
                "svd": svd, "dtype": cast.name}
        if dynamic:
            step["dynamic"] = dynamic
        if clamp_quantile is not None:
            step["clamp_quantile"] = clamp_quantile
        meta = output_metadata([ts, bs], step, keep_source=False)
        meta.update({"ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                     "convkit.extract": f"rank={rank} conv_rank={eff_conv} dynamic={dynamic} "
                                        f"min_diff={min_diff} svd={svd}",
                     "convkit.tuned": safe_name(tuned), "convkit.base": safe_name(base),
                     "convkit.total_error": f"{res.total_error:.6g}"})
        if eff_conv and any(is_kxk(m.unit) for m in mods):
            meta["ss_network_args"] = json.dumps({"conv_dim": str(eff_conv),
                                                  "conv_alpha": str(eff_conv)})
        written = write_lora(output, db.arch.name, mods, fmt, dtype=dtype, metadata=meta,
                             overwrite=overwrite, inputs=[ts, bs], command="extract-lora",
                             progress=progress, workers=workers)
        res.write_plan, res.stats = written.plan, written.stats
    res.seconds = time.perf_counter() - t0
    return res
