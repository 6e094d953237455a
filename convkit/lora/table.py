"""The modules of a base model, under every name a LoRA file may give them.

A :class:`ModuleTable` is built from the real tensor names (and shapes) of a base checkpoint, single
file or diffusers folder, through :mod:`convkit.keymap`. For every component it knows

* ``locs``: each diffusers parameter -> where it lives in the base (key, rows of a fused tensor,
  transform), and
* ``units``: each module name a LoRA may target -> a :class:`Unit` (which diffusers modules it
  covers, in which order, with which row counts). A unit exists for every diffusers module name and
  every single-file (SGM/BFL) module name; fused single-file tensors (OpenCLIP ``in_proj``, Flux
  ``qkv``/``linear1``) give one unit covering several diffusers modules.

kohya spellings (``.`` -> ``_``) are looked up in a table made from these real names, never by
turning ``_`` back into ``.``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .. import archs, keymap
from ..sources.base import TensorSource
from .data import keys_data

AMBIGUOUS = object()


@dataclass(frozen=True)
class Loc:
    """Where one diffusers parameter lives in the base."""

    key: str                         # base tensor name
    rows: tuple[int, int] | None     # rows of a fused base tensor (dim 0), None = all
    transform: str | None            # keymap transform diffusers -> base ("conv1x1", ...)
    dshape: tuple[int, ...]          # shape in diffusers form


@dataclass(frozen=True)
class Unit:
    """A module a LoRA can target: one diffusers module, or a fused single-file tensor."""

    component: str
    name: str                        # canonical dotted module name in its naming space
    space: str                       # "diffusers" | "single"
    parts: tuple[str, ...]           # diffusers module names (without .weight), in row order
    sizes: tuple[int, ...]           # rows of each part
    transform: str | None            # single space: keymap transform of the fused tensor
    shape: tuple[int, ...]           # weight shape in this unit's space

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])


@dataclass
class _Comp:
    locs: dict[tuple[str, str], Loc] = field(default_factory=dict)
    units: dict[tuple[str, str], Unit] = field(default_factory=dict)
    under: dict[tuple[str, str], object] = field(default_factory=dict)


@dataclass
class ModuleTable:
    """Built per component on first use: a UNet-only LoRA never builds the text encoders' part
    (whose key maps may need to import transformers: seconds)."""

    arch: str
    naming: str                                  # naming of the base: sgm | bfl | diffusers
    kinds: dict[str, str]                        # component -> keymap kind
    by_key: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    _comps: dict[str, _Comp] = field(default_factory=dict)
    _pending: dict[str, object] = field(default_factory=dict)    # component -> builder
    _merged: dict[str, dict] = field(default_factory=dict)
    _order: list[str] = field(default_factory=list)               # components in file order

    def comp(self, component: str) -> _Comp:
        build = self._pending.pop(component, None)
        if build is not None:
            build()
        return self._comps.setdefault(component, _Comp())

    def _all(self, attr: str) -> dict:
        if attr not in self._merged:
            out: dict = {}
            for c in self._order:
                out.update(getattr(self.comp(c), attr))
            self._merged[attr] = out
        return self._merged[attr]

    @property
    def locs(self) -> dict[tuple[str, str], Loc]:
        return self._all("locs")

    @property
    def units(self) -> dict[tuple[str, str], Unit]:
        return self._all("units")

    @property
    def under(self) -> dict[tuple[str, str], object]:
        return self._all("under")

    @property
    def diffusion(self) -> str:
        return archs.get(self.arch).diffusion_component

    def unit(self, component: str, name: str) -> Unit | None:
        return self.comp(component).units.get((component, name)) if component in self.kinds \
            else None

    def lookup(self, component: str, module: str, style: str) -> Unit | None | object:
        """A unit by component and module path (dotted or underscore); AMBIGUOUS if several."""
        c = self.comp(component)
        if style == "underscore":
            return c.under.get((component, module))
        return c.units.get((component, module))

    def unit_weight_locs(self, unit: Unit) -> list[Loc]:
        locs = self.comp(unit.component).locs
        return [locs[(unit.component, p + ".weight")] for p in unit.parts]

    def bias_loc(self, unit: Unit, part: str) -> Loc | None:
        return self.comp(unit.component).locs.get((unit.component, part + ".bias"))

    def _units_of(self, component: str | None):
        for c in ([component] if component is not None else self._order):
            yield from self.comp(c).units.items()

    def diffusers_units(self, component: str | None = None) -> list[Unit]:
        return self._unique(component, "diffusers")

    def single_units(self, component: str | None = None) -> list[Unit]:
        return self._unique(component, "single")

    def _unique(self, component: str | None, space: str) -> list[Unit]:
        """Each unit once: the table reaches some under several names (CLIP with and without
        its ``text_model.`` wrapper)."""
        seen = set()
        out = []
        for _, u in self._units_of(component):
            if u.space == space and id(u) not in seen:
                seen.add(id(u))
                out.append(u)
        return out


def _canon_d(kind: str, name: str) -> str:
    """Canonical spelling of a diffusers module name (CLIP with its ``text_model.`` wrapper)."""
    pre = keys_data()["optional_prefix"].get(kind)
    if pre and not name.startswith(pre) and not name.startswith(("text_projection",)):
        return pre + name
    return name


def _module(param: str) -> tuple[str, str] | None:
    for suf in (".weight", ".scale", ".bias"):
        if param.endswith(suf):
            return param[: -len(suf)], suf[1:]
    return None


def _dshape(shape: tuple[int, ...], transform: str | None) -> tuple[int, ...]:
    if transform == "conv1x1" and len(shape) == 4:
        return shape[:2]
    if transform == "transpose" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def build_table(arch: str, naming: str, prefixes: dict[str, str],
                shapes: dict[str, tuple[int, ...]]) -> ModuleTable:
    """Build the table from full base key names (with the layout's prefixes) and their shapes."""
    kinds_all = {c: k for c, (k, _) in keymap.components(arch).items()}
    table = ModuleTable(arch, naming, {c: kinds_all[c] for c in prefixes if c in kinds_all})
    comp_keys, _ = archs.assign(archs.Layout("x", naming, prefixes), shapes)
    table._order = [c for c in comp_keys if c in table.kinds]   # each built on first use
    for comp, keys in comp_keys.items():
        if comp in table.kinds:
            table._pending[comp] = functools.partial(_build_component, table, comp, keys,
                                                     prefixes[comp], shapes)
    return table


def _build_component(table: ModuleTable, comp: str, keys, pre: str, shapes) -> None:
    naming = table.naming
    kind = table.kinds[comp]
    names = {k[len(pre):]: shapes[k] for k in keys}
    meta = {n: torch.empty(s, device="meta") for n, s in names.items()}
    side = "d" if naming == "diffusers" else "s"
    cm = keymap.ComponentMap(kind, None, names=list(names), side=side, sd=meta)
    fused: dict[str, tuple] = {}
    for n, shape in names.items():
        mod = _module(n)
        full = pre + n
        if naming == "diffusers":
            _add_loc(table, comp, kind, n, Loc(full, None, None, tuple(shape)))
            hit = cm.locate(n)
            if hit is None or mod is None or mod[1] == "bias":
                continue
            sp, _ = hit
            smod = _module(sp.single)
            if smod is None:
                continue
            if not sp.fused:
                sshape = _sshape(tuple(shape), sp.transform)
                _add_unit(table, Unit(comp, smod[0], "single", (_canon_d(kind, mod[0]),),
                                      (shape[0],), sp.transform, sshape), kind)
            else:
                fused.setdefault(smod[0], (sp, {}))[1][n] = tuple(shape)
        else:
            sp = cm.split(n, shape[0] if shape else 0)
            if sp is None or any(p.start is None for p in sp.parts):
                continue
            for p in sp.parts:
                span = (p.start, p.stop) if sp.fused else None
                pshape = (p.stop - p.start, *shape[1:]) if sp.fused else tuple(shape)
                _add_loc(table, comp, kind, p.name, Loc(full, span, sp.transform,
                                                        _dshape(pshape, sp.transform)))
            if mod is None or mod[1] == "bias":
                continue
            dparts = tuple(_canon_d(kind, _module(p.name)[0]) for p in sp.parts)
            sizes = tuple(p.stop - p.start for p in sp.parts)
            _add_unit(table, Unit(comp, mod[0], "single", dparts, sizes,
                                  sp.transform, tuple(shape)), kind)
    for smod, (sp, got) in fused.items():
        if len(got) != len(sp.parts):
            continue
        shp = [got[p.name] for p in sp.parts]
        _add_unit(table, Unit(comp, smod, "single",
                              tuple(_canon_d(kind, _module(p.name)[0]) for p in sp.parts),
                              tuple(s[0] for s in shp), sp.transform,
                              (sum(s[0] for s in shp), *shp[0][1:])), kind)


def _sshape(dshape: tuple[int, ...], transform: str | None) -> tuple[int, ...]:
    if transform == "conv1x1" and len(dshape) == 2:
        return (*dshape, 1, 1)
    if transform == "transpose" and len(dshape) == 2:
        return (dshape[1], dshape[0])
    return dshape


def _add_loc(table: ModuleTable, comp: str, kind: str, dparam: str, loc: Loc) -> None:
    mod = _module(dparam)
    canon = _canon_d(kind, mod[0]) + "." + mod[1] if mod else dparam
    table._comps.setdefault(comp, _Comp()).locs[(comp, canon)] = loc
    table.by_key.setdefault(loc.key, []).append((comp, canon))
    if mod and mod[1] in ("weight", "scale") and len(loc.dshape) >= 1:
        name = _canon_d(kind, mod[0])
        _add_unit(table, Unit(comp, name, "diffusers", (name,), (loc.dshape[0],), None,
                              loc.dshape), kind)


def _add_unit(table: ModuleTable, unit: Unit, kind: str) -> None:
    pre = keys_data()["optional_prefix"].get(kind)
    names = {unit.name}
    if pre and unit.name.startswith(pre):
        names.add(unit.name[len(pre):])
    c = table._comps.setdefault(unit.component, _Comp())
    for n in names:
        old = c.units.get((unit.component, n))
        if old is not None and old.space == "diffusers" and unit.space == "single":
            # a single-file name that equals a diffusers name (CLIP-L, T5): same module
            continue
        c.units[(unit.component, n)] = unit
        u = n.replace(".", "_")
        prev = c.under.get((unit.component, u))
        if prev is not None and prev is not AMBIGUOUS and prev.parts != unit.parts:
            c.under[(unit.component, u)] = AMBIGUOUS
        elif prev is None:
            c.under[(unit.component, u)] = unit


def table_for_source(src: TensorSource, det: archs.Detection | None = None) -> ModuleTable:
    det = det or archs.detect(src)
    shapes = {k: tuple(src.info(k).shape) for k in src.keys()}
    return build_table(det.arch.name, det.layout.naming, dict(det.layout.prefixes), shapes)


@functools.lru_cache(maxsize=None)
def table_for_arch(arch: str) -> ModuleTable:
    """Table of the released full-size model (names and shapes only, nothing loaded). Each
    component's shapes are made when the component is first asked for (a UNet-only LoRA
    never instantiates the text encoders, even on the meta device: that is most of the time
    of guessing a LoRA's architecture among all of them)."""
    comps = keymap.components(arch)
    table = ModuleTable(arch, "sgm", {c: k for c, (k, _) in comps.items()})
    table._order = list(comps)
    for c, (_, pre) in comps.items():
        table._pending[c] = functools.partial(_build_full_size, table, c, pre)
    return table


def _build_full_size(table: ModuleTable, comp: str, pre: str) -> None:
    from ..tiny.full_size import full_size_component_shapes

    shapes = {pre + k: s for k, s in full_size_component_shapes(table.arch, comp).items()}
    _build_component(table, comp, list(shapes), pre, shapes)


def numel(shape) -> int:
    return math.prod(shape)
