"""Writing LoRA files in the kohya, ComfyUI and diffusers/PEFT formats (formats/lora/writers.toml).

:class:`OutModule` is one module's adapter tensors; :func:`relabel` re-expresses modules in the
module names a format uses (fusing diffusers q/k/v LoRAs into one single-file LoRA by stacking, or
splitting a fused one by rows: both exact); :func:`plan_lora` makes the engine plan that writes
a LoRA file (:mod:`convkit.engine`) and :func:`write_lora` checks and runs it.

The formats are registered as kind ``lora-format`` (:mod:`convkit.registry`) from the data in
writers.toml; every command looks them up there (``registry.get("lora-format", name)``).

A plan item is a :class:`Piece`: output modules whose tensors are either in memory (extract-lora:
the SVD factors) or made when the item runs from the tensors it reads (convert-lora: the input
LoRA's tensors, renamed, stacked, split or with alpha folded). Planning works on shapes alone
(``meta`` tensors), so ``--dry-run`` reads no tensor data.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import archs, dtypes, registry
from ..casts import CastContext, cast_into
from ..engine import Item, Out, OutFile, Plan, RunStats, Src, execute
from ..engine.ops import Op, as_bytes
from ..errors import OutputError, UsageError
from ..progress import Progress
from ..sources.base import TensorSource
from .data import keys_data, lora_formats, writers_data
from .table import ModuleTable, Unit

LOSSY_NOTE = "LoHa/LoKr/Tucker/full modules cannot be written as plain LoRA"


@dataclass
class OutModule:
    unit: Unit
    algo: str                                  # lora | loha | lokr | full
    tensors: dict[str, torch.Tensor]           # role -> tensor (roles as in keys.toml)
    alpha: float | None = None
    notes: list[str] = field(default_factory=list)
    origin: tuple[int, ...] = ()               # relabel: indices of the modules it came from

    @property
    def rank(self) -> int | None:
        if self.algo == "lora":
            return self.tensors["down"].shape[0]
        if self.algo == "loha":
            return self.tensors["w1b"].shape[0]
        return None

    def scale(self) -> float:
        r = self.rank
        return 1.0 if self.alpha is None or not r else self.alpha / r


# ----------------------------------------------------------------- formats (registry)

@dataclass(frozen=True)
class LoraFormat:
    """One output format, as writers.toml describes it: tensor suffixes (``down``, ``up``,
    ``mid``, ``alpha``, ``dora``, ``magnitude``), ``fold_alpha``, ``lycoris`` and, per
    architecture and component, [prefix, naming space, spelling]."""

    name: str
    title: str
    spec: dict = field(hash=False, compare=False, repr=False)

    def naming(self, arch: str, component: str) -> tuple[str, str, str]:
        names = self.spec["names"].get(arch)
        if names is None:           # a variant (sd35_large_turbo) writes its base's names
            base = archs.get(arch).variant_of if arch in archs.load_all() else ""
            names = self.spec["names"].get(base) if base else None
        if not names or component not in names:
            raise UsageError(f"the {self.name} format has no names for {arch} {component}")
        return tuple(names[component])


def _register() -> None:
    data = writers_data()
    for name in lora_formats():
        spec = data[name]
        registry.add("lora-format", name, LoraFormat(name, spec.get("title", name), spec),
                     help=spec.get("title", ""))


_register()


def get_format(fmt: str) -> LoraFormat:
    """The registered format ``fmt``; unknown names fail with the nearest one suggested."""
    return registry.get("lora-format", fmt)


def format_spec(fmt: str) -> dict:
    return get_format(fmt).spec


def naming(fmt: str, arch: str, component: str) -> tuple[str, str, str]:
    """(prefix, space "single"|"diffusers", style) a format uses for one component."""
    return get_format(fmt).naming(arch, component)


def _lycoris_suffix() -> dict[str, str]:
    out = {}
    for suf, info in keys_data()["suffix"].items():
        if info.get("algo") in ("loha", "lokr", "full"):
            out.setdefault(info["role"], suf)
    return out


# ----------------------------------------------------------------- relabel (fuse / split)

def _single_unit_of(table: ModuleTable, unit: Unit) -> Unit | None:
    for u in table.single_units(unit.component):
        if unit.parts[0] in u.parts:
            return u
    return None


def shared_down(mods: list[OutModule], table: ModuleTable, fmt: str,
                load_down: Callable[[int], torch.Tensor]) -> frozenset[tuple[str, str]]:
    """The fused single-file modules ``(component, name)`` (SD3/Flux ``qkv``, ...) that
    ``fmt`` names and whose parts ``mods`` all carry as plain LoRAs with one and the same down
    factor, as a fused LoRA split into its parts has: :func:`relabel` joins those by
    concatenating the up factors (rank unchanged) instead of stacking them. ``load_down(i)``
    gives the down factor of ``mods[i]`` (read here: LoRA factors are small)."""
    groups: dict[tuple[str, str], tuple[Unit, dict[str, int]]] = {}
    for i, m in enumerate(mods):
        if m.unit.space != "diffusers" or m.algo != "lora" or set(m.tensors) != {"up", "down"} \
                or naming(fmt, table.arch, m.unit.component)[1] != "single":
            continue
        su = _single_unit_of(table, m.unit)
        if su is not None and len(su.parts) > 1:
            groups.setdefault((su.component, su.name), (su, {}))[1][m.unit.parts[0]] = i
    out = set()
    for key, (su, idx) in groups.items():
        if set(idx) != set(su.parts) or len({mods[i].tensors["down"].shape for i in idx.values()}) > 1:
            continue
        downs = [load_down(i) for i in idx.values()]
        if all(torch.equal(d, downs[0]) for d in downs[1:]):
            out.add(key)
    return frozenset(out)


def relabel(mods: list[OutModule], table: ModuleTable, fmt: str,
            shared: frozenset[tuple[str, str]] = frozenset()) -> tuple[list[OutModule], list[str]]:
    """Modules named as ``fmt`` wants (single-file or diffusers module names); notes on changes.

    Each output's ``origin`` holds the indices (in ``mods``) of the modules it was made from:
    one for a rename or a split, several for q/k/v LoRAs stacked into one (or joined, for the
    fused modules in ``shared``, see :func:`shared_down`)."""
    out: list[OutModule] = []
    notes: list[str] = []
    pending: dict[int, tuple[Unit, dict[str, tuple[int, OutModule]]]] = {}
    for i, m in enumerate(mods):
        _, space, _ = naming(fmt, table.arch, m.unit.component)
        if m.unit.space == space or (space == "single" and m.unit.space == "diffusers"
                                     and _single_unit_of(table, m.unit) is None):
            out.append(replace(m, origin=(i,)))
        elif space == "diffusers":
            out += [replace(s, origin=(i,)) for s in _split(m, table)]
        else:
            su = _single_unit_of(table, m.unit)
            if len(su.parts) == 1:
                out.append(OutModule(su, m.algo, _moved(m, su.transform, True), m.alpha,
                                     origin=(i,)))
            else:
                pending.setdefault(id(su), (su, {}))[1][m.unit.parts[0]] = (i, m)
    for su, got in pending.values():
        fused = _fuse(su, {p: m for p, (_, m) in got.items()}, notes,
                      (su.component, su.name) in shared)
        fused.origin = tuple(sorted(i for i, _ in got.values()))
        out.append(fused)
    return out, notes


def _split(m: OutModule, table: ModuleTable) -> list[OutModule]:
    u = m.unit
    if len(u.parts) == 1:
        du = table.units[(u.component, u.parts[0])]
        return [OutModule(du, m.algo, _moved(m, u.transform, False), m.alpha)]
    if m.algo not in ("lora", "full") or "mid" in m.tensors or u.transform:
        raise UsageError(f"cannot split the {m.algo} module '{u.name}' into "
                         f"{len(u.parts)} diffusers modules without loss")
    res, start = [], 0
    for part, size in zip(u.parts, u.sizes):
        du = table.units[(u.component, part)]
        if m.algo == "lora":
            t = {"up": m.tensors["up"][start:start + size], "down": m.tensors["down"]}
        else:
            t = {"diff": m.tensors["diff"].reshape(u.shape)[start:start + size]}
        res.append(OutModule(du, m.algo, t, m.alpha))
        start += size
    return res


def _moved(m: OutModule, transform: str | None, to_single: bool) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``m`` after the keymap transform between the two namings."""
    from .adapters import to_base, to_diffusers

    t = dict(m.tensors)
    if transform in (None, "conv1x1"):
        return t                     # same numbers; shapes are reshaped when merged
    if "dora" in t or "magnitude" in t or m.algo not in ("lora", "full"):
        raise UsageError(f"cannot move a {m.algo} module across the '{transform}' transform "
                         f"({m.unit.name})")
    f = to_base if to_single else to_diffusers
    if m.algo == "full":
        t["diff"] = f(transform, t["diff"].reshape(m.unit.shape))
    elif transform == "transpose":
        t["up"], t["down"] = t["down"].t().contiguous(), t["up"].t().contiguous()
    else:
        t["up"] = f(transform, t["up"]).contiguous()
    return t


def _fuse(su: Unit, got: dict[str, OutModule], notes: list[str],
          shared: bool = False) -> OutModule:
    """Stack per-part LoRAs into one LoRA of the fused tensor: exact, rank = sum of ranks.
    With ``shared`` (every part present, one down factor) the up factors are concatenated
    instead: exact, the rank stays (the inverse of splitting a fused LoRA)."""
    if any(m.algo != "lora" or "mid" in m.tensors or "dora" in m.tensors or "magnitude" in m.tensors
           for m in got.values()):
        raise UsageError(f"cannot fuse non-LoRA modules into '{su.name}'")
    if shared:
        ms = [got[p] for p in su.parts]
        if len({m.alpha for m in ms}) == 1:        # same scale: the factors as they are
            ups, alpha = [m.tensors["up"] for m in ms], ms[0].alpha
        else:                                      # scales folded into the ups
            ups, alpha = [m.tensors["up"].float() * m.scale() for m in ms], float(ms[0].rank)
        notes.append(f"{su.name}: {len(ms)} LoRAs sharing one down factor joined "
                     f"(rank {ms[0].rank})")
        return OutModule(su, "lora", {"up": torch.cat(ups, 0), "down": ms[0].tensors["down"]},
                         alpha)
    ups, downs = [], []
    any_m = next(iter(got.values()))
    in_dim = any_m.tensors["down"].shape[1:]
    dev = any_m.tensors["up"].device          # "meta" while planning
    total_r = sum(m.rank for m in got.values())
    col = 0
    for part, size in zip(su.parts, su.sizes):
        m = got.get(part)
        up = torch.zeros(size, total_r, *any_m.tensors["up"].shape[2:], dtype=torch.float32,
                         device=dev)
        if m is not None:
            r = m.rank
            up[:, col:col + r] = m.tensors["up"].float() * m.scale()
            downs.append(m.tensors["down"].float())
            col += r
        ups.append(up)
    notes.append(f"{su.name}: {len(got)} LoRAs stacked into one of rank {total_r}")
    down = torch.cat(downs, 0).reshape(total_r, *in_dim)
    return OutModule(su, "lora", {"up": torch.cat(ups, 0), "down": down}, float(total_r))


# ----------------------------------------------------------------- tensors of a module

def tensors_for(m: OutModule, fmt: str, arch: str) -> dict[str, torch.Tensor]:
    spec = format_spec(fmt)
    prefix, _, style = naming(fmt, arch, m.unit.component)
    name = m.unit.name.replace(".", "_") if style == "underscore" else m.unit.name
    base = prefix + name
    out: dict[str, torch.Tensor] = {}
    if m.algo != "lora" and not spec.get("lycoris"):
        raise UsageError(f"{LOSSY_NOTE} in the {fmt} format ({m.algo}: {m.unit.name})",
                         hint="use --format kohya or comfy, which keep LyCORIS modules")
    if m.algo == "lora":
        up = m.tensors["up"]
        if spec.get("fold_alpha"):
            if "mid" in m.tensors:
                raise UsageError(f"Tucker LoCon ('{m.unit.name}') has no {fmt} form",
                                 hint="use --format kohya or comfy")
            if m.scale() != 1.0:        # in fp32: the product stays exact
                up = up.float() * m.scale()
        out[base + spec["down"]] = m.tensors["down"]
        out[base + spec["up"]] = up
        if "mid" in m.tensors:
            out[base + spec["mid"]] = m.tensors["mid"]
        if "alpha" in spec:
            out[base + spec["alpha"]] = torch.tensor(float(m.alpha if m.alpha is not None
                                                           else m.rank))
    else:
        suf = _lycoris_suffix()
        for role, t in m.tensors.items():
            if role in suf:
                out[base + suf[role]] = t
        if m.alpha is not None and "alpha" in spec:
            out[base + spec["alpha"]] = torch.tensor(float(m.alpha))
    if "dora" in m.tensors:
        if "dora" not in spec:
            raise UsageError(f"kohya/LyCORIS DoRA scales have no {fmt} form ({m.unit.name})")
        out[base + spec["dora"]] = m.tensors["dora"]
    if "magnitude" in m.tensors:
        if "magnitude" in spec:
            out[base + spec["magnitude"]] = m.tensors["magnitude"]
        else:  # PEFT magnitude (out,) -> kohya output-axis dora_scale (out, 1, ...)
            mag = m.tensors["magnitude"]
            out[base + spec["dora"]] = mag.reshape(mag.shape[0], *[1] * (len(m.unit.shape) - 1))
    return out


# ----------------------------------------------------------------- the plan

@dataclass
class Piece:
    """One plan item of a LoRA file: output modules (named as the format wants).

    Without ``srcs`` the modules' tensors are in memory and written as they are. With
    ``srcs`` (tensors of the plan's inputs) ``mods`` hold ``meta`` tensors (shapes only) and
    ``make(xs)`` builds the same modules from the values read."""

    mods: list[OutModule]
    srcs: tuple[Src, ...] = ()
    make: Callable[[list], list[OutModule]] | None = None
    label: str = "write"


class LoraOut(Op):
    """Emits a piece's adapter tensors, cast to the planned dtypes (whole tensors)."""

    name = "lora"

    def __init__(self, fmt: str, arch: str, ctx: CastContext):
        self.fmt, self.arch, self.ctx = fmt, arch, ctx

    def granule(self, item):
        return 0

    def describe(self, item):
        return item.extra["piece"].label

    def run(self, item, worker, start, count, xs):
        piece: Piece = item.extra["piece"]
        mods = piece.make(xs) if piece.make is not None else piece.mods
        tensors: dict[str, torch.Tensor] = {}
        for m in mods:
            tensors.update(tensors_for(m, self.fmt, self.arch))
        writes = []
        for o in item.outs:
            t = tensors.get(o.key)
            if t is None or tuple(t.shape) != tuple(o.shape):
                raise OutputError(f"internal error: '{o.key}' is "
                                  f"{None if t is None else list(t.shape)}, planned "
                                  f"{list(o.shape)}")
            tdt = dtypes.to_torch(o.dtype)
            if t.dtype != tdt:
                out = torch.empty(t.shape, dtype=tdt)
                if t.is_floating_point() and out.is_floating_point():
                    cast_into(o.key, t.contiguous(), out, self.ctx)
                else:
                    out.copy_(t)
                t = out
            writes.append((o, 0, as_bytes(t)))
        return writes

    def finish(self, item):
        piece: Piece = item.extra["piece"]
        if piece.make is None:          # factors in memory: not needed once written
            piece.mods = []


class _Named(TensorSource):
    """An input known by its path only (to refuse writing over it)."""


def _as_sources(inputs) -> list[TensorSource]:
    return [s if isinstance(s, TensorSource) else _Named(path=Path(s)) for s in inputs]


def plan_lora(path: str | os.PathLike, arch: str, pieces, fmt: str, *,
              dtype: str | None = None, metadata: dict[str, str] | None = None, inputs=(),
              command: str = "write-lora", ctx: CastContext | None = None) -> Plan:
    """The plan that writes ``pieces`` (:class:`Piece`, or :class:`OutModule` already in the
    format's naming, see :func:`relabel`) as one safetensors LoRA file. ``inputs``: the sources
    the pieces' ``srcs`` index (and every file the output must not overwrite). Float tensors
    are cast to ``dtype`` (default: as they are; alphas stay fp32 scalars)."""
    get_format(fmt)
    cast = registry.get("cast", dtype) if dtype else None
    srcs = _as_sources(inputs)
    plan = Plan(command, srcs)
    meta = {"ss_network_module": "networks.lora", "convkit.lora_format": fmt,
            "convkit.arch": arch, **(metadata or {})}
    plan.add_file(OutFile("", Path(path), metadata={str(k): str(v) for k, v in meta.items()}))
    op = LoraOut(fmt, arch, ctx or CastContext(path=str(path)))
    seen: set[str] = set()
    for piece in pieces:
        if isinstance(piece, OutModule):
            piece = Piece([piece])
        outs = []
        first = None
        for m in piece.mods:
            for k, t in tensors_for(m, fmt, arch).items():
                if k in seen:
                    raise UsageError(f"two modules write the same tensor '{k}'")
                seen.add(k)
                dt = dtypes.from_torch(t.dtype)
                if cast is not None and t.is_floating_point() and t.ndim:
                    dt = cast.target(dt)
                outs.append(Out(k, dt, tuple(t.shape)))
                if first is None:
                    first = t
        if not outs:
            continue
        infos = [srcs[s.input].info(s.key) for s in piece.srcs]
        m0 = piece.mods[0]
        plan.items.append(Item(
            op, tuple(piece.srcs), outs, outs[0].shape,
            src_dtype=infos[0].dtype if infos else dtypes.from_torch(first.dtype),
            storage=infos[0].storage if infos else "",
            src_bytes=sum(i.nbytes for i in infos), component=m0.unit.component,
            extra={"piece": piece}))
    return plan


@dataclass
class WrittenLora:
    """What :func:`write_lora` did: the plan, and the run's statistics (None for a dry run).
    Path-like: ``os.fspath(result)`` is the output file."""

    plan: Plan
    stats: RunStats | None = None

    @property
    def path(self) -> Path:
        return self.plan.out

    def __fspath__(self) -> str:
        return str(self.plan.out)


def write_lora(path: str | os.PathLike, arch: str, mods, fmt: str, *,
               dtype: str | None = None, metadata: dict[str, str] | None = None,
               overwrite: bool = False, inputs=(), dry_run: bool = False,
               command: str = "write-lora", progress: Progress | None = None,
               workers: int | None = None, ctx: CastContext | None = None,
               verify: bool = True) -> WrittenLora:
    """Plan (:func:`plan_lora`), check and write ``mods`` as one safetensors LoRA file, then
    reopen it and compare names, dtypes, shapes and CRCs (``verify``: LoRAs are small); with
    ``dry_run`` only plan and check."""
    plan = plan_lora(path, arch, mods, fmt, dtype=dtype, metadata=metadata, inputs=inputs,
                     command=command, ctx=ctx)
    plan.verify = verify
    plan.check(overwrite)
    if dry_run:
        return WrittenLora(plan)
    return WrittenLora(plan, execute(plan, progress=progress, overwrite=overwrite,
                                     workers=workers))
