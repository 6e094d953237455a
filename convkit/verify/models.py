"""What verify renders: a model given as a file or folder, a diffusion-model-only file with the
base it belongs to, or a LoRA with its base (rendered as the merge, with merge-lora's
arithmetic). :class:`ModelRef` names one and says who it is for the render cache.
"""
from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from .. import archs
from ..errors import ConvkitError, UnknownArchitectureError, UsageError
from ..sources import open_source


@dataclass(frozen=True)
class ModelRef:
    path: Path
    base: Path | None = None
    lora_weight: float | None = None          # set: ``path`` is a LoRA applied to ``base``
    config_from: Path | None = None
    label: str = ""

    @property
    def is_lora(self) -> bool:
        return self.lora_weight is not None

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        n = self.path.name
        return n if not self.is_lora else f"{n}@{self.lora_weight:g}"

    def identity(self) -> dict:
        """Who the model is, for cache keys: each file's path, size and modification time."""
        return {"path": _ident(self.path), "base": _ident(self.base) if self.base else None,
                "lora_weight": self.lora_weight,
                "config_from": _ident(self.config_from) if self.config_from else None}


def _ident(p: Path) -> list:
    p = Path(p)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


@dataclass
class Described:
    """What an input is: its architecture (None for a LoRA), which components it has."""

    arch: str | None
    components: list[str] = field(default_factory=list)
    lora: bool = False
    title: str = ""


def describe(path: Path) -> Described:
    with open_source(path) as src:
        try:
            det = archs.detect(src)
        except UnknownArchitectureError as e:
            if src.format != "diffusers" and _is_lora(path):
                return Described(None, [], True, "a LoRA")
            raise UsageError(f"not a model convkit knows: {e.detail}", path=path) from None
        return Described(det.arch.name, [c for c, k in det.component_keys.items() if k],
                         False, det.arch.title)


def _is_lora(path: Path) -> bool:
    from ..lora.summary import summarize

    try:
        return summarize(path) is not None
    except ConvkitError:
        return False


def parse_artifact(text: str, base: Path | None, config_from: Path | None) -> ModelRef:
    """``PATH`` or, for a LoRA, ``PATH:WEIGHT`` (as merge-lora takes it)."""
    p, weight = Path(text), None
    if not p.exists() and ":" in text:
        head, _, w = text.rpartition(":")
        try:
            weight = float(w)
            p = Path(head)
        except ValueError:
            pass
    if not p.exists():
        raise UsageError(f"no such file or folder: {p}")
    d = describe(p)
    if d.lora:
        if base is None:
            raise UsageError("this is a LoRA: it renders on a model", path=p,
                             hint="give the model it applies to as --base")
        return ModelRef(p, base, 1.0 if weight is None else weight, config_from)
    if weight is not None:
        raise UsageError(f"':{weight:g}' given, but this is not a LoRA", path=p)
    return ModelRef(p, base, None, config_from)


def arch_of(ref: ModelRef) -> str:
    d = describe(ref.base if ref.is_lora else ref.path)
    return d.arch


def complete(path: Path) -> bool:
    """True when ``path`` holds every component of its architecture."""
    d = describe(path)
    return not d.lora and all(c in d.components for c in archs.get(d.arch).components)


def check_renderable(ref: ModelRef, role: str) -> str:
    """The model's architecture; refuses a partial model without a base that completes it."""
    if ref.is_lora:
        return describe(ref.base).arch
    d = describe(ref.path)
    arch = archs.get(d.arch)
    missing = [c for c in arch.components if c not in d.components]
    if missing:
        if ref.base is None:
            what = "only " + ", ".join(d.components) if d.components else "no known component"
            raise UsageError(f"{role} has {what}; {', '.join(missing)} must come from "
                             "somewhere", path=ref.path,
                             hint="give the full model it belongs to as --base")
        b = describe(ref.base)
        if b.arch != d.arch:
            raise UsageError(f"{role} is {d.title}, --base is {b.title}", path=ref.path)
    return d.arch


def native_size(ref: ModelRef) -> int | None:
    """The size the model draws at: UNet sample size x VAE factor (None if unknown)."""
    from .. import configs
    from ..loading import component_tensors

    paths = [ref.base] if ref.is_lora else [ref.path] + ([ref.base] if ref.base else [])
    try:
        with ExitStack() as stack:
            found = {}
            for p in paths:
                src = stack.enter_context(open_source(p))
                det = archs.detect(src)
                for comp in (det.arch.diffusion_component, "vae"):
                    if comp in found or not det.component_keys.get(comp):
                        continue
                    ts = component_tensors(src, det, comp)
                    found[comp] = configs.resolve(det.arch.name, comp,
                                                  {t.name: t.shape for t in ts},
                                                  path=src.path).config
            dm = found.get(det.arch.diffusion_component, {})
            vae = found.get("vae", {})
            if dm.get("sample_size") and vae.get("block_out_channels"):
                return int(dm["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (ConvkitError, OSError, KeyError):
        return None
    return None


def merged_lora(ref: ModelRef, workdir: Path) -> Path:
    """``ref``'s LoRA merged into its base (merge-lora itself), in ``workdir``."""
    from ..lora import merge_lora

    out = workdir / f"merged-{os.getpid()}-{abs(hash(ref.path))}.safetensors"
    with open_source(ref.base) as src:
        quantized = src.quantized
    merge_lora(ref.base, [(str(ref.path), ref.lora_weight)], out, overwrite=True,
               dtype="fp32" if quantized else None)
    return out
