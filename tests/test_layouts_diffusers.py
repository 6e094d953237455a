"""convert --layout diffusers / single-file on the tiny real-class models: the folder loads with
diffusers' own from_pretrained (no missing or unexpected keys), the single file with
from_single_file, both compute the same outputs as the original; round trips are bit-exact."""
from __future__ import annotations

import json

import pytest
import torch

from convkit import tiny
from convkit.convert import convert
from convkit.sources import open_source

ARCHS = ["sd15", "sdxl", "sdxl_refiner", "flux_dev", "flux_schnell"]
FLUX = ("flux_dev", "flux_schnell")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """arch -> (tiny model, its fp32 single file, convkit's diffusers folder of it)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            d = tmp_path_factory.mktemp(arch)
            t = tiny.build(arch)
            single = tiny.save_single_file(t, d / "m.safetensors")
            extra = {}
            if arch in FLUX:      # convkit ships no T5 vocabulary: the tokenizer comes from a folder
                extra["config_from"] = tiny.save_diffusers(t, d / "cfg", weights=False)
            convert(single, d / "folder", "fp32", layout="diffusers", **extra)
            cache[arch] = (t, single, d / "folder")
        return cache[arch]
    return get


def _all(path):
    with open_source(path) as s:
        return {k: (s.info(k).dtype, s.load(k).reshape(-1).view(torch.uint8).clone())
                for k in s.keys()}


@pytest.mark.parametrize("arch", ARCHS)
def test_single_to_diffusers_to_single_is_bit_exact(tmp_path, made, arch):
    t, single, folder = made(arch)
    convert(folder, tmp_path / "back.safetensors", "fp32", layout="single-file")
    a, b = _all(single), _all(tmp_path / "back.safetensors")
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:4]
    for k in a:
        assert a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1]), k


# sdxl's folder is loaded by test_single_file_and_folder_compute_the_same, flux_schnell's
# by test_flux_folder_without_config_from_loads_with_the_shipped_t5_tokenizer
@pytest.mark.parametrize("arch", ["sd15", "sdxl_refiner", "flux_dev"])
def test_folder_loads_with_from_pretrained_without_missing_keys(made, arch):
    import diffusers

    t, single, folder = made(arch)
    mi = json.loads((folder / "model_index.json").read_text())
    assert mi["_class_name"] == t.pipeline_class_name
    pipe = getattr(diffusers, t.pipeline_class_name).from_pretrained(folder, local_files_only=True)
    for comp, mod in t.components.items():
        cls = type(mod)
        loaded, info = cls.from_pretrained(folder, subfolder=comp, output_loading_info=True,
                                           local_files_only=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (comp, info)
        for k, v in mod.state_dict().items():
            assert torch.equal(getattr(pipe, comp).state_dict()[k], v), (comp, k)


@pytest.mark.parametrize("arch", ["sdxl", "sdxl_refiner"])
def test_single_file_and_folder_compute_the_same(made, arch):
    """from_single_file (config = convkit's folder, the offline way) and from_pretrained give
    the same UNet, text-encoder and VAE outputs on a fixed input."""
    import diffusers

    t, single, folder = made(arch)
    cls = getattr(diffusers, t.pipeline_class_name)
    a = cls.from_pretrained(folder, local_files_only=True)
    b = cls.from_single_file(str(single), config=str(folder), local_files_only=True)
    for comp in t.components:          # the same weights, bit for bit
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        for k, v in sa.items():
            assert torch.equal(v, sb[k]), (comp, k)
    # the same outputs; from_single_file may hold a weight as a transposed view (another
    # matmul kernel), hence a float tolerance rather than bit equality
    same = lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-6)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (1, 77), generator=g)
    with torch.no_grad():
        for te in ("text_encoder", "text_encoder_2"):
            if getattr(a, te, None) is not None:
                oa, ob = getattr(a, te)(ids, output_hidden_states=True), getattr(b, te)(
                    ids, output_hidden_states=True)
                assert same(oa.hidden_states[-2], ob.hidden_states[-2]), te
                assert same(oa[0], ob[0]), te
        u = a.unet.config
        x = torch.randn(1, u.in_channels, 8, 8, generator=g)
        ctx = torch.randn(1, 77, u.cross_attention_dim, generator=g)
        kw = {}
        if u.addition_embed_type == "text_time":
            pooled = u.projection_class_embeddings_input_dim - 6 * u.addition_time_embed_dim
            n_ids = 6
            if pooled <= 0 or "refiner" in arch:
                n_ids = 5
                pooled = u.projection_class_embeddings_input_dim - 5 * u.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.randn(1, n_ids, generator=g)}
        assert same(a.unet(x, 500, ctx, **kw).sample, b.unet(x, 500, ctx, **kw).sample)
        z = torch.randn(1, a.vae.config.latent_channels, 8, 8, generator=g)
        assert same(a.vae.decode(z).sample, b.vae.decode(z).sample)
        assert same(a.vae.decode(z).sample, t.components["vae"].decode(z).sample)


def test_diffusers_folder_to_single_to_diffusers_keeps_tensors_and_configs(tmp_path):
    t = tiny.build("sdxl")
    src = tiny.save_diffusers(t, tmp_path / "orig")
    convert(src, tmp_path / "s.safetensors", "fp32", layout="single-file")
    convert(tmp_path / "s.safetensors", tmp_path / "again", "fp32", layout="diffusers")
    for comp, mod in t.components.items():
        with open_source(tmp_path / "again" / comp) as s:
            got = {k.removeprefix("text_model."): s.load(k) for k in s.keys()}
        want = {k.removeprefix("text_model."): v for k, v in mod.state_dict().items()
                if not k.endswith("position_ids")}
        assert set(got) == set(want), comp
        for k, v in want.items():
            assert torch.equal(got[k], v), (comp, k)
        cfg = json.loads((tmp_path / "again" / comp / "config.json").read_text())
        for k, v in mod.config.items() if hasattr(mod.config, "items") else \
                mod.config.to_dict().items():
            if not k.startswith("_") and k in cfg and not isinstance(v, (list, tuple)):
                assert cfg[k] == v, (comp, k)


def test_flux_folder_without_config_from_loads_with_the_shipped_t5_tokenizer(tmp_path):
    import diffusers

    t = tiny.build("flux_schnell")
    single = tiny.save_single_file(t, tmp_path / "m.safetensors")
    r = convert(single, tmp_path / "f", "fp32", layout="diffusers")
    assert not any("tokenizer" in n for n in r.plan.notes)
    pipe = diffusers.FluxPipeline.from_pretrained(tmp_path / "f", local_files_only=True)
    assert type(pipe.tokenizer_2).__name__.startswith("T5Tokenizer")


def test_flux_single_file_and_folder_hold_the_same_weights(made):
    """FluxPipeline.from_single_file (config = convkit's folder) and from_pretrained of the
    folder give bit-identical components (diffusers' Flux converter hard-codes the full-size
    width: patched for the tiny model as tests/test_fixtures.py does)."""
    import diffusers

    from tests.test_fixtures import flux_converter_for

    t, single, folder = made("flux_dev")
    a = diffusers.FluxPipeline.from_pretrained(folder, local_files_only=True)
    cfg = t.components["transformer"].config
    with flux_converter_for(cfg.num_attention_heads * cfg.attention_head_dim):
        b = diffusers.FluxPipeline.from_single_file(str(single), config=str(folder),
                                                    local_files_only=True)
    for comp in t.components:
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        assert set(sa) == set(sb), comp
        for k, v in sa.items():
            if sb[k].is_meta:       # T5's tied alias of shared.weight, left untied by diffusers
                assert k == "encoder.embed_tokens.weight", (comp, k)
                continue
            assert torch.equal(v, sb[k]), (comp, k)


def test_large_components_are_sharded_as_save_pretrained_does(tmp_path):
    from diffusers import UNet2DConditionModel

    t = tiny.build("sdxl")
    single = tiny.save_single_file(t, tmp_path / "m.safetensors")
    convert(single, tmp_path / "f", "fp32", layout="diffusers", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "f/unet/diffusion_pytorch_model.safetensors.index.json")
                       .read_text())
    shards = sorted(p.name for p in (tmp_path / "f/unet").glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    unet, info = UNet2DConditionModel.from_pretrained(tmp_path / "f/unet",
                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for k, v in t.components["unet"].state_dict().items():
        assert torch.equal(unet.state_dict()[k], v), k
