"""Reading LoRA / LyCORIS files of every common format into :class:`Adapter` records.

A key is ``<component prefix><module path><adapter suffix>``; the suffixes and prefixes are data
(formats/lora/keys.toml). Tensors stay on disk: an adapter records which file keys hold its parts
and loads them when asked.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dtypes
from ..errors import InputFormatError, TensorValueError, UsageError
from ..sources import open_source
from ..sources.base import TensorSource
from .data import keys_data, prefixes, suffixes
from .table import AMBIGUOUS, ModuleTable, Unit

ALGOS = ("lora", "loha", "lokr", "full")


@dataclass
class Adapter:
    ref: str                                     # module reference as written (prefix + path)
    keys: dict[str, str] = field(default_factory=dict)   # role -> tensor key in the file
    algo: str = ""
    alpha: float | None = None
    component: str | None = None                 # from the prefix ("@diffusion" resolved later)
    module: str = ""                             # path after the prefix
    style: str = "dotted"
    unit: Unit | None = None                     # set by match()

    @property
    def dora(self) -> str | None:
        return "lycoris" if "dora" in self.keys else ("peft" if "magnitude" in self.keys else None)

    def shape(self, src: TensorSource, role: str) -> tuple[int, ...]:
        return tuple(src.info(self.keys[role]).shape)

    @property
    def is_fused_lora(self) -> bool:
        return self.algo == "lora" and "mid" not in self.keys

    def rank(self, src: TensorSource) -> int | None:
        if self.algo == "lora":
            return self.shape(src, "down")[0]
        if self.algo == "loha":
            return self.shape(src, "w1b")[0]
        if self.algo == "lokr":
            if "w2b" in self.keys:
                return self.shape(src, "w2b")[0]
            if "w1b" in self.keys:
                return self.shape(src, "w1b")[0]
        return None

    def scale(self, src: TensorSource) -> float:
        """alpha / rank (1 when there is no alpha, i.e. alpha defaults to the rank)."""
        r = self.rank(src)
        if self.alpha is None or not r:
            return 1.0
        return float(self.alpha) / r


@dataclass
class LoraFile:
    path: Path
    source: TensorSource
    adapters: list[Adapter]
    stray: list[str]                             # keys that are no adapter tensor at all

    @property
    def metadata(self) -> dict[str, str]:
        return self.source.metadata

    def load(self, ad: Adapter, role: str) -> torch.Tensor:
        return self.source.load(ad.keys[role]).float()

    def algos(self) -> Counter:
        return Counter(a.algo + ("+dora" if a.dora else "") for a in self.adapters)

    def close(self) -> None:
        self.source.close()


def split_key(key: str) -> tuple[str, str, dict] | None:
    """``(module ref, suffix, {algo, role})`` of one LoRA tensor key, or None."""
    for suf, info in suffixes():
        if key.endswith(suf) and len(key) > len(suf):
            return key[: -len(suf)], suf, info
    return None


KEYMAP_REF = "@keymap:"      # a component named by its key map kind (keys.toml ``keymap = KIND``)


def split_ref(ref: str) -> tuple[str | None, str, str]:
    """``(component, module path, style)`` of a module reference. The component is a name, or
    "@diffusion", or "@keymap:KIND" (resolved against a model table), or None."""
    for pre, info in prefixes():
        if ref.startswith(pre):
            comp = info.get("component") or KEYMAP_REF + info["keymap"]
            return comp, ref[len(pre):], info["style"]
    return None, ref, "dotted"


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Open a LoRA file (safetensors or a safe torch file) and group its keys into adapters."""
    src = open_source(path)
    if src.format == "diffusers":
        raise UsageError("a LoRA is one file, not a folder", path=path)
    by_ref: dict[str, Adapter] = {}
    stray = []
    for key in src.keys():
        hit = split_key(key)
        if hit is None:
            stray.append(key)
            continue
        ref, _, info = hit
        ad = by_ref.setdefault(ref, Adapter(ref))
        ad.keys[info["role"]] = key
        if info.get("algo"):
            if ad.algo and ad.algo != info["algo"] and info["algo"] != "full":
                raise InputFormatError(f"module mixes {ad.algo} and {info['algo']} tensors",
                                       path=path, key=key)
            if not ad.algo or ad.algo == "full":
                ad.algo = info["algo"]
    adapters = []
    for ref, ad in by_ref.items():
        if not ad.algo:  # only alpha / dora_scale: belongs to nothing
            stray.extend(ad.keys.values())
            continue
        if "alpha" in ad.keys:
            a = src.load(ad.keys["alpha"])
            ad.alpha = float(a.float().reshape(-1)[0]) if a.numel() else None
        ad.component, ad.module, ad.style = split_ref(ref)
        adapters.append(ad)
    if not adapters:
        raise InputFormatError(f"no LoRA/LyCORIS tensors found ({len(stray)} other tensors, e.g. "
                               f"{stray[:2]})", path=path,
                               hint="is this a checkpoint rather than a LoRA?")
    return LoraFile(Path(path), src, adapters, stray)


REQUIRED = {"lora": (("up", "down"),), "loha": (("w1a", "w1b", "w2a", "w2b"),),
            "lokr": (("w1",), ("w1a", "w1b")), "full": (("diff",), ("diff_b",))}


def validate(lf: LoraFile, scan: bool = True) -> list[Exception]:
    """Structural problems (missing parts, rank mismatch) and, with ``scan``, NaN/Inf values."""
    problems: list[Exception] = []
    for ad in lf.adapters:
        need = REQUIRED[ad.algo]
        if not any(all(r in ad.keys for r in group) for group in need):
            problems.append(InputFormatError(
                f"{ad.algo} module is incomplete (has {sorted(ad.keys)}, needs "
                f"{' or '.join('+'.join(g) for g in need)})", path=lf.path, key=ad.ref))
            continue
        if ad.algo == "lora":
            up, down = ad.shape(lf.source, "up"), ad.shape(lf.source, "down")
            r_up = up[1] if len(up) > 1 else None
            if "mid" in ad.keys:
                mid = ad.shape(lf.source, "mid")
                ok = len(mid) == 4 and mid[0] == r_up and mid[1] == down[0]
            else:
                ok = r_up == down[0]
            if not ok:
                problems.append(InputFormatError(
                    f"rank mismatch: up {list(up)} vs down {list(down)}", path=lf.path, key=ad.ref))
        elif ad.algo == "loha":
            s = {r: ad.shape(lf.source, r) for r in ("w1a", "w1b", "w2a", "w2b")}
            if "t1" not in ad.keys and (s["w1a"][1] != s["w1b"][0] or s["w2a"][1] != s["w2b"][0]):
                problems.append(InputFormatError(
                    f"rank mismatch in LoHa factors {[list(v) for v in s.values()]}",
                    path=lf.path, key=ad.ref))
    if scan:
        bad = nonfinite_keys(lf)
        if bad:
            problems.append(TensorValueError(
                f"{len(bad)} LoRA tensor(s) hold NaN/Inf, e.g. {bad[:3]}", path=lf.path,
                hint="the LoRA is broken; re-export or re-train it"))
    return problems


_SUM_DTYPE = {"F16": torch.float32, "BF16": torch.float32, "F32": torch.float32,
              "F64": torch.float64}


def nonfinite_keys(lf: LoraFile) -> list[str]:
    """Keys of the adapters' tensors that hold NaN/Inf.

    One read per tensor into a reused buffer and one reduction: a sum is finite only if every
    element is (NaN/Inf propagate); only a non-finite sum is checked element by element.
    """
    src, buf, bad = lf.source, None, []
    for ad in lf.adapters:
        for key in ad.keys.values():
            info = src.info(key)
            acc = _SUM_DTYPE.get(info.dtype)
            n = math.prod(info.shape)
            if acc is not None and src.supports_ranges and info.nbytes == n * dtypes.itemsize(
                    info.dtype):
                if buf is None or buf.numel() < info.nbytes:
                    buf = torch.empty(max(info.nbytes, 1 << 20), dtype=torch.uint8)
                t = buf[: info.nbytes]
                src.read_range(key, 0, t)
                t = t.view(dtypes.to_torch(info.dtype))
            else:
                t = src.load(key)
            if not t.is_floating_point() or not t.numel():
                continue
            if acc is not None and torch.isfinite(t.sum(dtype=acc)):
                continue
            if not torch.isfinite(t).all():
                bad.append(key)
    return bad


def resolve_component(ad: Adapter, table: ModuleTable) -> str | None:
    return component_in(ad.component, table.diffusion, table.kinds)


def component_in(ref: str | None, diffusion: str, kinds: dict[str, str]) -> str | None:
    """The component a prefix's ``ref`` names in a model whose diffusion component is
    ``diffusion`` and whose components have key map kinds ``kinds`` (a keymap ref that no
    component has stays as it is: it matches no component)."""
    if ref == "@diffusion":
        return diffusion
    if ref and ref.startswith(KEYMAP_REF):
        kind = ref[len(KEYMAP_REF):]
        return next((c for c, k in kinds.items() if k == kind), ref)
    return ref


def match(ad: Adapter, table: ModuleTable) -> Unit | None:
    """The unit of ``table`` the adapter targets (also stored on ``ad.unit``), or None."""
    comp = resolve_component(ad, table)
    candidates = [comp] if comp else list(table.kinds)
    rewrites = keys_data().get("rewrite", [])
    for c in candidates:
        if c is None or c not in table.kinds:
            continue
        hit = table.lookup(c, ad.module, ad.style)
        if hit is None and ad.style == "dotted":
            m = ad.module
            for rw in rewrites:
                m = m.replace(rw["find"], rw["replace"])
            hit = table.lookup(c, m, "dotted")
        if hit is AMBIGUOUS:
            raise InputFormatError(f"module name '{ad.module}' is ambiguous in {table.arch} "
                                   f"({c})", key=ad.ref)
        if hit is not None:
            ad.unit = hit
            return hit
    ad.unit = None
    return None


def check_shape(ad: Adapter, lf: LoraFile, unit: Unit) -> str | None:
    """Why the adapter cannot produce a delta of the unit's shape (None = fits)."""
    src = lf.source
    want = math.prod(unit.shape)
    if ad.algo == "lora":
        up, down = ad.shape(src, "up"), ad.shape(src, "down")
        out = up[0]
        inn = down[1] if len(down) > 1 else 0
        k = math.prod(ad.shape(src, "mid")[2:]) if "mid" in ad.keys else math.prod(down[2:])
        got = out * inn * k
        if out != unit.shape[0] or got != want:
            return f"delta [{out}, {inn}{', k=' + str(k) if k > 1 else ''}] vs weight {list(unit.shape)}"
        return None
    if ad.algo == "full" and "diff" in ad.keys:
        s = ad.shape(src, "diff")
        return None if math.prod(s) == want else f"diff {list(s)} vs weight {list(unit.shape)}"
    if ad.algo == "loha":
        out = ad.shape(src, "w1a")[0] if "t1" not in ad.keys else ad.shape(src, "w1a")[1]
        return None if out == unit.shape[0] else f"LoHa out {out} vs weight {list(unit.shape)}"
    return None
