"""Architectures as data: load formats/*.toml and detect what a tensor source holds.

Detection looks at key names and tensor ranks only (never at absolute sizes), so it works on
full-size checkpoints and on tiny test models of the same structure alike.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .data import list_files, load_toml, per_formats
from .errors import InputFormatError, UnknownArchitectureError, UnknownNameError
from .sources.base import TensorSource


@dataclass(frozen=True)
class Component:
    name: str            # diffusers folder name: unet, transformer, text_encoder, ...
    kind: str            # diffusion_model | text_encoder | vae
    aliases: tuple[str, ...]
    params: int | None   # full-size released model (diffusers parameter count)
    keymap: str = ""     # key map kind in formats/keymaps (unet, vae, clip_l, openclip, t5, flux)
    buffers: tuple[str, ...] = ()  # tensors files carry that are not parameters (name suffixes)
    tokenizer: str = ""  # a text encoder's tokenizer kind (formats/tokenizers: clip_l, clip_g; t5)
    part: str = ""       # its split/assemble part name when the key map does not say it
                         # (formats/layouts/part_names.toml; SD3's two clip_proj encoders)
    #: diffusers names a file may lack, and what they are then ({"identity_of": name, "dim": d}:
    #: an identity matrix as wide as that tensor's dim d)
    fill: dict = field(default_factory=dict)

    def is_buffer(self, key: str) -> bool:
        return key.endswith(self.buffers) if self.buffers else False


@dataclass(frozen=True)
class Layout:
    name: str
    naming: str          # sgm | bfl | diffusers
    prefixes: dict[str, str]
    folder: bool = False
    title: str = ""


@dataclass(frozen=True)
class Arch:
    name: str
    title: str
    gguf_arch: str
    pipeline: str
    components: dict[str, Component]
    layouts: tuple[Layout, ...]
    detect: dict[str, dict]
    source_file: str = ""
    single_file_layout: str = "sgm"
    #: formats/<arch>.toml [model_index]: ``flags`` (pipeline arguments the released
    #: model_index.json sets), ``absent`` (optional pipeline components written [null, null]),
    #: ``released`` (the Hub repo the facts come from)
    model_index: dict = field(default_factory=dict)
    #: an architecture whose weights have the same structure as ``variant_of`` (SD3.5 Large
    #: Turbo): detection picks it only on a hint (``variant_hint``: metadata values, a file-name
    #: word) and otherwise reports ``variant_of``
    variant_of: str = ""
    variant_hint: dict = field(default_factory=dict)

    @property
    def pipeline_config(self) -> dict:
        """Arguments of the diffusers pipeline's constructor the released model_index.json
        sets (its flags: a pipeline built in memory must get the same ones)."""
        return dict(self.model_index.get("flags", {}))

    def layout(self, name: str) -> Layout:
        for lay in self.layouts:
            if lay.name == name:
                return lay
        raise UnknownNameError(f"layout of {self.name}", name, [x.name for x in self.layouts])

    @property
    def diffusion_component(self) -> str:
        return next(c.name for c in self.components.values() if c.kind == "diffusion_model")


def _parse(d: dict, filename: str) -> Arch:
    comps = {n: Component(n, c["kind"], tuple(c.get("aliases", [])), c.get("params"),
                          c.get("keymap", ""), tuple(c.get("buffers", [])), c.get("tokenizer", ""),
                          c.get("part", ""), dict(c.get("fill", {})))
             for n, c in d["components"].items()}
    layouts = tuple(Layout(x["name"], x["naming"], dict(x["prefixes"]), x.get("folder", False),
                           x.get("title", "")) for x in d["layouts"])
    return Arch(d["name"], d.get("title", d["name"]), d.get("gguf_arch", d["name"]),
                d.get("pipeline", ""), comps, layouts, d.get("detect", {}), filename,
                d.get("single_file_layout", "sgm"),
                _model_index(d.get("model_index", {}), filename),
                d.get("variant_of", ""), dict(d.get("variant_hint", {})))


def _model_index(d: dict, filename: str) -> dict:
    """formats/<arch>.toml [model_index], checked: a typo here would silently write a
    model_index.json diffusers loads differently."""
    unknown = set(d) - {"flags", "absent", "released"}
    flags, absent = d.get("flags", {}), d.get("absent", [])
    if unknown or not isinstance(flags, dict) or not isinstance(absent, list) or \
            not all(isinstance(a, str) for a in absent):
        raise InputFormatError(
            "[model_index] takes flags = {...}, absent = [names], released = \"owner/repo\""
            + (f"; unknown: {sorted(unknown)}" if unknown else ""), path=filename)
    return {"flags": dict(flags), "absent": list(absent), "released": d.get("released", "")}


@per_formats
def load_all() -> dict[str, Arch]:
    """Every architecture data file in formats/ (``formats/<arch>.toml``; other top-level
    TOML files, e.g. storage.toml, have no ``components`` table and are not architectures)."""
    out = {}
    for rel in list_files():
        d = load_toml(rel)
        if "components" in d:
            arch = _parse(d, rel)
            out[arch.name] = arch
    return out


def get(name: str) -> Arch:
    archs = load_all()
    if name not in archs:
        raise UnknownNameError("architecture", name, archs)
    return archs[name]


@dataclass
class Detection:
    arch: Arch
    layout: Layout
    component_keys: dict[str, list[str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    def component_of(self, key: str) -> str | None:
        return self._owner.get(key)

    def __post_init__(self):
        self._owner = {k: c for c, ks in self.component_keys.items() for k in ks}

    def strip(self, key: str) -> str:
        """The key without its component prefix."""
        comp = self.component_of(key)
        return key[len(self.layout.prefixes[comp]):] if comp else key


def _check(arch: Arch, layout: Layout, src: TensorSource) -> list[str]:
    """Missing/forbidden evidence for (arch, layout); empty means it matches."""
    rules = arch.detect.get(layout.naming)
    if not rules:
        return ["no detection rules"]
    problems = []

    def full(ref: str) -> str | None:
        comp, _, key = ref.partition(":")
        return None if comp not in layout.prefixes else layout.prefixes[comp] + key

    for ref in rules.get("require", []):
        k = full(ref)
        if k is None or k not in src:
            problems.append(f"missing {k or ref}")
    for ref in rules.get("forbid", []):
        k = full(ref)
        if k is not None and k in src:
            problems.append(f"has {k}")
    for ref, nd in rules.get("ndim", {}).items():
        k = full(ref)
        if k is not None and k in src and len(src.info(k).shape) != nd:
            problems.append(f"{k} is {len(src.info(k).shape)}-D, expected {nd}-D")
    return problems


def assign(layout: Layout, keys) -> tuple[dict[str, list[str]], list[str]]:
    """Give each key to the component with the longest matching prefix."""
    order = sorted(layout.prefixes.items(), key=lambda kv: -len(kv[1]))
    comps: dict[str, list[str]] = {c: [] for c in layout.prefixes}
    rest = []
    for k in keys:
        for comp, prefix in order:
            if k.startswith(prefix):
                comps[comp].append(k)
                break
        else:
            rest.append(k)
    return {c: ks for c, ks in comps.items() if ks}, rest


def key_groups(keys, depth: int = 2, top: int = 6) -> str:
    c = Counter(".".join(k.replace("/", ".").split(".")[:depth]) + "." for k in keys)
    return ", ".join(f"{g}* ({n})" for g, n in c.most_common(top))


def candidates(src: TensorSource) -> tuple[list, list]:
    """(matches, near misses) over every (architecture, layout) pair."""
    matches = []
    near = []
    in_folder = src.format == "diffusers" and not getattr(src, "lone_component", False)
    for arch in load_all().values():
        for layout in arch.layouts:
            if layout.folder != in_folder:
                continue
            problems = _check(arch, layout, src)
            if not problems:
                comps, rest = assign(layout, src.keys())
                matches.append((len(src) - len(rest), arch, layout, comps, rest))
            else:
                near.append((len(problems), arch, layout, problems))
    return matches, near


#: metadata key naming a variant architecture (convkit writes it; formats/<arch>.toml hints read it)
VARIANT_KEY = "convkit.arch"


def variant_hinted(arch: Arch, src: TensorSource) -> bool:
    """The file says it is this variant: a metadata value or a word of its file name."""
    h = arch.variant_hint
    meta = getattr(src, "metadata", None) or {}
    if any(str(meta.get(k, "")).lower() == str(v).lower() for k, v in h.get("metadata", {}).items()):
        return True
    word = h.get("file_name")
    name = str(getattr(src, "path", "") or "").replace("\\", "/").rsplit("/", 1)[-1].lower()
    return bool(word) and word.lower() in name


def detect(src: TensorSource) -> Detection:
    """Which architecture and layout ``src`` is; raises UnknownArchitectureError otherwise.

    A variant architecture (``variant_of``) matches the same weights as its base; it wins
    when the file hints at it and is left out otherwise."""
    matches, near = candidates(src)
    hinted = [m for m in matches if m[1].variant_of and variant_hinted(m[1], src)]
    if hinted:
        matches = hinted
        meta = getattr(src, "metadata", None)
        if isinstance(meta, dict):
            # what the file's name said becomes metadata, which every output carries: a renamed
            # or converted file stays the variant (formats/<arch>.toml [variant_hint])
            meta.setdefault(VARIANT_KEY, hinted[0][1].name)
    else:
        matches = [m for m in matches if not m[1].variant_of]
    if matches:
        matches.sort(key=lambda m: -m[0])
        _, arch, layout, comps, rest = matches[0]
        return Detection(arch, layout, comps, rest)
    raise UnknownArchitectureError(_describe_unknown(src, near), path=src.path,
                                   hint="known: " + ", ".join(load_all()) +
                                   "; pass --no-detect to treat it as plain tensors")


def _describe_unknown(src: TensorSource, near) -> str:
    keys = src.keys()
    parts = [f"unknown architecture ({len(keys)} tensors"]
    if any("lora_" in k or ".lora_A." in k or "hada_" in k or "lokr_" in k for k in keys[:2000]):
        parts.append("; this looks like a LoRA, not a checkpoint")
    parts.append(f"; recognised key groups: {key_groups(keys)}")
    if near:
        near.sort(key=lambda n: n[0])
        n, arch, layout, problems = near[0]
        parts.append(f"; closest: {arch.name}/{layout.name}, {problems[0]}")
    parts.append(")")
    return "".join(parts)


def select_components(arch: Arch, spec: str | None, present) -> list[str]:
    """'unet,te' -> ['unet', 'text_encoder', 'text_encoder_2'] (in arch order, present only)."""
    if not spec:
        return [c for c in arch.components if c in present]
    wanted = set()
    for raw in spec.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        hits = [c.name for c in arch.components.values() if name == c.name or name in c.aliases]
        if not hits:
            known = {a for c in arch.components.values() for a in (c.name, *c.aliases)}
            raise UnknownNameError(f"component of {arch.name}", name, known)
        wanted.update(hits)
    return [c for c in arch.components if c in wanted and c in present]
