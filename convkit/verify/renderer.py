"""Rendering a model the way its users' tools do, with the numbers a gate needs.

The pipeline is diffusers' own (:func:`convkit.render.pipeline_for`), built once per model, with
every layer holding its weights as stored and decoding them as it runs (peak memory: about the
artifact's size plus a layer and the activations, not its fp32 size). Initial noise comes from a
CPU generator seeded with the prompt's seed, so renders do not depend on the device. Latents are
checked for NaN/Inf after every step; an image is kept as 8-bit pixels (what a PNG holds, so a
cached render is the render).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..runtime import cache_root
from .models import ModelRef, merged_lora
from .prompts import Prompt
from .settings import RenderSettings, prediction_from_metadata, with_prediction

CACHE_FORMAT = 1


@dataclass
class Image:
    prompt: Prompt
    seed: int
    pixels: np.ndarray                  # (H, W, 3) uint8
    nonfinite: str | None = None        # where NaN/Inf appeared ("latents after step 2", ...)
    seconds: float = 0.0
    cached: bool = False


@dataclass
class Run:
    """One model's renders."""

    ref: ModelRef
    settings: RenderSettings
    images: list[Image] = field(default_factory=list)
    load_seconds: float = 0.0
    peak_rss: int | None = None         # bytes, high-water mark while loading and rendering
    stored_bytes: int = 0               # weights held in their stored encoding

    @property
    def render_seconds(self) -> float:
        return sum(i.seconds for i in self.images if not i.cached)


# -- peak memory ----------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


# -- cache ----------------------------------------------------------------------------------

class RenderCache:
    """Renders by content key (model identity, settings, prompt, seed, convkit version) in
    ``<cache>/renders``: verifying N variants against one reference renders it once."""

    def __init__(self, root: Path | None = None, enabled: bool = True):
        self.root = (root or cache_root()) / "renders"
        self.enabled = enabled

    @staticmethod
    def key(ref: ModelRef, settings: RenderSettings, prompt: Prompt, seed: int) -> str:
        doc = {"format": CACHE_FORMAT, "version": __version__, "model": ref.identity(),
               "settings": settings.to_dict(), "prompt": prompt.text, "seed": seed}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, key: str) -> tuple[np.ndarray, dict] | None:
        if not self.enabled:
            return None
        png, meta = self.root / f"{key}.png", self.root / f"{key}.json"
        if not (png.is_file() and meta.is_file()):
            return None
        try:
            from PIL import Image as PILImage

            with PILImage.open(png) as im:
                return np.asarray(im.convert("RGB")).copy(), json.loads(meta.read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, pixels: np.ndarray, meta: dict) -> None:
        if not self.enabled:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            from PIL import Image as PILImage

            for suffix, write in ((".png", lambda f: PILImage.fromarray(pixels).save(f, "PNG")),
                                  (".json", lambda f: f.write(json.dumps(meta).encode()))):
                fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    write(f)
                os.replace(tmp, self.root / f"{key}{suffix}")
        except OSError:
            pass        # a cache that cannot be written only costs time


# -- rendering ------------------------------------------------------------------------------

def to_pixels(img: np.ndarray) -> np.ndarray:
    """Pipeline output (H, W, 3) floats in [0, 1] -> uint8 as diffusers' ``numpy_to_pil``."""
    return (np.nan_to_num(img, nan=0.0).clip(0, 1) * 255).round().astype(np.uint8)


class _Renderer:
    def __init__(self, ref: ModelRef, settings: RenderSettings, workdir: Path):
        self.ref, self.settings, self.workdir = ref, settings, workdir
        self.pipe = None
        self.merged: Path | None = None
        self.stored_bytes = 0

    def load(self):
        import torch

        from ..loading import stored_bytes
        from ..render import pipeline_for
        from ..sources import open_source

        path, base = self.ref.path, self.ref.base
        if self.ref.is_lora:
            self.merged = path = merged_lora(self.ref, self.workdir)
            base = None
        with open_source(path) as src:
            pred = prediction_from_metadata(src.metadata)
        self.settings = with_prediction(self.settings, pred)
        s = self.settings
        self.pipe = pipeline_for(path, base=base, config_from=self.ref.config_from,
                                 dtype=torch.float32, keep_stored=True,
                                 scheduler_class=s.scheduler_class,
                                 scheduler_overrides=s.scheduler_overrides)
        self.pipe.set_progress_bar_config(disable=True)
        if s.device != "cpu":
            self.pipe.to(s.device)
            for m in self.pipe.components.values():
                if hasattr(m, "modules"):
                    for mod in m.modules():
                        sw = getattr(mod, "_convkit_stored", None)
                        if sw is not None:
                            sw.device = s.device
        self.stored_bytes = sum(stored_bytes(m) for m in self.pipe.components.values()
                                if hasattr(m, "modules"))

    def render(self, prompt: Prompt, seed: int) -> Image:
        import torch

        s = self.settings
        bad: list[str] = []

        def check(pipe, i, t, kw):
            lat = kw.get("latents")
            if lat is not None and not bad and not torch.isfinite(lat).all():
                bad.append(f"latents after step {i + 1}")
            return kw

        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(prompt=prompt.text, num_inference_steps=s.steps,
                            guidance_scale=s.guidance, width=s.width, height=s.height,
                            generator=torch.Generator("cpu").manual_seed(seed),
                            output_type="np", callback_on_step_end=check,
                            callback_on_step_end_tensor_inputs=["latents"])
        img = np.asarray(out.images[0], dtype=np.float32)
        if not bad and not np.isfinite(img).all():
            bad.append("pixels")
        return Image(prompt, seed, to_pixels(img), bad[0] if bad else None,
                     time.perf_counter() - t0)

    def close(self):
        self.pipe = None
        if self.merged is not None:
            self.merged.unlink(missing_ok=True)
        gc.collect()


def render_model(ref: ModelRef, settings: RenderSettings, jobs: list[tuple[Prompt, int]], *,
                 cache: RenderCache, workdir: Path, bar=None) -> Run:
    """Render ``jobs`` ((prompt, seed) pairs) with ``ref``; cached renders are not redone."""
    run = Run(ref, settings)
    todo: list[tuple[int, str]] = []
    images: list[Image | None] = []
    for i, (p, seed) in enumerate(jobs):
        key = RenderCache.key(ref, settings, p, seed)
        hit = cache.get(key)
        if hit is not None:
            images.append(Image(p, seed, hit[0], hit[1].get("nonfinite"),
                                hit[1].get("seconds", 0.0), cached=True))
            if bar is not None:
                bar.update(1)
        else:
            images.append(None)
            todo.append((i, key))
    if todo:
        reset_peak_rss()
        r = _Renderer(ref, settings, workdir)
        t0 = time.perf_counter()
        try:
            r.load()
            run.load_seconds = time.perf_counter() - t0
            run.stored_bytes = r.stored_bytes
            run.settings = r.settings
            for i, key in todo:
                p, seed = jobs[i]
                img = r.render(p, seed)
                images[i] = img
                cache.put(key, img.pixels, {"nonfinite": img.nonfinite, "seconds": img.seconds})
                if bar is not None:
                    bar.update(1)
        finally:
            r.close()
        run.peak_rss = peak_rss()
    run.images = images  # type: ignore[assignment]
    return run
