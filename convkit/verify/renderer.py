"""Rendering a model the way its users' tools do, with the numbers a gate needs.

The pipeline is diffusers' own (:func:`convkit.render.pipeline_for`), driven in three stages
that each load one family of components — text encoders, then the diffusion model, then the
VAE — with every layer holding its weights as stored and decoding them as it runs (peak
memory: about the largest family's stored size plus a layer and the activations, not the
artifact's fp32 size). Initial noise comes from a
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
from .settings import (
    RenderSettings,
    prediction_from_metadata,
    render_data,
    with_prediction,
)

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
    """Renders a batch of (prompt, seed) jobs in three stages, each with one family of weights
    loaded (text encoders -> embeddings, diffusion model -> latents, VAE -> pixels): peak
    memory is the largest family's stored size, not the artifact's. The pipeline's own
    encode_prompt, __call__ (latent output) and the VAE decode it would do, so the pixels
    equal a one-call render's (tests/test_render_stages.py)."""

    def __init__(self, ref: ModelRef, settings: RenderSettings, workdir: Path):
        self.ref, self.settings, self.workdir = ref, settings, workdir
        self.merged: Path | None = None
        self.path = ref.path
        self.base = ref.base
        self.stored_bytes = 0

    def prepare(self):
        from ..sources import open_source

        if self.ref.is_lora:
            self.merged = self.path = merged_lora(self.ref, self.workdir)
            self.base = None
        with open_source(self.path) as src:
            pred = prediction_from_metadata(src.metadata)
        self.settings = with_prediction(self.settings, pred)

    def _pipeline(self, kind: str):
        import torch

        from ..loading import stored_bytes
        from ..render import pipeline_for

        s = self.settings
        pipe = pipeline_for(self.path, base=self.base, config_from=self.ref.config_from,
                            dtype=torch.float32, keep_stored=True,
                            scheduler_class=s.scheduler_class,
                            scheduler_overrides=s.scheduler_overrides, kinds={kind})
        pipe.set_progress_bar_config(disable=True)
        mods = [m for m in pipe.components.values() if hasattr(m, "modules")]
        if s.device != "cpu":
            pipe.to(s.device)
            for m in mods:
                for mod in m.modules():
                    sw = getattr(mod, "_convkit_stored", None)
                    if sw is not None:
                        sw.device = s.device
        self.stored_bytes += sum(stored_bytes(m) for m in mods)
        return pipe, pipeline_data(type(pipe).__name__)

    def render_all(self, jobs: list[tuple[Prompt, int]], on_image=None,
                   on_denoised=None) -> list[Image]:
        """``on_denoised(i)`` is called as each job's sampling ends (most of the time is
        there), ``on_image(i, image)`` as its image is decoded."""
        import torch

        s = self.settings
        secs = [0.0] * len(jobs)
        bad: list[str | None] = [None] * len(jobs)
        with torch.inference_mode():
            pipe, pd = self._pipeline("text_encoder")
            embeds = []
            for i, (p, _) in enumerate(jobs):
                t0 = time.perf_counter()
                embeds.append(encode_prompt(pipe, pd, p.text, s))
                secs[i] += time.perf_counter() - t0
            del pipe
            gc.collect()
            pipe, pd = self._pipeline("diffusion_model")
            latents = []
            for i, (_, seed) in enumerate(jobs):
                t0 = time.perf_counter()
                lat, bad[i] = denoise(pipe, pd, embeds[i], seed, s)
                latents.append(lat)
                secs[i] += time.perf_counter() - t0
                if on_denoised is not None:
                    on_denoised(i)
            del pipe, embeds
            gc.collect()
            pipe, pd = self._pipeline("vae")
            images = []
            for i, (p, seed) in enumerate(jobs):
                t0 = time.perf_counter()
                img = decode_latents(pipe, pd, latents[i], s)
                if bad[i] is None and not np.isfinite(img).all():
                    bad[i] = "pixels"
                secs[i] += time.perf_counter() - t0
                images.append(Image(p, seed, to_pixels(img), bad[i], secs[i]))
                if on_image is not None:
                    on_image(i, images[-1])
            del pipe
        return images

    def close(self):
        if self.merged is not None:
            self.merged.unlink(missing_ok=True)
        gc.collect()


# -- the three stages, driven through the pipeline's own methods ---------------------------

def pipeline_data(class_name: str) -> dict:
    """How a pipeline class is driven stage by stage (``formats/verify/render.toml``)."""
    from ..errors import UsageError

    d = render_data().get("pipelines", {}).get(class_name)
    if d is None:
        raise UsageError(f"convkit does not know how to drive {class_name} in stages",
                         hint="add it to formats/verify/render.toml [pipelines]")
    return d


def _call_params(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


def encode_prompt(pipe, pd: dict, text: str, s: RenderSettings) -> dict:
    """The prompt's embeddings, named as the pipeline's __call__ takes them."""
    import inspect

    params = inspect.signature(pipe.encode_prompt).parameters
    kw = {"prompt": text, "device": pipe._execution_device, "num_images_per_prompt": 1}
    if "prompt_2" in params:
        kw["prompt_2"] = None
    if "prompt_3" in params:
        kw["prompt_3"] = None
    if "do_classifier_free_guidance" in params:
        # the pipelines' own rule: guidance above 1, unless the diffusion model embeds it
        # (an LCM UNet's time_cond_proj_dim)
        dm = next((c for c in pipe.convkit_configs if "time_cond_proj_dim" in
                   pipe.convkit_configs[c]), None)
        embeds_guidance = dm is not None and \
            pipe.convkit_configs[dm].get("time_cond_proj_dim") is not None
        kw["do_classifier_free_guidance"] = s.guidance > 1 and not embeds_guidance
    out = pipe.encode_prompt(**kw)
    names = pd["prompt_outputs"]
    if len(out) != len(names):
        raise RuntimeError(f"{type(pipe).__name__}.encode_prompt returned {len(out)} values, "
                           f"formats/verify/render.toml names {len(names)}")
    call = _call_params(pipe)
    return {n: v for n, v in zip(names, out) if n in call and v is not None}


def denoise(pipe, pd: dict, embeds: dict, seed: int, s: RenderSettings):
    """(latents as __call__ returns them, where NaN/Inf first appeared or None)."""
    import torch

    bad: list[str] = []

    def check(pipe_, i, t, kw):
        lat = kw.get("latents")
        if lat is not None and not bad and not torch.isfinite(lat).all():
            bad.append(f"latents after step {i + 1}")
        return kw

    kw = dict(embeds, num_inference_steps=s.steps, guidance_scale=s.guidance,
              generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
              callback_on_step_end=check, callback_on_step_end_tensor_inputs=["latents"])
    call = _call_params(pipe)
    if pd.get("start") == "zero-latents":
        f = pipe.vae_scale_factor
        ch = pipe.unet.config.in_channels
        kw.update(image=torch.zeros(1, ch, s.height // f, s.width // f), strength=1.0)
    kw.update({k: v for k, v in (("width", s.width), ("height", s.height)) if k in call})
    out = pipe(**{k: v for k, v in kw.items() if k in call})
    lat = out.images if hasattr(out, "images") else out[0]
    return lat, (bad[0] if bad else None)


def decode_latents(pipe, pd: dict, latents, s: RenderSettings) -> np.ndarray:
    """(H, W, 3) floats in [0, 1]: what the pipeline's __call__ does after its loop."""
    vae = pipe.vae
    if pd.get("latents") == "packed":
        latents = type(pipe)._unpack_latents(latents, s.height, s.width, pipe.vae_scale_factor)
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:       # SDXL pipelines, when the VAE says so
        import torch

        n = latents.shape[1]
        mean = torch.tensor(mean).view(1, n, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, n, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / cfg.scaling_factor + mean
    else:
        latents = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None) is not None:       # Flux, SD3
            latents = latents + cfg.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    return np.asarray(pipe.image_processor.postprocess(image, output_type="np")[0],
                      dtype=np.float32)


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
            r.prepare()
            run.settings = r.settings

            def done(j: int, img: Image) -> None:
                i, key = todo[j]
                images[i] = img
                cache.put(key, img.pixels, {"nonfinite": img.nonfinite, "seconds": img.seconds})

            r.render_all([jobs[i] for i, _ in todo], on_image=done,
                         on_denoised=(lambda j: bar.update(1)) if bar is not None else None)
            run.stored_bytes = r.stored_bytes
            run.load_seconds = time.perf_counter() - t0 - sum(
                images[i].seconds for i, _ in todo)  # type: ignore[union-attr]
        finally:
            r.close()
        run.peak_rss = peak_rss()
    run.images = images  # type: ignore[assignment]
    return run
