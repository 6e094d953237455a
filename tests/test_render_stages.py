"""Verify renders in three stages (text encoders, diffusion model, VAE: one family of weights
loaded at a time); the pixels must be the ones a single pipeline call gives, for every
architecture and its pipeline (formats/verify/render.toml [pipelines])."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from convkit import archs, tiny
from convkit.render import pipeline_for
from convkit.verify.models import ModelRef
from convkit.verify.prompts import Prompt
from convkit.verify.renderer import _Renderer, to_pixels
from convkit.verify.settings import RenderSettings, settings_for

pytestmark = pytest.mark.xdist_group("render-stages")


# every pipeline family; classifier-free guidance (negative embeddings through the stages)
# where the pipeline has it, Flux dev's embedded guidance, SDXL and SD3.5 Large Turbo at
# guidance 0 (no negatives). SD3 medium and SD3.5 large are the SD3.5 medium case's family (the
# same pipeline and components; their MMDiTs differ in config: no dual attention, no q/k norm).
CASES = [("sd15", 3.0), ("sdxl", 0.0), ("sdxl", 3.0), ("sdxl_refiner", 3.0), ("flux_dev", 3.5),
         ("flux_schnell", 0.0), ("sd35_medium", 4.5), ("sd35_large_turbo", 0.0)]


def _family(name: str):
    """What decides how a render is staged: the pipeline class and its components' key maps
    (formats/<arch>.toml)."""
    a = archs.get(name)
    return a.pipeline, tuple(sorted((c.name, c.keymap) for c in a.components.values()))


def test_cases_cover_every_architecture():
    covered = {_family(a) for a, _ in CASES}
    assert [a for a in tiny.ARCHS if _family(a) not in covered] == []


@pytest.mark.parametrize(("arch", "guidance"), CASES)
def test_staged_render_equals_one_pipeline_call(arch, guidance, tmp_path):
    model = tiny.build(arch, seed=5)
    folder = tiny.save_diffusers(model, tmp_path / "model")
    size = 32
    # each architecture's own sampler (formats/verify/render.toml: flow-matching Euler for
    # Flux and SD3, with the model's shift)
    s = RenderSettings(settings_for(arch, None).sampler, 2, guidance, size, size)
    prompts = [(Prompt("a", 11, "a red circle on a blue background"), 11),
               (Prompt("b", 12, "a green square"), 12)]
    r = _Renderer(ModelRef(folder), s, tmp_path)
    r.prepare()
    seen = []
    staged = r.render_all(prompts, on_denoised=seen.append)
    assert seen == [0, 1]
    assert r.stored_bytes > 0

    pipe = pipeline_for(folder, keep_stored=True, scheduler_class=s.scheduler_class,
                        scheduler_overrides=s.scheduler_overrides)
    pipe.set_progress_bar_config(disable=True)
    for img, (p, seed) in zip(staged, prompts):
        kw = dict(prompt=p.text, num_inference_steps=s.steps, guidance_scale=s.guidance,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        if arch == "sdxl_refiner":          # img2img from zero latents at strength 1
            f = pipe.vae_scale_factor
            kw.update(image=torch.zeros(1, pipe.unet.config.in_channels, size // f, size // f),
                      strength=1.0)
        else:
            kw.update(width=size, height=size)
        with torch.inference_mode():
            one = to_pixels(np.asarray(pipe(**kw).images[0], dtype=np.float32))
        assert img.nonfinite is None
        assert img.pixels.shape == (size, size, 3)
        assert np.array_equal(img.pixels, one), arch
    # the two prompts drew different images (the embeddings reached the sampler)
    assert not np.array_equal(staged[0].pixels, staged[1].pixels)


def test_diffusion_stage_holds_only_the_diffusion_model(sdxl):
    _, single, folder, _ = sdxl
    pipe = pipeline_for(single, config_from=folder, keep_stored=True, kinds={"diffusion_model"})
    assert pipe.unet is not None
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert not isinstance(pipe.vae, torch.nn.Module)          # its config only
    # the latent size still follows the model's VAE, not the pipelines' default of 8
    vae = pipeline_for(single, config_from=folder, kinds={"vae"}).vae
    assert pipe.vae_scale_factor == 2 ** (len(vae.config.block_out_channels) - 1)
