"""assemble: parts in any layout and encoding -> one model."""
from __future__ import annotations

from pathlib import Path

import torch

from convkit import tiny
from convkit.convert import convert
from convkit.layouts.assemble import assemble
from convkit.sources import open_source

DEMO = Path(tiny.__file__).parent / "demo"


def test_lightning_unet_with_a_models_text_encoders_and_vae_for_forge(tmp_path):
    """The Lightning case: a UNet-only file in diffusers names + the base's text encoders and
    VAE -> one SGM single file (what Forge loads)."""
    unet, base = DEMO / "lightning_unet.safetensors", DEMO / "base.safetensors"
    r = assemble({"unet": [unet], "clip_l": [base], "clip_g": [base], "vae": [base]},
                 tmp_path / "full.safetensors")
    assert r.stats is not None
    with open_source(unet) as u:
        dt = {u.info(k).dtype for k in u.keys()}
    assert len(dt) == 1
    convert(unet, tmp_path / "sgm_unet.safetensors", dt.pop(), layout="sgm-unet")
    pre = "model.diffusion_model."
    with open_source(tmp_path / "full.safetensors") as out, open_source(base) as b, \
            open_source(tmp_path / "sgm_unet.safetensors") as u:
        assert set(out.keys()) == set(b.keys())
        for k in out.keys():
            want = u.load(k[len(pre):]) if k.startswith(pre) else b.load(k)
            assert out.info(k).dtype == (u.info(k[len(pre):]) if k.startswith(pre)
                                         else b.info(k)).dtype
            assert torch.equal(out.load(k), want), k
        assert out.metadata["convkit.steps"]


def test_quantized_unet_and_float_parts_give_one_float_file(tmp_path):
    """A GGUF Q8_0 UNet + bf16 text encoders and VAE -> fp32: every tensor equals the decoded
    part."""
    from convkit.quantize import quantize

    t = tiny.build("sdxl")
    full = tiny.save_single_file(t, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    quantize(full, tmp_path / "u.gguf", "gguf:Q8_0")
    r = assemble({"unet": [tmp_path / "u.gguf"], "clip_l": [full], "clip_g": [full],
                  "vae": [full]}, tmp_path / "out.safetensors", dtype="fp32")
    assert any("dequantized" in n for n in r.plan.notes)
    pre = "model.diffusion_model."
    with open_source(tmp_path / "out.safetensors") as out, open_source(full) as f, \
            open_source(tmp_path / "u.gguf") as q:
        assert set(out.keys()) == set(f.keys())
        for k in out.keys():
            want = q.load(k[len(pre):]) if k.startswith(pre) else f.load(k)
            if want.is_floating_point():
                assert out.info(k).dtype == "F32"
                want = want.float()
            assert torch.equal(out.load(k), want), k
        assert not any(k.startswith("convkit.quantization") for k in out.metadata)


def test_assemble_into_a_diffusers_folder(tmp_path):
    import diffusers

    t = tiny.build("sdxl")
    full = tiny.save_single_file(t, tmp_path / "m.safetensors")
    convert(full, tmp_path / "unet.safetensors", "fp32", layout="diffusers-unet")
    assemble({"unet": [tmp_path / "unet.safetensors"], "clip_l": [full], "clip_g": [full],
              "vae": [full]}, tmp_path / "folder", layout="diffusers")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder",
                                                               local_files_only=True)
    for comp, mod in t.components.items():
        for k, v in mod.state_dict().items():
            assert torch.equal(getattr(pipe, comp).state_dict()[k], v), (comp, k)
