"""Config inference: the config that fits a set of weights, read from their shapes where no
known config fits — proved by building the real diffusers/transformers model from it and
finding exactly the weights' names and shapes (no missing or unexpected keys)."""
from __future__ import annotations

import copy

import pytest

from convkit import configs, tiny
from convkit.errors import InputFormatError
from convkit.keymap._data import load_config
from convkit.models import meta_shapes

INFERABLE = ("UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection",
             "AutoencoderKL")
CASES = [(arch, comp) for arch in ("sd15", "sdxl", "sdxl_refiner")
         for comp, c in tiny.spec(arch)["components"].items() if c["class"] in INFERABLE]


@pytest.mark.parametrize("arch,comp", CASES)
def test_tiny_shapes_inferred_from_the_released_config(arch, comp):
    """The tiny models differ from the released ones in every width and depth: starting from
    the released config, the shapes alone give a config that builds exactly these weights."""
    c = tiny.spec(arch)["components"][comp]
    shapes = meta_shapes(c["class"], c["config"])
    released = load_config(arch, comp)
    assert configs.mismatch(c["class"], released, shapes)       # the released one does not fit
    # SDXL's added embedding takes the pooled text (the last text encoder's projection) and
    # 6 time ids: the split is the text encoder's to say (render.pipeline_for passes it)
    te = [x for x in tiny.spec(arch)["components"].values() if "projection_dim" in x["config"]]
    context = {"pooled_dim": te[-1]["config"]["projection_dim"]} if te else {}
    cfg = configs.infer(arch, copy.deepcopy(released), shapes, context)
    assert configs.mismatch(cfg["_class_name"], cfg, shapes) == []
    for k in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        if k in c["config"]:
            assert cfg[k] == c["config"][k], k


@pytest.mark.parametrize("arch,comp", CASES)
def test_known_configs_are_recognised(arch, comp):
    c = tiny.spec(arch)["components"][comp]
    r = configs.resolve(arch, comp, meta_shapes(c["class"], c["config"]))
    assert "tiny" in r.source and r.config["_class_name"] == c["class"]
    released = load_config(arch, comp)
    r = configs.resolve(arch, comp, meta_shapes(released["_class_name"], released))
    assert "released" in r.source


def test_ssd1b_like_unet_with_pruned_transformer_depths():
    """SSD-1B / Segmind Vega keep SDXL's levels but drop transformer blocks, differently on
    the way down and up: per-level depth and per-up-layer depth are read from the shapes."""
    base = dict(load_config("sdxl", "unet"))
    ssd = dict(base, block_out_channels=[64, 128, 256], attention_head_dim=[1, 2, 4],
               cross_attention_dim=96, projection_class_embeddings_input_dim=96 + 6 * 16,
               addition_time_embed_dim=16, transformer_layers_per_block=[1, 2, 3],
               reverse_transformer_layers_per_block=[[3, 3, 1], [2, 1, 1], [1, 1, 1]])
    shapes = meta_shapes("UNet2DConditionModel", ssd)
    with pytest.raises(InputFormatError, match="addition_time_embed_dim"):
        configs.resolve("sdxl", "unet", shapes)     # 256 x 6 > 192: the text encoder must say
    r = configs.resolve("sdxl", "unet", shapes, context={"pooled_dim": 96})
    assert r.source.startswith("inferred")
    assert r.config["addition_time_embed_dim"] == 16
    assert r.config["transformer_layers_per_block"] == [1, 2, 3]
    assert r.config["reverse_transformer_layers_per_block"] == [[3, 3, 1], [2, 1, 1], [1, 1, 1]]
    assert r.config["block_out_channels"] == [64, 128, 256]
    assert r.config["attention_head_dim"] == [1, 2, 4]         # 64-wide heads, SDXL's rule
    assert configs.mismatch("UNet2DConditionModel", r.config, shapes) == []


def test_given_config_must_fit():
    c = tiny.spec("sdxl")["components"]["vae"]
    shapes = meta_shapes(c["class"], c["config"])
    with pytest.raises(InputFormatError, match="do not fit the config from --config-from"):
        configs.resolve("sdxl", "vae", shapes, given=load_config("sdxl", "vae"))


def test_shapes_no_config_can_build_are_refused():
    c = tiny.spec("sdxl")["components"]["unet"]
    shapes = dict(meta_shapes(c["class"], c["config"]))
    shapes["conv_out.weight"] = (4, 15, 3, 3)          # a width no GroupNorm/conv chain gives
    with pytest.raises(InputFormatError, match="--config-from"):
        configs.resolve("sdxl", "unet", shapes)
