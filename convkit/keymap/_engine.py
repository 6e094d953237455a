"""Name-mapping engines shared by all component kinds.

Three shapes of map exist:

* :class:`TableMap` -- a table of module prefixes computed from the model structure (UNet, VAE),
  each with a small rename table for the names inside that module;
* :class:`PatternMap` -- rules with ``{i}`` placeholders from a TOML file (OpenCLIP, Flux), which can
  fuse several diffusers tensors into one single-file tensor;
* :class:`PrefixMap` -- the same names under a different prefix (CLIP-L, T5).

All of them answer two questions: ``d2s(diffusers_name) -> (Target, part_index)`` and
``s2d(single_name) -> Target``. A :class:`Target` names one single-file tensor and the diffusers
tensors it is made of.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConvkitError


class KeyMapError(ConvkitError, KeyError):
    """A tensor name that the key map of its component does not know, or an incomplete fused set."""

    exit_code = 3

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return self._compose()


@dataclass(frozen=True)
class Target:
    """One single-file tensor and the diffusers tensor(s) it is made of."""

    single: str
    parts: tuple[str, ...]                    # diffusers names, concatenated along dim 0 in order
    transform: str | None = None              # None | "transpose" | "conv1x1" | "swap_halves"
    sizes: tuple[str, ...] | None = None      # symbolic part sizes ("h", "*"); None = equal parts


@dataclass(frozen=True)
class Extra:
    """A tensor real single files carry that the diffusers model has no parameter for."""

    single: str
    make: str                                 # "position_ids" | "scalar"
    source: str | None = None                 # single name whose shape it derives from
    value: float | None = None


class KeyMap:
    kind: str = "?"
    extras: tuple[Extra, ...] = ()
    drop_diffusers: frozenset[str] = frozenset()
    hidden: int | None = None                 # resolves "h" in Target.sizes when known

    def d2s(self, name: str) -> tuple[Target, int] | None:
        raise NotImplementedError

    def s2d(self, name: str) -> Target | None:
        raise NotImplementedError

    def diffusers_out_name(self, name: str) -> str:
        """Spelling of a diffusers name in the output of to_diffusers (identity by default)."""
        return name


# --------------------------------------------------------------------------- table maps


@dataclass
class Block:
    """One module: every name under d_prefix maps to a name under s_prefix."""

    d_prefix: str
    s_prefix: str
    sub: dict[str, str] | None = None         # rename of the leading path inside; None = identity
    conv1x1: frozenset[str] = field(default_factory=frozenset)  # sub-module names (diffusers side)


def _split_sub(rest: str, table: dict[str, str]) -> tuple[str, str] | None:
    """Longest key of table that is rest or a dotted prefix of rest -> (key, remainder)."""
    parts = rest.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return head, ".".join(parts[n:])
    return None


class TableMap(KeyMap):
    def __init__(self, kind: str, blocks: list[Block]):
        self.kind = kind
        self._by_d = {b.d_prefix: b for b in blocks}
        self._by_s = {b.s_prefix: b for b in blocks}
        self._inv_sub = {id(b): ({v: k for k, v in b.sub.items()} if b.sub is not None else None)
                         for b in blocks}
        self.blocks = blocks

    @staticmethod
    def _find(name: str, index: dict[str, Block]) -> tuple[Block, str] | None:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            head = ".".join(parts[:n])
            b = index.get(head)
            if b is not None:
                return b, ".".join(parts[n:])
        return None

    def d2s(self, name: str) -> tuple[Target, int] | None:
        hit = self._find(name, self._by_d)
        if hit is None:
            return None
        b, rest = hit
        transform = None
        if b.sub is not None and rest:
            s = _split_sub(rest, b.sub)
            if s is None:
                return None
            head, tail = s
            if head in b.conv1x1 and tail == "weight":
                transform = "conv1x1"
            rest = b.sub[head] + ("." + tail if tail else "")
        single = b.s_prefix + ("." + rest if rest else "")
        return Target(single, (name,), transform), 0

    def s2d(self, name: str) -> Target | None:
        hit = self._find(name, self._by_s)
        if hit is None:
            return None
        b, rest = hit
        transform = None
        inv = self._inv_sub[id(b)]
        if inv is not None and rest:
            s = _split_sub(rest, inv)
            if s is None:
                return None
            head, tail = s
            dhead = inv[head]
            if dhead in b.conv1x1 and tail == "weight":
                transform = "conv1x1"
            rest = dhead + ("." + tail if tail else "")
        d = b.d_prefix + ("." + rest if rest else "")
        return Target(name, (d,), transform)


# --------------------------------------------------------------------------- pattern maps


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile("^" + rx + r"(?:\.(?P<rest>.+))?$")


class PatternMap(KeyMap):
    """``depth`` (number of ``{i}`` blocks) is needed only by rules limited to one block
    (``only_block = "last"``: the MMDiT's last joint block differs from the others)."""

    def __init__(self, kind: str, data: dict, hidden: int | None = None, depth: int | None = None):
        self.kind = kind
        self.hidden = hidden
        self.depth = depth
        self.mlp_ratio = data.get("hidden", {}).get("mlp_ratio")
        self.rules = []
        self._only = {}
        for r in data.get("rule", []):
            parts = tuple(r["diffusers"])
            sizes = tuple(str(s) for s in r["sizes"]) if "sizes" in r else None
            if r.get("only_block", "last") != "last":
                raise ValueError(f"only_block takes \"last\" (rule for {r['single']})")
            self.rules.append((parts, r["single"], r.get("transform"), sizes,
                               [_compile(p) for p in parts], _compile(r["single"])))
            if "only_block" in r:
                self._only[r["single"]] = r["only_block"]
        self.extras = tuple(_extras(data))
        self.drop_diffusers = frozenset(data.get("drop_diffusers", ()))

    def _transform(self, single: str, transform: str | None, m: re.Match) -> str | None:
        """A rule's transform, or None when the rule limits it to a block this is not."""
        if transform is None or single not in self._only:
            return transform
        if self.depth is None:
            raise KeyMapError("which block is the last is not known (the key map needs the "
                              "model's config or all of its tensor names)", key=single)
        return transform if int(m.group("i")) == self.depth - 1 else None

    @staticmethod
    def _fill(pattern: str, m: re.Match) -> str:
        out = pattern.replace("{i}", m.group("i")) if "{i}" in pattern else pattern
        rest = m.group("rest")
        return out + ("." + rest if rest else "")

    def d2s(self, name: str) -> tuple[Target, int] | None:
        for parts, single, transform, sizes, drx, _ in self.rules:
            for k, rx in enumerate(drx):
                m = rx.match(name)
                if m:
                    t = Target(self._fill(single, m), tuple(self._fill(p, m) for p in parts),
                               self._transform(single, transform, m), sizes)
                    return t, k
        return None

    def s2d(self, name: str) -> Target | None:
        for parts, single, transform, sizes, _, srx in self.rules:
            m = srx.match(name)
            if m:
                return Target(name, tuple(self._fill(p, m) for p in parts),
                              self._transform(single, transform, m), sizes)
        return None


# --------------------------------------------------------------------------- prefix maps


class PrefixMap(KeyMap):
    def __init__(self, kind: str, data: dict, out_name: Callable[[str], str] | None = None):
        self.kind = kind
        self.dp = data.get("diffusers_prefix", "")
        self.sp = data.get("single_prefix", "")
        self.optional = bool(data.get("diffusers_prefix_optional", False))
        self.extras = tuple(_extras(data))
        self.drop_diffusers = frozenset(data.get("drop_diffusers", ()))
        self._out_name = out_name

    def _core(self, name: str) -> str:
        if self.dp and name.startswith(self.dp):
            return name[len(self.dp):]
        if self.dp and not self.optional:
            return ""
        return name

    def d2s(self, name: str) -> tuple[Target, int] | None:
        core = self._core(name)
        if not core:
            return None
        return Target(self.sp + core, (name,)), 0

    def s2d(self, name: str) -> Target | None:
        if not name.startswith(self.sp):
            return None
        d = self.dp + name[len(self.sp):]
        if self._out_name is not None:
            d = self._out_name(d)
        return Target(name, (d,))


def _extras(data: dict):
    for e in data.get("extra", []):
        yield Extra(e["single"], e["make"], e.get("from"), e.get("value"))
