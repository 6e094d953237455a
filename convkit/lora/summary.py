"""What a LoRA file is, the way users look at one (for ``convkit inspect``).

:func:`summarize` describes a LoRA / LyCORIS file from its header: which tool family's naming it
follows, which architecture its module names belong to and how many of them match, what it covers
(components, 3×3 convs, text encoders, attention, feed-forward), ranks, alphas, dtypes and the
metadata users look for. Only names, shapes and dtypes are read, plus the scalar alphas
(:func:`convkit.lora.formats.read_lora` loads those); the factors stay on disk.

Nothing here is a name table: the format families and what a module is are data
(formats/lora/keys.toml ``[family]``, ``[covers]`` and ``family`` on the prefix / suffix
entries); module names are looked up in the module tables of the released architectures
(:func:`convkit.lora.table.table_for_arch`), the tables merge-lora and convert-lora use.
"""
from __future__ import annotations

import functools
import math
import os
import re
from collections import Counter
from pathlib import Path

from .. import archs
from ..errors import ConvkitError, InputFormatError
from ..sources.base import TensorSource
from .data import keys_data
from .formats import ALGOS, Adapter, LoraFile, check_shape, component_in, match, read_lora
from .table import ModuleTable, Unit, table_for_arch

NOT_A_LORA = "no LoRA/LyCORIS tensors found"    # read_lora's message for a checkpoint
MAX_LISTED = 8          # unmatched names / other tensors listed
MAX_SCALES = 8          # distinct alpha/rank values listed one by one
MAX_VALUE = 100         # metadata values longer than this are cut in the text lines

# Metadata users look for. ss_*: written by kohya sd-scripts (train_network.py, and LyCORIS /
# OneTrainer / convkit extract-lora after it); modelspec.*: Stability AI's ModelSpec
# (sai_model_spec) keys; convkit.*: convkit's own provenance.
METADATA_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                 "ss_base_model_version")
METADATA_PREFIXES = ("modelspec.", "convkit.")

# Adapter kinds beyond a plain LoRA, in the order they are named in ``format``
VARIANTS = tuple(a for a in ALGOS if a != "lora") + ("tucker", "dora")

SPACE_NAMES = {"single": "single-file", "diffusers": "diffusers"}


# ----------------------------------------------------------------- data (formats/lora/keys.toml)

@functools.cache
def _family_order() -> tuple[str, ...]:
    return tuple(keys_data().get("family", {}).get("order", ()))


def family_title(family: str) -> str:
    return keys_data().get("family", {}).get("title", {}).get(family, "")


@functools.cache
def _covers_rx() -> dict[str, list[re.Pattern]]:
    return {k: [re.compile(p) for p in v] for k, v in keys_data().get("covers", {}).items()}


# ----------------------------------------------------------------- one adapter

def adapter_family(ad: Adapter) -> str | None:
    """The tool family an adapter's spelling names: the first family of keys.toml's
    ``[family].order`` that its prefix or one of its tensor suffixes carries, or None."""
    data = keys_data()
    named = set()
    prefix = ad.ref[: len(ad.ref) - len(ad.module)]
    if prefix:
        named.add(data["prefix"].get(prefix, {}).get("family"))
    for key in ad.keys.values():
        named.add(data["suffix"].get(key[len(ad.ref):], {}).get("family"))
    named.discard(None)
    if not named:
        return None
    order = _family_order()
    return min(named, key=lambda f: (order.index(f) if f in order else len(order), f))


def adapter_variants(ad: Adapter) -> set[str]:
    """What the adapter is beyond a plain LoRA: its LyCORIS algo, a Tucker core, DoRA."""
    out = {ad.algo} - {"lora"}
    if "mid" in ad.keys or "t1" in ad.keys or "t2" in ad.keys:   # LoCon lora_mid, hada_t*, lokr_t2
        out.add("tucker")
    if ad.dora:
        out.add("dora")
    return out


def _kernel(ad: Adapter, unit: Unit | None, src: TensorSource) -> tuple[int, ...] | None:
    """Spatial kernel of the target: () for a linear layer, (kh, kw) for a conv, None when unknown.

    From the matched unit's shape in the module table; otherwise from the adapter's tensors
    where they carry it (a 4-D LoRA down / Tucker core / LoKr factor / full diff)."""
    if unit is not None:        # 1-D units (norm weights a full diff may patch) are neither
        return {4: tuple(unit.shape[2:]), 2: ()}.get(len(unit.shape))
    role = {"lora": "mid" if "mid" in ad.keys else "down", "loha": "t1",
            "lokr": "t2" if "t2" in ad.keys else "w2", "full": "diff"}.get(ad.algo)
    if role not in ad.keys:
        return None
    shape = ad.shape(src, role)
    if len(shape) == 4:
        return tuple(shape[2:])
    return () if len(shape) == 2 and ad.algo in ("lora", "full") else None


def _match(ad: Adapter, table: ModuleTable) -> tuple[Unit | None, bool]:
    """(unit, ambiguous)."""
    try:
        return match(ad, table), False
    except ConvkitError:        # a name two modules share (match raises InputFormatError)
        ad.unit = None
        return None, True


# ----------------------------------------------------------------- architecture

def arch_scores(lf: LoraFile) -> dict[str, int]:
    """For every architecture shipped in formats/: how many adapters its module names match."""
    scores = {}
    for name in archs.load_all():
        try:
            table = table_for_arch(name)
        except Exception:  # pragma: no cover - a broken arch file must not hide the LoRA
            continue
        scores[name] = sum(_match(ad, table)[0] is not None for ad in lf.adapters)
    return scores


def shape_fits(lf: LoraFile, table: ModuleTable) -> int:
    """How many adapters match a module of ``table`` whose (full-size) weight shape they fit."""
    n = 0
    for ad in lf.adapters:
        u = _match(ad, table)[0]
        n += u is not None and check_shape(ad, lf, u) is None
    return n


# ----------------------------------------------------------------- helpers

def _kind(spec: archs.Arch | None, component: str) -> str | None:
    """diffusion_model | text_encoder | vae, from the arch data (any arch when none matched)."""
    for a in ([spec] if spec else archs.load_all().values()):
        if component in a.components:
            return a.components[component].kind
    return None


def _num(x: float) -> str:
    return f"{x:.6g}"


def _sorted_counts(c: Counter) -> dict[str, int]:
    """Counts keyed by str, numbers first in numeric order, then words."""
    def key(kv):
        try:
            return (0, float(kv[0]), "")
        except ValueError:
            return (1, 0.0, kv[0])
    return {str(k): n for k, n in sorted(c.items(), key=key)}


def _metadata(meta: dict[str, str]) -> dict[str, str]:
    out = {k: meta[k] for k in METADATA_KEYS if k in meta}
    out.update({k: v for k, v in meta.items() if k.startswith(METADATA_PREFIXES)})
    return out


# ----------------------------------------------------------------- summary

def summarize(path: str | os.PathLike) -> dict | None:
    """A JSON-able description of a LoRA / LyCORIS file, or None when ``path`` is not one
    (a checkpoint, or a diffusers folder). Reads headers only (and the scalar alphas).

    Keys: ``format`` (family + non-plain kinds, e.g. "kohya", "peft dora", "kohya loha+tucker"),
    ``family`` / ``family_title`` / ``families`` (adapters per family), ``variants``;
    ``architecture`` / ``architecture_title`` / ``also_matches`` (archs whose names match as
    many), ``matched`` / ``unmatched`` / ``unmatched_first`` (against that arch's module table);
    ``modules``, ``per_component``, ``module_names`` (per component: "single-file" or "diffusers"
    module paths); ``algos``, ``ranks``, ``alphas`` (low-rank modules; "none" = no alpha),
    ``scale`` (alpha/rank: min, max, values when few); ``covers`` (module counts: convs_3x3 =
    k×k convs with k > 1, convs_1x1, linear, text_encoders, attention, feed_forward);
    ``dtypes``, ``tensors``, ``bytes`` (tensor data), ``file_bytes``, ``other_tensors`` /
    ``other_first`` (keys that are no adapter part), ``metadata`` (highlights), ``notes``.
    Count dicts are keyed by strings ("4", "none", "full"), so the dict survives JSON unchanged.
    """
    if Path(path).is_dir():             # read_lora refuses folders; a LoRA is one file
        return None
    try:
        lf = read_lora(path)
    except InputFormatError as e:
        if e.detail.startswith(NOT_A_LORA):
            return None
        raise
    try:
        return _summarize(lf)
    finally:
        lf.close()


def _summarize(lf: LoraFile) -> dict:
    src = lf.source
    ads = lf.adapters

    # --- format family and adapter kinds
    fams = Counter(adapter_family(ad) or "unknown" for ad in ads)
    family = fams.most_common(1)[0][0]
    variants = set().union(*(adapter_variants(ad) for ad in ads))
    variants = [v for v in VARIANTS if v in variants]
    fmt = family + (" " + "+".join(variants) if variants else "")

    # --- architecture: the one whose module names match most adapters; names alone may tie
    # (SD1.5 and SDXL share diffusers UNet names, Flux dev and schnell all names): then the one
    # whose released model's tensor shapes fit most adapters, else the first; the others are
    # listed in also_matches
    scores = arch_scores(lf)
    best = max(scores.values(), default=0)
    tied = [a for a, n in scores.items() if best and n == best]
    notes = []
    arch = tied[0] if tied else None
    if len(tied) > 1:
        fits = {a: shape_fits(lf, table_for_arch(a)) for a in tied}
        arch = max(tied, key=lambda a: fits[a])
        if all(fits[a] < fits[arch] for a in tied if a != arch):
            notes.append(f"module names match {', '.join(a for a in tied if a != arch)} as well; "
                         f"the tensor shapes fit {arch}")
    table = table_for_arch(arch) if arch else None
    units: list[Unit | None] = []
    ambiguous = 0
    for ad in ads:
        u, amb = _match(ad, table) if table else (None, False)
        units.append(u)
        ambiguous += amb
    unmatched = [ad.ref for ad, u in zip(ads, units) if u is None]
    spec = archs.get(arch) if arch else None

    # --- components and the naming space of the module paths
    def component(ad: Adapter, u: Unit | None) -> str:
        if u is not None:
            return u.component
        if spec is None:
            return component_in(ad.component, "diffusion model", {}) or "unknown"  # "@keymap:t5"
        return component_in(ad.component, spec.diffusion_component,
                            {c.name: c.keymap for c in spec.components.values()}) or "unknown"

    comps = [component(ad, u) for ad, u in zip(ads, units)]
    per_component = dict(Counter(comps))
    spaces: dict[str, Counter] = {}
    for c, u in zip(comps, units):
        if u is not None:
            spaces.setdefault(c, Counter())[u.space] += 1
    module_names = {c: (SPACE_NAMES[s.most_common(1)[0][0]] if len(s) == 1 else
                        "mixed (" + ", ".join(f"{SPACE_NAMES[k]} {n}" for k, n in s.items()) + ")")
                    for c, s in spaces.items()}

    # --- ranks, alphas, scales (low-rank modules; full diffs have neither)
    ranks, alphas, scales = Counter(), Counter(), Counter()
    for ad in ads:
        r = ad.rank(src)
        ranks[str(r) if r else "full"] += 1
        if r:
            alphas[_num(ad.alpha) if ad.alpha is not None else "none"] += 1
            scales[ad.scale(src)] += 1
    scale: dict = {}
    if scales:
        scale = {"min": min(scales), "max": max(scales)}
        if len(scales) <= MAX_SCALES:
            scale["values"] = _sorted_counts(Counter({_num(k): n for k, n in scales.items()}))

    # --- what the modules cover
    covers = Counter({"convs_3x3": 0, "convs_1x1": 0, "linear": 0, "text_encoders": 0,
                      "attention": 0, "feed_forward": 0})
    rx = _covers_rx()
    for ad, u, c in zip(ads, units, comps):
        k = _kernel(ad, u, src)
        if k == ():
            covers["linear"] += 1
        elif k is not None:
            covers["convs_3x3" if math.prod(k) > 1 else "convs_1x1"] += 1
        if _kind(spec, c) == "text_encoder":
            covers["text_encoders"] += 1
        if u is not None:
            for what, pats in rx.items():
                if any(p.search(part) for part in u.parts for p in pats):
                    covers[what] += 1

    if alphas.get("none"):
        notes.append(f"{alphas['none']} modules have no alpha: alpha = rank (scale 1) is used"
                     + (" (PEFT folds alpha/rank into lora_B)" if family == "peft" else ""))
    if "lora_adapter_metadata" in lf.metadata:
        notes.append("lora_adapter_metadata (PEFT alpha/rank patterns) is present; convkit does "
                     "not read it")
    if ambiguous:
        notes.append(f"{ambiguous} module names are ambiguous in {arch}")

    dts = Counter(i.stored_as for i in src.infos())
    d = {
        "path": str(lf.path),
        "format": fmt,
        "family": family,
        "family_title": family_title(family),
        "families": dict(fams.most_common()),
        "variants": variants,
        "architecture": arch,
        "architecture_title": spec.title if spec else None,
        "also_matches": [a for a in tied if a != arch],
        "matched": len(ads) - len(unmatched) if arch else 0,
        "unmatched": len(unmatched),
        "unmatched_first": unmatched[:MAX_LISTED],
        "modules": len(ads),
        "per_component": per_component,
        "module_names": module_names,
        "algos": dict(lf.algos().most_common()),
        "ranks": _sorted_counts(ranks),
        "alphas": _sorted_counts(alphas),
        "scale": scale,
        "covers": dict(covers),
        "dtypes": dict(dts.most_common()),
        "tensors": len(src),
        "bytes": src.total_bytes,
        "file_bytes": sum(f.stat().st_size for f in src.files()),
        "other_tensors": len(lf.stray),
        "other_first": lf.stray[:MAX_LISTED],
        "metadata": _metadata(lf.metadata),
        "notes": notes,
    }
    return d


# ----------------------------------------------------------------- text

def _counts(d: dict, sep: str = " ×") -> str:
    return ", ".join(f"{k}{sep}{n:,d}" for k, n in d.items())


def format_summary(d: dict) -> list[str]:
    """Human lines for ``convkit inspect`` (same 14-column labels as inspection.format_report)."""
    def line(label: str, text: str) -> str:
        return f"{label + ':' if label else '':<14}{text}"

    out = [line("LoRA", d["format"] + (f" — {d['family_title']}" if d.get("family_title") else ""))]
    if len(d["families"]) > 1:
        out.append(line("", "mixed spellings: " + _counts(d["families"], " ")))
    n = d["modules"]
    if d["architecture"]:
        out.append(line("architecture", f"{d['architecture']} — {d['architecture_title']} "
                                        f"({d['matched']:,d} of {n:,d} modules match its names)"))
        if d["also_matches"]:
            out.append(line("", "as many match " + ", ".join(d["also_matches"])))
    else:
        out.append(line("architecture", "not recognised (no module name matches a known model)"))
    out.append(line("modules", f"{n:,d}: " + _counts(d["per_component"], " ")))
    if d["module_names"]:
        out.append(line("module names", ", ".join(f"{c} {s}" for c, s in
                                                  d["module_names"].items())))
    out.append(line("algorithms", _counts(d["algos"], " ")))
    out.append(line("rank", _counts(d["ranks"])))
    if d["alphas"]:
        out.append(line("alpha", _counts(d["alphas"])))
    sc = d["scale"]
    if sc:
        out.append(line("scale", _counts(sc["values"]) if "values" in sc else
                        f"{_num(sc['min'])} .. {_num(sc['max'])} (alpha/rank)"))
    c = d["covers"]
    parts = [("3×3 convs", c["convs_3x3"]), ("1×1 convs", c["convs_1x1"]), ("linear", c["linear"]),
             ("text encoders", c["text_encoders"]), ("attention", c["attention"]),
             ("feed-forward", c["feed_forward"])]
    out.append(line("covers", ", ".join(f"{k} {v:,d}" for k, v in parts)))
    out.append(line("tensors", f"{d['tensors']:,d} ({_counts(d['dtypes'], '×')}), "
                               f"{d['bytes']:,d} bytes"))
    if d["unmatched"] and d["architecture"]:
        out.append(line("unmatched", f"{d['unmatched']:,d} (first: "
                                     f"{', '.join(d['unmatched_first'][:3])})"))
    if d["other_tensors"]:
        out.append(line("other", f"{d['other_tensors']:,d} tensors are no adapter part (first: "
                                 f"{', '.join(d['other_first'][:3])})"))
    if d["metadata"]:
        out.append("metadata:")
        for k, v in d["metadata"].items():
            v = str(v)
            out.append(f"  {k}: {v if len(v) <= MAX_VALUE else v[:MAX_VALUE - 3] + '...'}")
    out += [f"note: {x}" for x in d["notes"]]
    return out
