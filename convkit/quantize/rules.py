"""Which tensors get quantized to what: per-architecture data in ``formats/quant/*.toml``.

Decisions are made on names relative to the diffusion model (SGM/LDM or BFL naming, no prefix).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

from ..data import list_files, load_toml
from ..errors import UsageError

GGUF_PLAIN = ("F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K",
              "Q3_K", "Q2_K")
GGUF_FLOAT = ("F32", "F16", "BF16")
QK_K = 256


def _data(name: str) -> dict:
    return load_toml(f"quant/{name}")


@dataclass(frozen=True)
class ArchRules:
    family: str
    archs: tuple[str, ...]
    small_values: int
    gguf: dict
    sdcpp: dict
    fp8: dict
    nf4: dict

    @staticmethod
    def _match(patterns, name: str) -> str | None:
        for p in patterns:
            if re.search(p, name):
                return p
        return None

    def kept(self, section: str, name: str) -> str | None:
        """The keep pattern of ``section`` (gguf, sdcpp, fp8, nf4) matching ``name``, if any."""
        return self._match(getattr(self, section).get("keep", []), name)


@functools.cache
def all_rules() -> dict[str, ArchRules]:
    out = {}
    for rel in list_files("quant"):
        name = rel.split("/")[-1]
        if name == "gguf_mixes.toml":
            continue
        d = load_toml(rel)
        r = ArchRules(name[:-5], tuple(d["archs"]), int(d.get("small_values", 1024)),
                      d.get("gguf", {}), d.get("sdcpp", {}), d.get("fp8", {}), d.get("nf4", {}))
        for a in r.archs:
            out[a] = r
    return out


def rules_for(arch: str) -> ArchRules:
    rules = all_rules()
    if arch not in rules:
        raise UsageError(f"no quantization rules for architecture '{arch}' "
                         f"(formats/quant/ covers {', '.join(sorted(rules))})")
    return rules[arch]


@functools.cache
def _mix_data() -> dict:
    return _data("gguf_mixes.toml")


def gguf_mixes() -> dict[str, dict]:
    return dict(_mix_data()["mixes"])


def gguf_groups() -> dict[str, str]:
    return dict(_mix_data()["groups"])


def gguf_fallback(qtype: str) -> str:
    return _mix_data()["fallback"].get(qtype, "F16")


def gguf_file_type(target: str) -> str:
    d = _mix_data()
    if target in d["mixes"]:
        return d["mixes"][target]["file_type"]
    return d["file_types"][target]


def block_size(qtype: str) -> int:
    if qtype in GGUF_FLOAT:
        return 1
    return QK_K if qtype.endswith("_K") else 32


def is_small(shape: tuple[int, ...], rules: ArchRules) -> str | None:
    if len(shape) <= 1:
        return "1-D"
    if math.prod(shape) <= rules.small_values:
        return f"<= {rules.small_values} values"
    return None


# ------------------------------------------------------------------------------------ GGUF types


@dataclass
class GGUFDecision:
    name: str                 # output tensor name
    qtype: str                # GGML type name
    stored_shape: tuple[int, ...]
    orig_shape: tuple[int, ...] | None = None  # set when rearranged (comfy.gguf.orig_shape)
    reason: str = ""
    wanted: str | None = None  # the type before a fallback


@dataclass
class TypeRule:
    pattern: re.Pattern
    qtype: str

    @staticmethod
    def parse(text: str) -> "TypeRule":
        pat, sep, qt = text.rpartition("=")
        if not sep or not pat:
            raise UsageError(f"--type-rule '{text}' must be REGEX=TYPE (e.g. 'ff\\.net\\.2=Q6_K')")
        qt = qt.strip().upper()
        if qt not in GGUF_PLAIN + ("F32",):
            from ..errors import UnknownNameError
            raise UnknownNameError("GGUF type in --type-rule", qt, GGUF_PLAIN + ("F32",))
        try:
            return TypeRule(re.compile(pat), qt)
        except re.error as e:
            raise UsageError(f"--type-rule '{text}': bad regular expression ({e})") from None


@dataclass
class GGUFTyper:
    """Per-tensor GGUF type choice for one target (plain type or named mix), in file order."""

    target: str
    rules: ArchRules
    layout: str = "comfy"                 # "comfy" (ComfyUI-GGUF) or "sdcpp"
    type_rules: list[TypeRule] = field(default_factory=list)

    def __post_init__(self):
        mixes = gguf_mixes()
        if self.target in mixes:
            self.base = mixes[self.target]["base"]
            self.mix_rules = list(mixes[self.target]["rules"])
        else:
            self.base = self.target
            self.mix_rules = []
        self.groups = {g: re.compile(p) for g, p in gguf_groups().items()}
        self.counts: dict[str, int] = {}

    def _stored_shape(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        g = self.rules.gguf
        n = math.prod(shape)
        if (self.layout == "comfy" and g.get("rearrange") and len(shape) > 1
                and n >= int(g.get("rearrange_min_values", 512)) and n % 256 == 0
                and shape[-1] % 256 != 0):
            return (n // 256, 256), tuple(shape)
        return tuple(shape), None

    def _mix_type(self, name: str) -> tuple[str, str]:
        for r in self.mix_rules:
            if self.groups[r["group"]].search(name):
                i = self.counts.get(r["group"], 0)
                self.counts[r["group"]] = i + 1
                if "first" in r and i >= int(r["first"]):
                    t = r.get("then", self.base)
                    return t, f"mix {self.target}: {r['group']} (after the first {r['first']})"
                return r["type"], f"mix {self.target}: {r['group']}"
        return self.base, ""

    def decide(self, name: str, shape: tuple[int, ...], src_dtype: str) -> GGUFDecision:
        stored, orig = self._stored_shape(shape)
        section = "gguf" if self.layout == "comfy" else "sdcpp"
        reason = ""
        qtype = None
        for tr in self.type_rules:
            if tr.pattern.search(name):
                qtype, reason = tr.qtype, f"--type-rule {tr.pattern.pattern}={tr.qtype}"
                break
        if qtype is None:
            if src_dtype not in ("F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2"):
                return GGUFDecision(name, src_dtype, stored, orig, "not a float tensor")
            small = is_small(shape, self.rules)
            keep = self.rules.kept(section, name)
            ndims = getattr(self.rules, section).get("ndims")     # ranks that are quantized
            if small:
                qtype, reason = "F32", f"kept: {small}"
            elif keep or (ndims and len(shape) not in ndims):
                qtype = "BF16" if "BF16" in (src_dtype, self.base) else "F16"
                reason = (f"kept: {self.rules.family} rule /{keep}/" if keep else
                          f"kept: {len(shape)}-D ({self.rules.family} quantizes "
                          f"{'/'.join(map(str, ndims))}-D tensors only)")
            else:
                qtype, reason = self._mix_type(name)
        row = stored[-1] if stored else 1
        wanted = None
        while block_size(qtype) > 1 and row % block_size(qtype) != 0:
            wanted = wanted or qtype
            qtype = gguf_fallback(qtype)
        if wanted:
            reason = (f"fallback: rows of {row} do not fit {wanted} blocks of "
                      f"{block_size(wanted)} -> {qtype}")
        return GGUFDecision(name, qtype, stored, orig, reason, wanted)
