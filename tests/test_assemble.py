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


def test_sd3_from_lone_parts_as_users_download_them(tmp_path, sdxl):
    """SD3.5 Large from the files its users have: the MMDiT alone (reference names) and lone
    text encoders without convkit's metadata (Stability/Comfy-Org text_encoders/clip_l,
    clip_g: transformers names with text_projection, the names SDXL's CLIP-G also has). Each
    goes to the component its flag names (clip_l -> text_encoder, clip_g -> text_encoder_2 by
    their `part`), bit-exact; parts of other models are refused before anything is written."""
    import pytest
    import safetensors.torch as st

    from convkit.errors import UsageError
    from convkit.layouts.split import split

    src = tiny.save_single_file(tiny.build("sd35_large"), tmp_path / "sd35.safetensors")
    split(src, tmp_path / "c", "comfyui", name="s")
    te = tmp_path / "c/text_encoders"
    for p in ("clip_l", "clip_g"):          # as downloaded: no convkit.part
        st.save_file(st.load_file(te / f"s_{p}.safetensors"), tmp_path / f"{p}.safetensors")
    from convkit.layouts.parts import detect_part

    with open_source(tmp_path / "clip_l.safetensors") as s:
        m = detect_part(s)          # one part that fits SDXL's CLIP-G and both SD3 encoders
    assert {("sdxl", "text_encoder_2"), ("sd35_large", "text_encoder"),
            ("sd35_large", "text_encoder_2")} <= set(m.archs), m.archs
    parts = {"unet": [tmp_path / "c/diffusion_models/s.safetensors"],
             "clip_l": [tmp_path / "clip_l.safetensors"],
             "clip_g": [tmp_path / "clip_g.safetensors"],
             "t5": [te / "s_t5xxl.safetensors"], "vae": [tmp_path / "c/vae/s_vae.safetensors"]}
    assemble(parts, tmp_path / "back.safetensors")
    with open_source(src) as a, open_source(tmp_path / "back.safetensors") as b:
        assert set(a.keys()) == set(b.keys())
        assert any(k.startswith("text_encoders.clip_g.transformer.") for k in b.keys())
        for k in a.keys():
            assert torch.equal(a.load(k), b.load(k)), k

    def refused(**swap):
        out = tmp_path / "bad.safetensors"
        with pytest.raises(UsageError) as e:
            assemble({**parts, **{p: [v] for p, v in swap.items()}}, out)
        assert not out.exists()
        return str(e.value)

    # T5 where a CLIP goes; a CLIP-G of another width (pooled projection = CLIP-L + CLIP-G)
    msg = refused(clip_g=te / "s_t5xxl.safetensors")
    assert "--clip-g is a T5-XXL text encoder" in msg, msg
    msg = refused(clip_g=tmp_path / "clip_l.safetensors")
    assert "pooled projection width" in msg, msg
    # SDXL's 4-channel VAE (with quant_conv) is no SD3 VAE
    _, sdxl_single, _, _ = sdxl
    msg = refused(vae=sdxl_single)
    assert "Stable Diffusion XL" in msg and "--vae" in msg
    # a CLIP-L without projection (SD1.5/SDXL/Flux's CLIPTextModel) is not SD3's CLIP-L
    split(sdxl_single, tmp_path / "x", "comfyui", name="x", parts=["clip_l"])
    msg = refused(clip_l=tmp_path / "x/text_encoders/x_clip_l.safetensors")
    assert "--clip-l is a CLIP-L text encoder" in msg and "with projection (clip_proj)" in msg, msg
