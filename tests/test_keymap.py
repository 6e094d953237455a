"""Key maps: exact round trips, names-only helper == state-dict map, key counts, known real names,
and the full-size SDXL/SD1.5/Flux layouts checked against diffusers' own LDM converters (meta tensors)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from convkit import keymap, tiny
from convkit.keymap import KeyMapError, Slice
from convkit.keymap import _fwd

CASES = [(arch, comp) for arch in tiny.ARCHS for comp in tiny.spec(arch)["components"]]


@pytest.fixture(scope="module")
def models():
    return {arch: tiny.build(arch) for arch in tiny.ARCHS}


def _kind(arch, comp):
    return keymap.components(arch)[comp][0]


def _cfg(arch, comp):
    return tiny.spec(arch)["components"][comp]["config"]


@pytest.mark.parametrize("arch,comp", CASES)
def test_round_trip_exact(models, arch, comp):
    sd = models[arch].state_dicts()[comp]
    kind = _kind(arch, comp)
    single = keymap.to_single_file(kind, sd)
    back = keymap.to_diffusers(kind, single)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # and the other way round: single -> diffusers -> single
    again = keymap.to_single_file(kind, back)
    assert set(again) == set(single)
    assert all(torch.equal(again[k], single[k]) for k in single)
    # with the config instead of inference from the names
    assert set(keymap.to_single_file(kind, sd, _cfg(arch, comp))) == set(single)


@pytest.mark.parametrize("arch,comp", CASES)
def test_names_helper_agrees_with_state_dict_map(models, arch, comp):
    sd = models[arch].state_dicts()[comp]
    kind, cfg = _kind(arch, comp), _cfg(arch, comp)
    single = keymap.to_single_file(kind, sd)
    for name, t in sd.items():
        sname, sl = keymap.single_file_name(kind, name, cfg)
        assert sname in single, (name, sname)
        assert name in keymap.diffusers_names(kind, sname, cfg)
        if sl is None:
            r = keymap.resolve(kind, name, cfg)
            assert torch.equal(single[sname], _fwd(r.transform, t)), name
        else:
            assert sl.start is not None and sl.stop is not None
            assert torch.equal(single[sname].narrow(sl.dim, sl.start, sl.stop - sl.start), t), name


@pytest.mark.parametrize("arch,comp", CASES)
def test_key_counts(models, arch, comp):
    m = models[arch]
    sd = m.state_dicts()[comp]
    kind, cfg = _kind(arch, comp), _cfg(arch, comp)
    n = len(keymap.to_single_file(kind, sd))
    if kind in ("unet", "vae", "t5", "clip_proj"):
        expected = len(sd)
    elif kind == "clip_l":
        expected = len(sd) + 1                                  # + position_ids
    elif kind == "openclip":
        expected = len(sd) - 4 * cfg["num_hidden_layers"] + 1   # q,k,v (w+b) fused; + logit_scale
    elif kind == "mmdit":  # x/context qkv (w+b) fused per block, attn2 qkv in dual blocks
        expected = len(sd) - 8 * cfg["num_layers"] - 4 * len(cfg.get("dual_attention_layers", ()))
    else:  # flux: img/txt qkv (w+b) fused per double block; q,k,v,mlp (w+b) per single block
        expected = len(sd) - 8 * cfg["num_layers"] - 6 * cfg["num_single_layers"]
    assert n == expected


def test_prefixes_and_whole_checkpoint(models):
    sd = tiny.state_dict_single_file(models["sdxl"])
    heads = {k.split(".")[0] + "." + k.split(".")[1] for k in sd}
    assert heads == {"model.diffusion_model", "conditioner.embedders", "first_stage_model.encoder",
                     "first_stage_model.decoder", "first_stage_model.quant_conv",
                     "first_stage_model.post_quant_conv"}
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in sd)
    ref = tiny.state_dict_single_file(models["sdxl_refiner"])
    assert "conditioner.embedders.0.model.text_projection" in ref
    assert not any(k.startswith("conditioner.embedders.1.") for k in ref)
    flux = tiny.state_dict_single_file(models["flux_dev"])
    assert "text_encoders.t5xxl.transformer.shared.weight" in flux
    assert "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight" in flux
    assert "vae.decoder.conv_out.weight" in flux and "model.diffusion_model.guidance_in.in_layer.weight" in flux
    bfl = tiny.state_dict_single_file(models["flux_schnell"], layout="bfl")
    assert "img_in.weight" in bfl and not any(k.startswith(("guidance_in", "text_encoders", "vae.")) for k in bfl)
    back = keymap.arch_to_diffusers("flux_schnell", bfl, layout="bfl")
    assert set(back) == {"transformer"}


def test_transforms_are_real(models):
    te2 = models["sdxl"].state_dicts()["text_encoder_2"]
    s = keymap.to_single_file("openclip", te2)
    assert torch.equal(s["text_projection"], te2["text_projection.weight"].t())
    vae = models["sdxl"].state_dicts()["vae"]
    s = keymap.to_single_file("vae", vae)
    q = s["encoder.mid.attn_1.q.weight"]
    assert q.ndim == 4 and q.shape[2:] == (1, 1)
    fl = models["flux_dev"].state_dicts()["transformer"]
    s = keymap.to_single_file("flux", fl)
    w = fl["norm_out.linear.weight"]
    h = w.shape[0] // 2
    assert torch.equal(s["final_layer.adaLN_modulation.1.weight"][:h], w[h:])


# --------------------------------------------------------------------------- known real names (full-size configs)

KNOWN = [
    ("unet", "sdxl", "conv_in.weight", "input_blocks.0.0.weight"),
    ("unet", "sdxl", "add_embedding.linear_2.bias", "label_emb.0.2.bias"),
    ("unet", "sdxl", "down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
    ("unet", "sdxl", "down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
    ("unet", "sdxl", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight",
     "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"),
    ("unet", "sdxl", "mid_block.attentions.0.proj_in.weight", "middle_block.1.proj_in.weight"),
    ("unet", "sdxl", "mid_block.resnets.1.time_emb_proj.weight", "middle_block.2.emb_layers.1.weight"),
    ("unet", "sdxl", "up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
    ("unet", "sdxl", "up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
    ("unet", "sdxl", "up_blocks.2.resnets.2.norm2.weight", "output_blocks.8.0.out_layers.0.weight"),
    ("unet", "sdxl", "conv_norm_out.weight", "out.0.weight"),
    ("unet", "sd15", "up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
    ("unet", "sd15", "up_blocks.3.attentions.2.proj_out.weight", "output_blocks.11.1.proj_out.weight"),
    ("unet", "sd15", "down_blocks.3.resnets.1.conv2.weight", "input_blocks.11.0.out_layers.3.weight"),
    ("unet", "sd15", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "output_blocks.3.1.transformer_blocks.0.attn1.to_q"),
    ("vae", "sdxl", "decoder.up_blocks.0.resnets.0.conv1.weight", "decoder.up.3.block.0.conv1.weight"),
    ("vae", "sdxl", "decoder.up_blocks.2.resnets.0.conv_shortcut.weight", "decoder.up.1.block.0.nin_shortcut.weight"),
    ("vae", "sdxl", "decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.3.upsample.conv.weight"),
    ("vae", "sdxl", "encoder.down_blocks.1.downsamplers.0.conv.bias", "encoder.down.1.downsample.conv.bias"),
    ("vae", "sdxl", "encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid.attn_1.proj_out.weight"),
    ("vae", "sdxl", "decoder.mid_block.resnets.1.norm2.bias", "decoder.mid.block_2.norm2.bias"),
    ("vae", "sdxl", "encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
    ("clip_l", "sdxl", "text_model.encoder.layers.11.mlp.fc2.weight", "text_model.encoder.layers.11.mlp.fc2.weight"),
    ("clip_l", "sdxl", "encoder.layers.11.mlp.fc2.weight", "text_model.encoder.layers.11.mlp.fc2.weight"),
    ("openclip", "sdxl", "text_model.encoder.layers.31.mlp.fc1.bias", "transformer.resblocks.31.mlp.c_fc.bias"),
    ("openclip", "sdxl", "text_model.encoder.layers.0.layer_norm2.weight", "transformer.resblocks.0.ln_2.weight"),
    ("openclip", "sdxl", "text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("openclip", "sdxl", "text_projection.weight", "text_projection"),
    ("flux", "flux_dev", "transformer_blocks.18.attn.norm_added_k.weight",
     "double_blocks.18.txt_attn.norm.key_norm.scale"),
    ("flux", "flux_dev", "transformer_blocks.0.ff_context.net.0.proj.bias", "double_blocks.0.txt_mlp.0.bias"),
    ("flux", "flux_dev", "single_transformer_blocks.37.proj_out.weight", "single_blocks.37.linear2.weight"),
    ("flux", "flux_dev", "time_text_embed.guidance_embedder.linear_1.weight", "guidance_in.in_layer.weight"),
    ("flux", "flux_dev", "norm_out.linear.weight", "final_layer.adaLN_modulation.1.weight"),
    # SD3 / SD3.5 (diffusers single_file_utils.py convert_sd3_transformer_checkpoint_to_diffusers)
    ("mmdit", "sd35_large", "pos_embed.pos_embed", "pos_embed"),
    ("mmdit", "sd35_large", "pos_embed.proj.weight", "x_embedder.proj.weight"),
    ("mmdit", "sd35_large", "time_text_embed.text_embedder.linear_2.bias", "y_embedder.mlp.2.bias"),
    ("mmdit", "sd35_large", "transformer_blocks.37.attn.norm_added_k.weight",
     "joint_blocks.37.context_block.attn.ln_k.weight"),
    ("mmdit", "sd35_large", "transformer_blocks.36.attn.to_add_out.bias",
     "joint_blocks.36.context_block.attn.proj.bias"),
    ("mmdit", "sd35_large", "transformer_blocks.5.ff_context.net.2.weight",
     "joint_blocks.5.context_block.mlp.fc2.weight"),
    ("mmdit", "sd35_medium", "transformer_blocks.12.attn2.norm_q.weight",
     "joint_blocks.12.x_block.attn2.ln_q.weight"),
    ("mmdit", "sd3_medium", "proj_out.weight", "final_layer.linear.weight"),
    ("clip_proj", "sd35_large", "text_projection.weight", "text_projection.weight"),
]


def test_mmdit_last_block_swaps_its_context_adaln():
    """Only the last joint block's context adaLN (2 x hidden rows, pre_only) and the final
    layer's have (shift, scale) halves swapped; every other block's is copied as is."""
    for arch, last in (("sd35_large", 37), ("sd3_medium", 23)):
        r = keymap.resolve("mmdit", f"transformer_blocks.{last}.norm1_context.linear.weight", arch)
        assert r.transform == "swap_halves"
        r = keymap.resolve("mmdit", f"transformer_blocks.{last - 1}.norm1_context.linear.weight", arch)
        assert r.transform is None
        assert keymap.resolve("mmdit", "norm_out.linear.bias", arch).transform == "swap_halves"
    # the q/k/v of the image and text streams sit in thirds of the fused qkv
    assert keymap.single_file_name("mmdit", "transformer_blocks.3.attn.add_v_proj.weight",
                                   "sd35_large") == (
        "joint_blocks.3.context_block.attn.qkv.weight", Slice(0, 2, 3, 4864, 7296))
    # without a config or names, which block is the last is unknown: refused, not guessed
    with pytest.raises(keymap.KeyMapError, match="last"):
        keymap.resolve("mmdit", "transformer_blocks.1.norm1_context.linear.weight")


@pytest.mark.parametrize("kind,arch,dname,sname", KNOWN)
def test_known_names(kind, arch, dname, sname):
    got, sl = keymap.single_file_name(kind, dname, arch)
    assert (got, sl) == (sname, None)
    (d,) = keymap.diffusers_names(kind, sname, arch)
    if kind == "clip_l":  # written in the installed transformers' spelling (flat or text_model.)
        assert d.removeprefix("text_model.") == dname.removeprefix("text_model.")
    else:
        assert d == dname


def test_fused_slices():
    # LoRA on SDXL TE2 k_proj lands in the middle third of in_proj_weight
    assert keymap.single_file_name("openclip", "text_model.encoder.layers.3.self_attn.k_proj", "sdxl") == (
        "transformer.resblocks.3.attn.in_proj_weight", Slice(0, 1, 3, 1280, 2560))
    assert keymap.single_file_name("openclip", "text_model.encoder.layers.3.self_attn.q_proj.bias", "sdxl") == (
        "transformer.resblocks.3.attn.in_proj_bias", Slice(0, 0, 3, 0, 1280))
    assert keymap.single_file_name("flux", "transformer_blocks.2.attn.add_v_proj.weight", "flux_dev") == (
        "double_blocks.2.txt_attn.qkv.weight", Slice(0, 2, 3, 6144, 9216))
    assert keymap.single_file_name("flux", "single_transformer_blocks.5.proj_mlp", "flux_dev") == (
        "single_blocks.5.linear1", Slice(0, 3, 4, 9216, 9216 + 12288))
    name, sl = keymap.single_file_name("flux", "single_transformer_blocks.5.attn.to_k.weight")
    assert name == "single_blocks.5.linear1.weight" and sl == Slice(0, 1, 4, None, None)


def test_parts_public_helper(models):
    """keymap.parts / ComponentMap: fused single-file tensors split into diffusers rows, the same
    split to_diffusers() makes, from a config or from the state dict alone."""
    P = keymap.Part
    assert keymap.parts("openclip", "transformer.resblocks.3.attn.in_proj_weight", "sdxl") == [
        P("text_model.encoder.layers.3.self_attn.q_proj.weight", 0, 0, 1280),
        P("text_model.encoder.layers.3.self_attn.k_proj.weight", 0, 1280, 2560),
        P("text_model.encoder.layers.3.self_attn.v_proj.weight", 0, 2560, 3840)]
    lin1 = keymap.parts("flux", "single_blocks.5.linear1.weight", "flux_dev")
    assert [(p.start, p.stop) for p in lin1] == [(0, 3072), (3072, 6144), (6144, 9216),
                                                 (9216, 9216 + 12288)]
    assert lin1[3].name == "single_transformer_blocks.5.proj_mlp.weight"
    # no config: sizes from the tensor's own length, else unknown
    assert [(p.start, p.stop) for p in keymap.parts(
        "flux", "double_blocks.0.img_attn.qkv.weight", None, total=96)] == [(0, 32), (32, 64), (64, 96)]
    assert keymap.parts("flux", "double_blocks.0.img_attn.qkv.weight")[0].start is None
    assert keymap.parts("unet", "input_blocks.1.0.in_layers.2.weight", "sdxl") == [
        P("down_blocks.0.resnets.0.conv1.weight", 0, None, None)]
    with pytest.raises(KeyMapError):
        keymap.parts("openclip", "no.such.tensor", "sdxl")
    # a whole tiny model: every single-file tensor, split by ComponentMap as to_diffusers splits it
    for arch, comp in [("sdxl", "text_encoder_2"), ("flux_dev", "transformer"), ("sdxl", "unet")]:
        kind = _kind(arch, comp)
        single = keymap.to_single_file(kind, models[arch].state_dicts()[comp])
        back = keymap.to_diffusers(kind, single)
        cm = keymap.ComponentMap(kind, None, names=list(single), side="s", sd=single)
        cd = keymap.ComponentMap(kind, None, names=list(back), side="d", sd=back)
        fused = 0
        for name, t in single.items():
            sp = cm.split(name, t.shape[0] if t.ndim else 0)
            if sp is None:      # single-file-only tensors (position_ids, logit_scale)
                continue
            fused += sp.fused
            for p in sp.parts:
                piece = t if not sp.fused else t[p.start:p.stop]
                ref = back[p.name]
                assert piece.numel() == ref.numel(), (name, p)
                if sp.transform is None:
                    assert torch.equal(piece, ref), (name, p)
            # and back: each part locates its tensor and index
            for k, p in enumerate(sp.parts):
                got, idx = cd.locate(p.name)
                assert got.single == name and idx == k
        assert fused or kind == "unet", arch


def test_errors():
    with pytest.raises(KeyMapError):
        keymap.to_single_file("vae", {"encoder.bogus.weight": torch.zeros(1)})
    with pytest.raises(KeyMapError):
        keymap.single_file_name("unet", "down_blocks.0.resnets.0.conv1.weight")   # needs a config
    with pytest.raises(KeyMapError):
        keymap.to_single_file("flux", {"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)})
    with pytest.raises(LookupError):
        keymap.to_single_file("unnet", {})


# --------------------------------------------------------------------------- full size, against diffusers' converters


def test_full_size_sdxl_counts():
    from convkit.tiny.full_size import full_size_param_counts, full_size_shapes

    shapes = full_size_shapes("sdxl")
    assert len(shapes) == 2515
    assert sum(k.startswith("model.diffusion_model.") for k in shapes) == 1680
    assert sum(k.startswith("conditioner.embedders.0.") for k in shapes) == 197
    assert sum(k.startswith("conditioner.embedders.1.") for k in shapes) == 390
    assert sum(k.startswith("first_stage_model.") for k in shapes) == 248
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes["first_stage_model.decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    pc = full_size_param_counts("sdxl")
    assert pc == {"unet": 2567463684, "text_encoder": 123060480, "text_encoder_2": 694659840, "vae": 83653863}
    assert len(full_size_shapes("sd15")) == 1131
    assert len(full_size_shapes("flux_dev", layout="bfl")) == 780


@pytest.mark.parametrize("arch", ["sdxl", "sd15", "sdxl_refiner"])
def test_full_size_names_match_diffusers_converters(arch):
    """Our full-size single-file names, fed to diffusers' own LDM->diffusers converters (meta
    tensors), give exactly the diffusers model's names and shapes."""
    from diffusers.loaders import single_file_utils as sfu

    from convkit.tiny.full_size import full_size_config, full_size_state_dict, meta_state_dicts

    ck = full_size_state_dict(arch)
    ref = meta_state_dicts(arch)
    unet = sfu.convert_ldm_unet_checkpoint(dict(ck), full_size_config(arch, "unet"))
    assert {k: tuple(v.shape) for k, v in unet.items()} == {k: tuple(v.shape) for k, v in ref["unet"].items()}
    vae = sfu.convert_ldm_vae_checkpoint(dict(ck), full_size_config(arch, "vae"))
    assert {k: tuple(v.shape) for k, v in vae.items()} == {k: tuple(v.shape) for k, v in ref["vae"].items()}
    if "text_encoder_2" in ref:
        prefix = keymap.components(arch)["text_encoder_2"][1]
        te2 = sfu.convert_open_clip_checkpoint(object(), dict(ck), prefix=prefix)
        assert {k: tuple(v.shape) for k, v in te2.items()} == \
            {k: tuple(v.shape) for k, v in ref["text_encoder_2"].items()}


def test_full_size_flux_names_match_diffusers_converter():
    from diffusers.loaders import single_file_utils as sfu

    from convkit.tiny.full_size import full_size_state_dict, meta_state_dicts

    for arch in ("flux_dev", "flux_schnell"):
        ck = full_size_state_dict(arch, layout="bfl")
        conv = sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(ck))
        ref = meta_state_dicts(arch)["transformer"]
        assert {k: tuple(v.shape) for k, v in conv.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_clip_spelling_from_the_version_agrees_with_the_class():
    """The installed transformers' CLIPTextModel spelling, told from its version number, is
    what the class itself has."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from convkit.keymap import maps

    cfg = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, vocab_size=8, max_position_embeddings=4)
    with torch.device("meta"):
        keys = CLIPTextModel(cfg).state_dict()
    assert maps._clip_is_flat() == (not any(k.startswith("text_model.") for k in keys))
