"""Lone component files ("parts"): what a file holding one text encoder, VAE or diffusion model is.

ComfyUI, Forge and stable-diffusion.cpp users keep text encoders, VAEs and diffusion models as
separate files (``text_encoders/clip_l.safetensors``, ``vae/ae.safetensors``, ...).
:func:`convkit.archs.detect` recognises checkpoints by their diffusion model, so a CLIP-L, CLIP-G,
T5 or VAE file alone is "unknown architecture" there; :func:`detect_part` says which keymap kind,
naming and prefix such a file has, and which architectures' components it can be.

The rules are data (``formats/parts.toml``): per (kind, naming) a signature of keys and ranks,
per (kind, naming, prefix) an entry citing where that spelling occurs. A file is a part only when
*every* key is explained by one entry: all keys carry the prefix and match the signature's
``allow`` patterns, and its ``require``/``forbid``/``ndim`` hold. A diffusion model alone is found
by :func:`convkit.archs.detect` (its one-component layouts) and reported as kind ``unet``/``flux``.

``naming`` is the side of the kind's key map the names are on. Where both sides use the same
names (T5 always; CLIP-L's ``text_model.*``) it is "single": the single-file side reads them and
maps them to the spelling the installed transformers uses (transformers >= 5.6 writes CLIP-L
without ``text_model.``, which is "diffusers").

A full checkpoint is never a part: when :func:`convkit.archs.detect` finds keys of two or more
components (or keys outside them), :func:`detect_part` returns None and the checkpoint is
described by that detection.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace

from .. import archs
from ..data import formats_dir, load_toml
from ..errors import (
    InputFormatError,
    UnknownArchitectureError,
    UnknownNameError,
    UsageError,
)

#: metadata key convkit writes into the parts it makes: "<arch>/<component>"
PART_METADATA = "convkit.part"

def diffusion_kinds() -> tuple[str, ...]:
    """Keymap kinds of diffusion models: their architecture is known from their keys
    (archs.detect); formats/keymaps/index.toml says which they are."""
    from ..keymap import diffusion_kinds as kinds

    return kinds()


@dataclass(frozen=True)
class PartMatch:
    kind: str        # keymap kind: clip_l | openclip | t5 | vae | unet | flux
    naming: str      # "single" (the single-file side of the kind's keymap) or "diffusers"
    prefix: str      # common prefix of every key ("" when none)
    keys: tuple[str, ...]
    title: str       # e.g. "CLIP-L text encoder (transformers names)"
    archs: tuple[tuple[str, str], ...]   # (arch, component) pairs this part can be
    note: str = ""   # what the keys cannot tell (e.g. CLIP-L with projection vs CLIP-G)
    #: other (kind, naming) pairs whose names are exactly these keys (SDXL's CLIP-G in
    #: transformers names = SD3's clip_proj encoders): the component it is given to decides
    also: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """``clip_l (CLIP-L text encoder, transformers names)``."""
        return label(self.kind, self.title)

    @property
    def fits(self) -> list[str]:
        return [f"{a}/{c}" for a, c in self.archs]


def label(kind: str, title: str) -> str:
    """``clip_l`` + ``CLIP-L text encoder (transformers names)`` ->
    ``clip_l (CLIP-L text encoder, transformers names)`` (titles end in "(<naming>)")."""
    what, _, naming = title.rpartition(" (")
    return f"{kind} ({what}, {naming.removesuffix(')')})" if what else f"{kind} ({title})"


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Signature:
    kind: str
    naming: str
    title: str
    require: tuple[str, ...]
    forbid: tuple[str, ...]
    ndim: dict[str, int]
    allow: re.Pattern
    note: str = ""

    @property
    def weight(self) -> int:
        """How much evidence the signature asks for (ranks two fitting signatures)."""
        return len(self.require) + len(self.forbid) + len(self.ndim)


@dataclass(frozen=True)
class Entry:
    kind: str
    naming: str
    prefix: str
    source: str


@dataclass(frozen=True)
class FitRule:
    kind: str
    archs: tuple[str, ...]
    require: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rules:
    kind_titles: dict[str, str]
    naming_titles: dict[str, str]
    signatures: dict[tuple[str, str], Signature]
    entries: tuple[Entry, ...]
    fits: tuple[FitRule, ...] = field(default=())


def _allow_regex(patterns: list[str]) -> re.Pattern:
    """``{i}`` a block number, ``*`` any non-empty rest, anything else literal; full match."""
    def one(p: str) -> str:
        out = []
        for tok in re.split(r"(\{i\}|\*)", p):
            out.append(r"\d+" if tok == "{i}" else ".+" if tok == "*" else re.escape(tok))
        return "".join(out)
    return re.compile("|".join(f"(?:{one(p)})" for p in patterns))


def rules() -> Rules:
    """formats/parts.toml, parsed (cached per formats folder, like every data file)."""
    return _rules(str(formats_dir()))


@functools.cache
def _rules(root: str) -> Rules:
    try:
        r = _parse(load_toml("parts.toml"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # a typo in the data (or in a CONVKIT_FORMATS_DIR copy) is one line, not a traceback
        raise InputFormatError(f"malformed part rules ({type(e).__name__}: {e})",
                               path=f"{root}/parts.toml") from None
    missing = [f"{e.kind}/{e.naming}" for e in r.entries if (e.kind, e.naming) not in r.signatures]
    if missing:
        raise InputFormatError(f"[[part]] entries without a signature: {', '.join(missing)}",
                               path=f"{root}/parts.toml")
    return r


def _parse(d: dict) -> Rules:
    sigs = {}
    for kind, by_naming in d.get("signature", {}).items():
        for naming, s in by_naming.items():
            sigs[(kind, naming)] = Signature(
                kind, naming, s["title"], tuple(s.get("require", ())), tuple(s.get("forbid", ())),
                dict(s.get("ndim", {})), _allow_regex(s["allow"]), s.get("note", ""))
    entries = tuple(Entry(e["kind"], e["naming"], e.get("prefix", ""), e["source"])
                    for e in d.get("part", []))
    fits = tuple(FitRule(f["kind"], tuple(f["archs"]), tuple(f.get("require", ())),
                         tuple(f.get("forbid", ()))) for f in d.get("fit", []))
    kinds = {k: v["title"] for k, v in d.get("kinds", {}).items()}
    return Rules(kinds, dict(d.get("namings", {})), sigs, entries, fits)


# --------------------------------------------------------------------------- detection


def detect_part(src) -> PartMatch | None:
    """What lone component ``src`` is, or None (a full checkpoint, or nothing convkit knows).

    A diffusion model is found by :func:`convkit.archs.detect`; everything else by the rules of
    formats/parts.toml. When two entries fit, the one asking for more evidence wins; when they
    ask for the same, None (no guess). A ``convkit.part`` metadata value consistent with the
    keys narrows ``archs`` to that pair.
    """
    try:
        det = archs.detect(src)
    except UnknownArchitectureError:
        return match_rules(src)
    return from_detection(src, det)


def from_detection(src, det: archs.Detection) -> PartMatch | None:
    """The part a detected layout is when only one component is present (a UNet or Flux
    transformer alone, with or without its checkpoint prefix); None for a checkpoint."""
    if len(det.component_keys) != 1 or det.unexpected:
        return None
    (comp, _), = det.component_keys.items()
    spec = det.arch.components[comp]
    naming = "diffusers" if det.layout.naming == "diffusers" else "single"
    r = rules()
    kind_title = r.kind_titles.get(spec.keymap, spec.keymap)
    naming_title = r.naming_titles.get(det.layout.naming, f"{det.layout.naming} names")
    match = PartMatch(spec.keymap, naming, det.layout.prefixes[comp], tuple(src.keys()),
                      f"{det.arch.title} {kind_title} ({naming_title})", ((det.arch.name, comp),))
    return _apply_metadata(src, match)


def match_rules(src) -> PartMatch | None:
    """The one formats/parts.toml entry that explains every key of ``src`` (see detect_part)."""
    found = candidates(src)
    if not found:
        return None
    best = max(m for m, _ in found)
    top = [p for m, p in found if m == best]
    if len(top) > 1 and len({p.prefix for p in top}) == 1 and \
            len({(p.kind, p.naming) for p in top}) == len(top):
        # the same names read by several kinds' maps: one part that fits all their components
        top = [_narrow_by_prefix(p) for p in top]
        return _apply_metadata(src, replace(
            top[0], archs=tuple(dict.fromkeys(a for p in top for a in p.archs)),
            also=tuple((p.kind, p.naming) for p in top[1:])))
    return _apply_metadata(src, _narrow_by_prefix(top[0])) if len(top) == 1 else None


def _narrow_by_prefix(m: PartMatch) -> PartMatch:
    """A prefix that only some architectures' layouts use for the component says whose part it
    is (the refiner's text encoder sits under conditioner.embedders.0.model., the base's
    OpenCLIP under conditioner.embedders.1.model.): keep those pairs."""
    if not m.prefix:
        return m
    own = tuple((a, c) for a, c in m.archs
                if any(lay.prefixes.get(c) == m.prefix for lay in archs.get(a).layouts))
    return replace(m, archs=own) if own else m


def candidates(src) -> list[tuple[tuple[int, int], PartMatch]]:
    """Every entry that explains all of ``src``'s keys, with its specificity (longer prefix,
    then more evidence asked for)."""
    keys = src.keys()
    if not keys:
        return []
    r = rules()
    out = []
    for e in r.entries:
        sig = r.signatures[(e.kind, e.naming)]
        rel = _relative(keys, e.prefix)
        if rel is None or not _signature_holds(src, sig, e.prefix, rel):
            continue
        kind_title = r.kind_titles.get(e.kind, e.kind)
        match = PartMatch(e.kind, e.naming, e.prefix, tuple(keys), f"{kind_title} ({sig.title})",
                          _fitting(e.kind, set(rel)), sig.note)
        out.append(((len(e.prefix), sig.weight), match))
    return out


def _relative(keys: list[str], prefix: str) -> list[str] | None:
    """The keys without ``prefix``; None when one of them lacks it."""
    if not all(k.startswith(prefix) for k in keys):
        return None
    n = len(prefix)
    return [k[n:] for k in keys]


def _signature_holds(src, sig: Signature, prefix: str, rel: list[str]) -> bool:
    if not all(sig.allow.fullmatch(k) for k in rel):
        return False
    present = set(rel)
    if not all(k in present for k in sig.require) or any(k in present for k in sig.forbid):
        return False
    return all(len(src.info(prefix + k).shape) == nd for k, nd in sig.ndim.items() if k in present)


def _fitting(kind: str, rel: set[str]) -> tuple[tuple[str, str], ...]:
    """Every (arch, component) whose keymap is ``kind``, minus those a [[fit]] rule rules out."""
    out = []
    for arch in archs.load_all().values():
        if not _fit_rules_hold(kind, arch.name, rel):
            continue
        out += [(arch.name, c.name) for c in arch.components.values() if c.keymap == kind]
    return tuple(out)


def _fit_rules_hold(kind: str, arch: str, rel: set[str]) -> bool:
    for f in rules().fits:
        if f.kind != kind or arch not in f.archs:
            continue
        if any(k not in rel for k in f.require) or any(k in rel for k in f.forbid):
            return False
    return True


def _apply_metadata(src, match: PartMatch) -> PartMatch:
    """convkit writes ``convkit.part = "<arch>/<component>"`` into the parts it makes: it is
    the one thing that tells e.g. an SD1.5 VAE from an SDXL one (same keys, same shapes). It is
    believed only when the keys allow it."""
    value = (getattr(src, "metadata", None) or {}).get(PART_METADATA)
    if not value:
        return match
    arch, _, comp = str(value).partition("/")
    if (arch, comp) in match.archs:
        # convkit wrote it: what the keys alone cannot tell is known, so no caveat
        return replace(match, archs=((arch, comp),), note="")
    why = f"metadata {PART_METADATA} = '{value}' does not fit these keys; ignored"
    return replace(match, note=f"{match.note}; {why}" if match.note else why)


# --------------------------------------------------------------------------- as a Detection


def as_detection(src, match: PartMatch, arch: str, component: str) -> archs.Detection:
    """The part as ``component`` of ``arch``: a Detection with a one-component layout, so that
    :func:`convkit.loading.component_tensors` lists its tensors under diffusers names.

    The component's keymap must be the part's kind. A text encoder or VAE may be given to any
    architecture with such a component (the same CLIP-L serves SD1.5, SDXL and Flux; widths are
    the consistency checks' business); a diffusion model only to the architecture its keys are.
    """
    a = archs.get(arch)
    spec = a.components.get(component)
    if spec is None:
        raise UnknownNameError(f"component of {arch}", component, a.components)
    fits = ", ".join(match.fits) or "nothing convkit knows"
    alt = next(((k, n) for k, n in match.also if k == spec.keymap), None)
    if alt is not None:
        match = replace(match, kind=alt[0], naming=alt[1], also=())
    if spec.keymap != match.kind:
        raise UsageError(f"{src.path} is a {match.label}, but {arch}/{component} is a {spec.keymap} "
                         f"component", hint=f"it fits {fits}")
    if match.kind in diffusion_kinds() and (arch, component) not in match.archs:
        raise UsageError(f"{src.path} is a {match.title}, not {arch}'s", hint=f"it fits {fits}")
    naming = "diffusers" if match.naming == "diffusers" else a.layout(a.single_file_layout).naming
    layout = archs.Layout(f"part-{match.kind}", naming, {component: match.prefix}, False, match.title)
    return archs.Detection(a, layout, {component: list(match.keys)}, [])
