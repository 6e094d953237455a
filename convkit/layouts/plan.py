"""Plan one component's tensors into another naming and prefix, streaming.

A component is read under its source naming (single-file: SGM/LDM, OpenCLIP, BFL; or diffusers)
and written under the target naming and prefix. Every stored tensor of the component is read
once (a fused tensor is split by one :class:`~convkit.engine.ops.Rows` item into its parts, and
its parts are placed by one item each into one shared output); chunked wherever the key map's
transform allows it (all but ``transpose``, which touches at most one 1280x1280 matrix).

Single-file-only tensors that diffusers has no place for (CLIP ``position_ids``, OpenCLIP
``logit_scale``) are kept, values and dtype, in the diffusers file's metadata
(``convkit.single_file_extras``) so that single file -> diffusers -> single file is bit-exact;
without that key the key map's defaults are written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .. import dtypes, keymap
from ..casts import CastContext
from ..engine import Item, Out, Src
from ..engine.ops import Cast, Const, Rows, Transform
from ..keymap import _bwd, _fwd
from ..loading import component_tensors, fill_value

EXTRAS_KEY = "convkit.single_file_extras"
# transformers 5 names CLIPTextModel's weights without "text_model."; every released diffusers
# folder (and transformers < 5, e.g. Forge's 4.46) has it, and transformers 5 loads both
CLIP_L_SPELLING = "text_model."


@dataclass
class Placement:
    """Where one component goes: naming ("single" = the architecture's single-file names,
    "diffusers"), key prefix, output file id, and the float cast (None keeps each tensor's
    logical dtype: a quantized input is decoded to it)."""

    comp: str
    naming: str
    prefix: str
    file: str
    cast: object = None
    metadata: dict = field(default_factory=dict)     # filled: what this component's file needs


def is_single(naming: str) -> bool:
    return naming != "diffusers"


def _target(place: Placement, dtype: str) -> str:
    return place.cast.target(dtype) if place.cast is not None else dtype


def plan_component(src, det, inp: int, place: Placement, ctx: CastContext,
                   notes: list[str]) -> list[Item]:
    """Items writing ``place.comp`` of input ``inp`` (``src``, detected as ``det``)."""
    same = is_single(det.layout.naming) == is_single(place.naming)
    if same:
        return _rename(src, det, inp, place, ctx)
    if is_single(det.layout.naming):
        return _to_diffusers(src, det, inp, place, ctx, notes)
    return _to_single(src, det, inp, place, ctx, notes)


def _item(op, inp, key, outs, info, comp, **kw) -> Item:
    return Item(op, (Src(inp, key),), outs, tuple(info.shape), info.dtype, info.storage,
                info.nbytes, comp, **kw)


def _rename(src, det, inp, place, ctx) -> list[Item]:
    comp = place.comp
    pre = det.layout.prefixes.get(comp, "")
    kind = det.arch.components[comp].keymap
    spell = _clip_spelling(kind) and place.naming == "diffusers"
    op = Cast(ctx)
    items = []
    for k in _ordered(src, det, comp):
        info = src.info(k)
        rel = k[len(pre):]
        if spell and not rel.startswith(CLIP_L_SPELLING):
            rel = CLIP_L_SPELLING + rel
        out = Out(place.prefix + rel, _target(place, info.dtype), tuple(info.shape), place.file)
        items.append(_item(op, inp, k, [out], info, comp))
    if is_single(place.naming):
        # a part convkit wrote under names both sides share (CLIP-L's text_model.*) keeps the
        # single-file buffers it left out in its metadata
        stored = json.loads(_file_metadata(src, det, comp).get(EXTRAS_KEY) or "{}")
        have = {k[len(pre):] for k in _ordered(src, det, comp)}
        values = {place.prefix + n: _stored_tensor(v) for n, v in stored.items() if n not in have}
        if values:
            items.append(_const(values, place, comp))
    return items


def _clip_spelling(kind: str) -> bool:
    """The kind's diffusers side is CLIPTextModel, spelled with or without ``text_model.``
    (formats/keymaps/index.toml clip_spelling)."""
    from ..keymap import kind_info

    return bool(kind_info(kind).get("clip_spelling"))


def _stored_tensor(s: dict) -> torch.Tensor:
    return torch.tensor(s["values"], dtype=dtypes.to_torch(s["dtype"])).reshape(s["shape"])


def _const(values: dict, place, comp) -> Item:
    outs = [Out(k, dtypes.from_torch(t.dtype), tuple(t.shape), place.file)
            for k, t in values.items()]
    return Item(Const(values), (), outs, (), "-", "", 0, comp, reason="single-file buffer")


def _ordered(src, det, comp) -> list[str]:
    keys = set(det.component_keys.get(comp, ()))
    return [k for k in src.keys() if k in keys]


# --------------------------------------------------------------------------- single -> diffusers


def _to_diffusers(src, det, inp, place, ctx, notes) -> list[Item]:
    comp = place.comp
    kind = det.arch.components[comp].keymap
    by_key: dict[str, list] = {}
    fills = {}
    for t in component_tensors(src, det, comp):
        if t.fill:
            fills[t.name] = fill_value(t)
            continue
        by_key.setdefault(t.key, []).append(t)
    name = (lambda n: n if n.startswith(CLIP_L_SPELLING) else CLIP_L_SPELLING + n) \
        if _clip_spelling(kind) else (lambda n: n)
    items = []
    for key, ts in by_key.items():
        info = src.info(key)
        dt = _target(place, info.dtype)
        outs = [Out(place.prefix + name(t.name), dt, t.shape, place.file) for t in ts]
        tr = ts[0].transform
        if len(ts) > 1:                     # a fused tensor: its row ranges are the parts
            row = _row(info.shape)
            items.append(_item(Rows(ctx, "split rows"), inp, key, outs, info, comp,
                               extra={"row": row, "rows": [(t.part[0], t.part[1], i, 0)
                                                           for i, t in enumerate(ts)]}))
        elif tr in (None, "conv1x1"):       # conv1x1: the same bytes under a 2-D shape
            items.append(_item(Cast(ctx), inp, key, outs, info, comp,
                               reason="1x1 conv -> linear" if tr else ""))
        elif tr == "swap_halves":
            items.append(_swap(inp, key, outs[0], info, comp, ctx))
        else:
            items.append(_item(Transform(lambda it, xs, tr=tr: _bwd(tr, xs[0]), ctx, tr), inp,
                               key, outs, info, comp))
    if fills:
        values = {place.prefix + name(n): v.to(dtypes.to_torch(_target(place, dtypes.from_torch(v.dtype))))
                  for n, v in fills.items()}
        items.append(_const(values, place, comp))
        notes.append(f"{comp}: {', '.join(fills)} not in the input; written as the identity "
                     "the model uses in its place (formats/<arch>.toml fill)")
    extras = _read_extras(src, det, comp)
    if extras:
        place.metadata[EXTRAS_KEY] = json.dumps(extras, separators=(",", ":"))
        notes.append(f"{comp}: {', '.join(extras)} kept in the file's metadata "
                     f"({EXTRAS_KEY}; diffusers has no parameter for them)")
    return items


def _row(shape) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def _swap(inp, key, out, info, comp, ctx) -> Item:
    h = info.shape[0] // 2
    return _item(Rows(ctx, "swap halves"), inp, key, [out], info, comp,
                 extra={"row": _row(info.shape), "rows": [(0, h, 0, h), (h, 2 * h, 0, 0)]})


def _read_extras(src, det, comp) -> dict:
    """Single-file-only tensors of the component: name -> {dtype, shape, values}."""
    kind = det.arch.components[comp].keymap
    pre = det.layout.prefixes.get(comp, "")
    rels = {k[len(pre):]: k for k in _ordered(src, det, comp)}
    meta = {r: torch.empty(tuple(src.info(k).shape), device="meta") for r, k in rels.items()}
    km = keymap.get_map(kind, None, names=list(rels), side="s", sd=meta)
    out = {}
    for e in km.extras:
        if e.single in rels:
            t = src.load(rels[e.single])
            out[e.single] = {"dtype": dtypes.from_torch(t.dtype), "shape": list(t.shape),
                             "values": t.reshape(-1).tolist()}
    return out


# --------------------------------------------------------------------------- diffusers -> single


def _to_single(src, det, inp, place, ctx, notes) -> list[Item]:
    comp = place.comp
    kind = det.arch.components[comp].keymap
    pre = det.layout.prefixes.get(comp, "")
    rels = {k[len(pre):]: k for k in _ordered(src, det, comp)}
    meta = {r: torch.empty(tuple(src.info(k).shape), device="meta") for r, k in rels.items()}
    km = keymap.get_map(kind, None, names=list(rels), side="d", sd=meta)
    items = []
    made: dict[str, tuple] = {}
    for single, (tr, names) in keymap.single_file_recipes(kind, km, rels,
                                                          where=f" of '{comp}'").items():
        infos = [src.info(rels[n]) for n in names]
        dt = _target(place, infos[0].dtype)
        key = place.prefix + single
        if len(names) > 1:                  # parts placed into one fused output
            rows = [i.shape[0] for i in infos]
            shape = (sum(rows), *infos[0].shape[1:])
            out = Out(key, dt, shape, place.file)
            at = 0
            for n, info, r in zip(names, infos, rows):
                items.append(_item(Rows(ctx, "place rows"), inp, rels[n], [out], info, comp,
                                   extra={"row": _row(info.shape), "rows": [(0, r, 0, at)],
                                          "out_bytes": out.nbytes * r // shape[0]}))
                at += r
            made[single] = shape
            continue
        info = infos[0]
        shape = tuple(_fwd(tr, torch.empty(tuple(info.shape), device="meta")).shape)
        out = Out(key, dt, shape, place.file)
        made[single] = shape
        if tr in (None, "conv1x1"):
            items.append(_item(Cast(ctx), inp, rels[names[0]], [out], info, comp,
                               reason="linear -> 1x1 conv" if tr else ""))
        elif tr == "swap_halves":
            items.append(_swap(inp, rels[names[0]], out, info, comp, ctx))
        else:
            items.append(_item(Transform(lambda it, xs, tr=tr: _fwd(tr, xs[0]), ctx, tr), inp,
                               rels[names[0]], [out], info, comp))
    items += _restore_extras(_file_metadata(src, det, comp), km, made, place, comp, notes)
    return items


def _restore_extras(md, km, made, place, comp, notes) -> list[Item]:
    stored = {}
    raw = md.get(EXTRAS_KEY)
    if raw:
        stored = json.loads(raw)
    values = {}
    for e in km.extras:
        if e.single in stored:
            t = _stored_tensor(stored[e.single])
        else:
            t = keymap._make_extra(e, {k: torch.empty(sh, device="meta")
                                       for k, sh in made.items()})
            if t is None:
                continue
        values[place.prefix + e.single] = t
    if not values:
        return []
    if not stored:
        notes.append(f"{comp}: {', '.join(values)} written with their standard values "
                     "(the diffusers input does not carry them)")
    return [_const(values, place, comp)]


def _file_metadata(src, det, comp) -> dict:
    """Metadata of the file the component came from (each component file of a diffusers
    folder carries its own)."""
    raw = getattr(src, "raw", src)
    per = getattr(raw, "component_metadata", None)
    if per is not None:
        return per.get(det.layout.prefixes.get(comp, "").rstrip("/"), {})
    return dict(src.metadata or {})
