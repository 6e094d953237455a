"""The tiny fixtures are real: diffusers' OWN loaders read our single files and folders.

Offline only (HF_HUB_OFFLINE=1); nothing is downloaded. The config folders passed to
``from_single_file(config=...)`` hold configs, tokenizers and scheduler but NO weights, so a
component the single file lacks cannot be filled in from the folder.
"""
from __future__ import annotations

import contextlib
import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from convkit import tiny

ALL = tiny.ARCHS
SD = ("sd15", "sdxl", "sdxl_refiner")
FLUX = ("flux_dev", "flux_schnell")
SD3 = ("sd3_medium", "sd35_medium", "sd35_large")


@pytest.fixture(scope="session")
def built():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = tiny.build(arch, seed=0)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def files(built, tmp_path_factory):
    """Lazily writes, per arch: diffusers folder, config-only folder, single file (+ BFL file)."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch):
        if arch not in cache:
            m = built(arch)
            d = {"folder": tiny.save_diffusers(m, root / arch / "diffusers"),
                 "config": tiny.save_diffusers(m, root / arch / "config", weights=False),
                 "single": tiny.save_single_file(m, root / arch / "single.safetensors")}
            if arch in FLUX:
                d["bfl"] = tiny.save_single_file(m, root / arch / "bfl.safetensors", layout="bfl")
            cache[arch] = d
        return cache[arch]

    return get


def assert_same_weights(expected: torch.nn.Module, got: torch.nn.Module, what: str):
    # tied aliases (T5 encoder.embed_tokens = shared) are one tensor in every file format; diffusers'
    # single-file T5 loader leaves the alias on the meta device, so compare the stored tensors.
    e, g = tiny.component_state_dict(expected), tiny.component_state_dict(got)
    assert set(e) == set(g), f"{what}: names differ: {sorted(set(e) ^ set(g))[:5]}"
    bad = [k for k in e if e[k].dtype != g[k].dtype or not torch.equal(e[k], g[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


@contextlib.contextmanager
def flux_converter_for(hidden: int):
    """diffusers' Flux single-file converter hard-codes ``inner_dim = 3072`` to split
    ``single_blocks.N.linear1`` (q|k|v|mlp). Run THEIR converter source with the tiny hidden size
    substituted for that one constant (everything else untouched)."""
    from diffusers.loaders import single_file_model as sfm
    from diffusers.loaders import single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1, "diffusers' Flux converter changed; revisit this patch"
    g = dict(sfu.__dict__)
    exec(src.replace("inner_dim = 3072", f"inner_dim = {hidden}"), g)
    entry = sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    old = entry["checkpoint_mapping_fn"]
    entry["checkpoint_mapping_fn"] = g["convert_flux_transformer_checkpoint_to_diffusers"]
    try:
        yield
    finally:
        entry["checkpoint_mapping_fn"] = old


# --------------------------------------------------------------------------- the models themselves


@pytest.mark.parametrize("arch", ALL)
def test_tiny_is_small_and_nontrivial(built, arch):
    m = built(arch)
    assert m.arch == arch
    assert sum(m.param_counts().values()) < 2_000_000
    for name, mod in m.components.items():
        for pname, p in mod.named_parameters():
            assert p.abs().sum() > 0, f"{name}.{pname} is all zero"
            assert not torch.all(p == 1), f"{name}.{pname} is all one"


def test_tiny_structure(built):
    xl = built("sdxl").components["unet"].config
    assert len(xl.block_out_channels) == 3 and xl.down_block_types[0] == "DownBlock2D"
    assert xl.addition_embed_type == "text_time"
    assert set(built("sdxl").components) == {"unet", "text_encoder", "text_encoder_2", "vae"}
    ref = built("sdxl_refiner")
    assert len(ref.components["unet"].config.block_out_channels) == 4
    assert set(ref.components) == {"unet", "text_encoder_2", "vae"}
    assert len(built("sd15").components["unet"].config.block_out_channels) == 4
    assert built("flux_dev").components["transformer"].config.guidance_embeds is True
    assert built("flux_schnell").components["transformer"].config.guidance_embeds is False
    assert built("flux_dev").pipeline_class_name == "FluxPipeline"


def test_build_is_deterministic(built):
    a = built("sd15").components["vae"].state_dict()
    b = tiny.build("sd15", seed=0).components["vae"].state_dict()
    c = tiny.build("sd15", seed=1).components["vae"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_single_file_matches_state_dict(built, files):
    from safetensors.torch import load_file

    m = built("sdxl")
    sd = load_file(str(files("sdxl")["single"]))
    mem = tiny.state_dict_single_file(m)
    assert set(sd) == set(mem)
    assert all(torch.equal(sd[k], mem[k]) for k in sd)
    assert sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert "conditioner.embedders.1.model.logit_scale" in sd


def test_sd15_detected_as_v1_by_diffusers(built):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    assert infer_diffusers_model_type(tiny.state_dict_single_file(built("sd15"))) == "v1"


# --------------------------------------------------------------------------- diffusers' own single-file loaders


@pytest.mark.parametrize("arch", SD)
def test_component_from_single_file(built, files, arch):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    m, f = built(arch), files(arch)
    unet = UNet2DConditionModel.from_single_file(str(f["single"]), config=str(f["config"]), subfolder="unet")
    assert_same_weights(m.components["unet"], unet, f"{arch} unet")
    vae = AutoencoderKL.from_single_file(str(f["single"]), config=str(f["config"]), subfolder="vae")
    assert_same_weights(m.components["vae"], vae, f"{arch} vae")


@pytest.mark.parametrize("arch", SD)
def test_pipeline_from_single_file(built, files, arch):
    import diffusers

    m, f = built(arch), files(arch)
    cls = getattr(diffusers, m.pipeline_class_name)
    pipe = cls.from_single_file(str(f["single"]), config=str(f["config"]))
    for name, mod in m.components.items():
        assert_same_weights(mod, getattr(pipe, name), f"{arch} {name}")


@pytest.mark.parametrize("arch", FLUX)
def test_flux_from_single_file(built, files, arch):
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    m, f = built(arch), files(arch)
    cfg = m.components["transformer"].config
    with flux_converter_for(cfg.num_attention_heads * cfg.attention_head_dim):
        # BFL reference layout: transformer only, no prefix
        tr = FluxTransformer2DModel.from_single_file(str(f["bfl"]), config=str(f["config"]),
                                                     subfolder="transformer")
        assert_same_weights(m.components["transformer"], tr, f"{arch} transformer (bfl)")
        vae = AutoencoderKL.from_single_file(str(f["single"]), config=str(f["config"]), subfolder="vae")
        assert_same_weights(m.components["vae"], vae, f"{arch} vae")
        # ComfyUI all-in-one layout through the pipeline loader: transformer, CLIP-L, T5, VAE
        pipe = FluxPipeline.from_single_file(str(f["single"]), config=str(f["config"]))
    for name, mod in m.components.items():
        assert_same_weights(mod, getattr(pipe, name), f"{arch} {name}")


@pytest.mark.parametrize("arch", SD3)
def test_sd3_from_single_file(built, files, arch):
    """diffusers' own SD3 single-file loading (its converter infers depth, dual attention and
    q/k norms from the keys, swaps the last block's context adaLN) reads convkit's file."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    m, f = built(arch), files(arch)
    tr = SD3Transformer2DModel.from_single_file(str(f["single"]), config=str(f["config"]),
                                                subfolder="transformer")
    assert_same_weights(m.components["transformer"], tr, f"{arch} transformer")
    pipe = StableDiffusion3Pipeline.from_single_file(str(f["single"]), config=str(f["config"]))
    for name, mod in m.components.items():
        assert_same_weights(mod, getattr(pipe, name), f"{arch} {name}")


# --------------------------------------------------------------------------- diffusers folder


@pytest.mark.parametrize("arch", ALL)
def test_save_diffusers_reloads(built, files, arch):
    import diffusers

    m, f = built(arch), files(arch)
    assert (f["folder"] / "model_index.json").exists()
    pipe = getattr(diffusers, m.pipeline_class_name).from_pretrained(str(f["folder"]))
    for name, mod in m.components.items():
        assert_same_weights(mod, getattr(pipe, name), f"{arch} {name}")
    assert pipe.tokenizer_2 is not None if "text_encoder_2" in m.components else True
