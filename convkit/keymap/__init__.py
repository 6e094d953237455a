"""Diffusers state-dict names <-> real single-file (LDM/SGM, BFL, ComfyUI) names.

Component kinds (:func:`kinds`, data in ``formats/keymaps/index.toml``): ``unet``
(UNet2DConditionModel), ``vae`` (AutoencoderKL), ``clip_l`` (CLIPTextModel), ``openclip``
(CLIPTextModelWithProjection <-> OpenCLIP text tower), ``clip_proj`` (CLIPTextModelWithProjection,
same names), ``t5`` (T5EncoderModel), ``flux`` (FluxTransformer2DModel <-> BFL names), ``mmdit``
(SD3Transformer2DModel <-> Stability's MMDiT names).

Names inside one component carry no checkpoint prefix; :func:`arch_to_single_file` and
:func:`arch_to_diffusers` add/remove the per-architecture prefixes from the
architecture's data file (``formats/<arch>.toml``, layouts).

``config`` arguments accept a diffusers/transformers config dict, an architecture name
(``"sdxl"`` -> the full-size config in ``formats/configs/sdxl/``) or ``None`` (structure inferred
from the state-dict names; required for the names-only helpers of ``unet``).

Everything is data in ``formats/keymaps/*.toml``; this package is the mechanism.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ._engine import Extra, KeyMap, Target
from .maps import KeyMapError, diffusion_kinds, get_map, kind_info, kinds
from .parts import ComponentMap, Part, Split, parts

__all__ = [
    "kinds", "kind_info", "diffusion_kinds", "KeyMapError", "Slice", "Resolved", "to_single_file", "to_diffusers", "single_file_name",
    "resolve", "diffusers_names", "components", "archs", "pipeline_class_name", "arch_to_single_file",
    "arch_to_diffusers", "get_map", "single_file_recipes", "parts", "Part", "Split", "ComponentMap",
]


@dataclass(frozen=True)
class Slice:
    """Where a diffusers tensor sits inside a fused single-file tensor.

    Part ``index`` of ``count`` along ``dim``; ``start``/``stop`` are element offsets along
    ``dim`` when the sizes are known (from the config), else ``None``.
    """

    dim: int
    index: int
    count: int
    start: int | None = None
    stop: int | None = None


@dataclass(frozen=True)
class Resolved:
    single: str
    slice: Slice | None
    transform: str | None          # None | "transpose" | "conv1x1" | "swap_halves"
    parts: tuple[str, ...]         # all diffusers names of the single-file tensor


# --------------------------------------------------------------------------- transforms


def _fwd(transform: str | None, t: torch.Tensor) -> torch.Tensor:
    """diffusers -> single file."""
    if transform is None:
        return t
    if transform == "transpose":
        return t.t().contiguous()
    if transform == "conv1x1":
        return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t
    if transform == "swap_halves":
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)
    raise ValueError(f"unknown transform {transform}")


def _bwd(transform: str | None, t: torch.Tensor) -> torch.Tensor:
    """single file -> diffusers."""
    if transform == "conv1x1":
        return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t
    return _fwd(transform, t)  # transpose and swap_halves are their own inverse


def _part_sizes(target: Target, total: int, hidden: int | None) -> list[int]:
    n = len(target.parts)
    if target.sizes is None:
        if total % n:
            raise KeyMapError(f"cannot split dim 0 of size {total} into {n} equal parts", key=target.single)
        return [total // n] * n
    if "h" in target.sizes and hidden is None:
        raise KeyMapError("fused tensor needs the hidden size; pass config", key=target.single)
    fixed = [hidden if s == "h" else (None if s == "*" else int(s)) for s in target.sizes]
    known = sum(s for s in fixed if s is not None)
    return [s if s is not None else total - known for s in fixed]


# --------------------------------------------------------------------------- state dicts


def to_single_file(kind: str, sd: Mapping[str, torch.Tensor], config=None, *, extras: bool = True,
                   strict: bool = True) -> dict[str, torch.Tensor]:
    """Diffusers state dict of one component -> single-file names (no checkpoint prefix).

    ``extras`` adds the tensors real single files carry that diffusers has no parameter for
    (CLIP ``position_ids``, OpenCLIP ``logit_scale``). Unknown names raise :class:`KeyMapError`
    unless ``strict=False`` (then they are left out).
    """
    km = get_map(kind, config, names=sd.keys(), side="d", sd=sd)
    out: dict[str, torch.Tensor] = {}
    for single, (transform, names) in single_file_recipes(kind, km, sd.keys(),
                                                          strict=strict).items():
        t = sd[names[0]] if len(names) == 1 else torch.cat([sd[n] for n in names], 0)
        out[single] = _fwd(transform, t)
    if extras:
        for e in km.extras:
            made = _make_extra(e, out)
            if made is not None:
                out[e.single] = made
    return out


def single_file_recipes(kind: str, km: KeyMap, names: Iterable[str], *, strict: bool = True,
                        where: str = "") -> dict[str, tuple[str | None, list[str]]]:
    """Single-file name -> (transform, the diffusers names it is made of, in fused order).

    Names only, in order of first appearance; a fused tensor (OpenCLIP in_proj, Flux qkv) lists
    all its parts, and a missing part is an error. Unknown names raise unless ``strict=False``.
    """
    out: dict[str, tuple[str | None, list[str]] | None] = {}
    groups: dict[str, tuple[Target, dict[int, str]]] = {}
    unknown = []
    for name in names:
        if name in km.drop_diffusers:
            continue
        hit = km.d2s(name)
        if hit is None:
            unknown.append(name)
            continue
        target, k = hit
        if len(target.parts) == 1:
            out[target.single] = (target.transform, [name])
        else:
            groups.setdefault(target.single, (target, {}))[1][k] = name
            out.setdefault(target.single, None)  # keep the order of first appearance
    if unknown and strict:
        raise KeyMapError(f"{len(unknown)} {kind} tensor(s){where} have no single-file name, "
                          f"e.g. {unknown[:3]}", key=unknown[0])
    for single, (target, got) in groups.items():
        missing = [target.parts[i] for i in range(len(target.parts)) if i not in got]
        if missing:
            raise KeyMapError(f"fused tensor is missing parts {missing}", key=single)
        out[single] = (target.transform, [got[i] for i in range(len(target.parts))])
    return {k: v for k, v in out.items() if v is not None}


def _make_extra(e: Extra, out: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    if e.make == "position_ids":
        src = out.get(e.source) if e.source else None
        if src is None:
            return None
        return torch.arange(src.shape[0], dtype=torch.int64)[None]
    if e.make == "scalar":
        return torch.tensor(float(e.value), dtype=torch.float32)
    raise ValueError(f"unknown extra maker {e.make}")


def diffusers_recipes(kind: str, km: KeyMap, shapes: Mapping[str, tuple[int, ...]], *,
                      strict: bool = True, where: str = ""
                      ) -> list[tuple[str, str, str | None, tuple[int, int] | None]]:
    """The other direction of :func:`single_file_recipes`, from names and shapes only:
    ``(single name, diffusers name, transform, rows)`` per diffusers tensor, in source order;
    ``rows`` is the part's ``(start, stop)`` along dim 0 of the *transformed* single-file
    tensor when it is fused (OpenCLIP in_proj, Flux qkv / linear1), else None. Known
    single-file-only tensors are left out; unknown names raise unless ``strict=False``."""
    skip = {e.single for e in km.extras}
    out = []
    unknown = []
    for name, shape in shapes.items():
        if name in skip:
            continue
        target = km.s2d(name)
        if target is None:
            unknown.append(name)
            continue
        if len(target.parts) == 1:
            out.append((name, target.parts[0], target.transform, None))
            continue
        total = _bwd(target.transform, torch.empty(shape, device="meta")).shape[0]
        a = 0
        for pname, n in zip(target.parts, _part_sizes(target, total, km.hidden)):
            out.append((name, pname, target.transform, (a, a + n)))
            a += n
    if unknown and strict:
        raise KeyMapError(f"{len(unknown)} {kind} tensor(s){where} have no diffusers name, "
                          f"e.g. {unknown[:3]}", key=unknown[0])
    return out


def to_diffusers(kind: str, sd: Mapping[str, torch.Tensor], config=None, *,
                 strict: bool = True) -> dict[str, torch.Tensor]:
    """Single-file state dict of one component (no checkpoint prefix) -> diffusers names.

    Split tensors are views of the fused input (contiguous along dim 0). Known single-file-only
    tensors (``position_ids``, ``logit_scale``) are dropped.
    """
    km = get_map(kind, config, names=sd.keys(), side="s", sd=sd)
    out: dict[str, torch.Tensor] = {}
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    for single, name, transform, rows in diffusers_recipes(kind, km, shapes, strict=strict):
        t = _bwd(transform, sd[single])
        out[name] = t if rows is None else t[rows[0]:rows[1]]
    return out


# --------------------------------------------------------------------------- names only


def resolve(kind: str, diffusers_name: str, config=None) -> Resolved:
    """Full answer for one diffusers name (parameter or module name).

    A module name without ``.weight``/``.bias`` that only exists fused (OpenCLIP q/k/v) resolves
    through its ``.weight``: ``...self_attn.q_proj`` -> ``...attn.in_proj_weight`` part 0 of 3.
    """
    km = get_map(kind, config)
    hit = km.d2s(diffusers_name)
    if hit is None and not diffusers_name.endswith((".weight", ".bias")):
        hit = km.d2s(diffusers_name + ".weight")
    if hit is None:
        raise KeyMapError(f"no single-file name for this {kind} name", key=diffusers_name)
    target, k = hit
    sl = None
    if len(target.parts) > 1:
        start = stop = None
        h = km.hidden
        sizes = target.sizes or ("h",) * len(target.parts)
        ratio = getattr(km, "mlp_ratio", None)       # "*" = the MLP (data: [hidden] mlp_ratio)
        if h is not None and ("*" not in sizes or ratio):
            vals = [h if s == "h" else (int(ratio * h) if s == "*" else int(s)) for s in sizes]
            start = sum(vals[:k])
            stop = start + vals[k]
        sl = Slice(0, k, len(target.parts), start, stop)
    return Resolved(target.single, sl, target.transform, target.parts)


def single_file_name(kind: str, diffusers_name: str, config=None) -> tuple[str, Slice | None]:
    """``(single_file_name, slice_or_None)`` of one diffusers parameter/module name."""
    r = resolve(kind, diffusers_name, config)
    return r.single, r.slice


def diffusers_names(kind: str, single_name: str, config=None) -> tuple[str, ...]:
    """Diffusers name(s) of one single-file name (several when it is fused)."""
    km = get_map(kind, config)
    t = km.s2d(single_name)
    if t is None:
        raise KeyMapError(f"no diffusers name for this {kind} name", key=single_name)
    return t.parts


# --------------------------------------------------------------------------- architectures


def archs() -> tuple[str, ...]:
    from .. import archs as _archs

    return tuple(_archs.load_all())


def components(arch: str, layout: str | None = None) -> dict[str, tuple[str, str]]:
    """``{component folder name: (kind, single-file prefix)}`` for one architecture and layout.

    Prefixes come from the architecture's data file (formats/<arch>.toml); ``layout`` defaults
    to its full single-file layout (``sgm``; ``comfy`` for Flux); ``"sgm"`` asked of Flux means
    that same full layout.
    """
    from .. import archs as _archs

    a = _archs.get(arch)
    if layout is None or (layout == "sgm" and not any(x.name == "sgm" for x in a.layouts)):
        layout = a.single_file_layout
    lay = a.layout(layout)
    return {name: (a.components[name].keymap, prefix) for name, prefix in lay.prefixes.items()}


def pipeline_class_name(arch: str) -> str:
    from .. import archs as _archs

    return _archs.get(arch).pipeline


def arch_to_single_file(arch: str, component_sds: Mapping[str, Mapping[str, torch.Tensor]],
                        layout: str | None = None, configs: Mapping | None = None,
                        extras: bool = True) -> dict[str, torch.Tensor]:
    """``{component: diffusers state dict}`` -> one single-file state dict with prefixes."""
    comps = components(arch, layout)
    out: dict[str, torch.Tensor] = {}
    for name, sd in component_sds.items():
        if name not in comps:
            continue  # e.g. the text encoders of a transformer-only BFL file
        kind, prefix = comps[name]
        cfg = (configs or {}).get(name)
        for k, v in to_single_file(kind, sd, cfg, extras=extras).items():
            out[prefix + k] = v
    return out


def arch_to_diffusers(arch: str, single_sd: Mapping[str, torch.Tensor], layout: str | None = None,
                      configs: Mapping | None = None, strict: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """One single-file state dict -> ``{component: diffusers state dict}``."""
    comps = components(arch, layout)
    # longest prefix first so that "" (BFL) never shadows a real prefix
    order = sorted(comps.items(), key=lambda kv: -len(kv[1][1]))
    split: dict[str, dict[str, torch.Tensor]] = {name: {} for name in comps}
    unknown = []
    for k, v in single_sd.items():
        for name, (_, prefix) in order:
            if k.startswith(prefix):
                split[name][k[len(prefix):]] = v
                break
        else:
            unknown.append(k)
    if unknown and strict:
        raise KeyMapError(f"{len(unknown)} tensor(s) belong to no {arch} component, e.g. {unknown[:3]}",
                          key=unknown[0])
    return {name: to_diffusers(comps[name][0], sd, (configs or {}).get(name), strict=strict)
            for name, sd in split.items() if sd}
