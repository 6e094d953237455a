"""split: every part where the target tool loads it, under the names its loader takes (the
predicates transcribed from the loaders' code, as formats/layouts/<tool>.toml cites them), a
manifest whose sha256 match the files, per-part dtypes; split -> assemble is bit-exact."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from convkit import archs, tiny
from convkit.layouts.assemble import assemble
from convkit.layouts.split import split
from convkit.layouts.targets import part_of
from convkit.sources import open_source

ARCHS = ["sd15", "sdxl", "sdxl_refiner", "flux_dev", "sd35_large", "sd35_medium"]


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    d = tmp_path_factory.mktemp("split-src")
    return {a: tiny.save_single_file(tiny.build(a), d / f"{a}.safetensors", dtype=torch.float16)
            for a in ARCHS}


def _keys(path):
    with open_source(path) as s:
        return set(s.keys()), dict(s.metadata)


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ARCHS)
def test_comfyui_parts_take_the_names_comfyui_loads(tmp_path, singles, arch):
    out = tmp_path / "models"
    split(singles[arch], out, "comfyui", name="m")
    files = _files(out)
    a = archs.get(arch)
    has = {part_of(a, c) for c in a.components}
    assert "diffusion_models/m.safetensors" in files and "vae/m_vae.safetensors" in files
    # UNETLoader: SGM/BFL/MMDiT reference names (model_detection.unet_prefix_from_state_dict
    # strips a prefix, none is written); the architecture is still detected from them
    keys, md = _keys(out / "diffusion_models/m.safetensors")
    det = archs.detect(open_source(out / "diffusion_models/m.safetensors"))
    assert det.arch.name == arch and det.layout.name in ("sgm-unet", "bfl", "mmdit")
    assert md["convkit.part"] == f"{arch}/{a.diffusion_component}"
    # load_clip / detect_te_model: unprefixed transformers names (SD3's CLIP-L with its
    # projection, CLIPTextModelWithProjection)
    if "clip_l" in has:
        keys, _ = _keys(out / "text_encoders/m_clip_l.safetensors")
        assert "text_model.encoder.layers.0.mlp.fc1.weight" in keys
        assert all(k.startswith("text_model.") for k in keys - {"text_projection.weight"})
        assert ("text_projection.weight" in keys) == (arch.startswith("sd3"))
    if "clip_g" in has:
        keys, _ = _keys(out / "text_encoders/m_clip_g.safetensors")
        assert "text_model.encoder.layers.0.mlp.fc1.weight" in keys
        assert "text_projection.weight" in keys
    if "t5" in has:
        keys, _ = _keys(out / "text_encoders/m_t5xxl.safetensors")
        assert "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" in keys
    # VAE(sd): LDM names without prefix
    keys, _ = _keys(out / "vae/m_vae.safetensors")
    assert "decoder.conv_in.weight" in keys and "decoder.mid.attn_1.q.weight" in keys
    # SD3: the MMDiT in bare reference names (detect_unet_config: joint_blocks -> mmdit), the
    # 16-channel VAE without quant_conv, the three text encoders for TripleCLIPLoader
    if arch.startswith("sd3"):
        assert "quant_conv.weight" not in keys
        keys, _ = _keys(out / "diffusion_models/m.safetensors")
        assert "joint_blocks.0.x_block.attn.qkv.weight" in keys and "pos_embed" in keys
        assert not any(k.startswith("model.diffusion_model.") for k in keys)
        assert [p["loader"].split()[0] for p in json.loads(
            (out / "manifest.json").read_text())["parts"]][1:4] == ["TripleCLIPLoader"] * 3
    # the manifest: every file, its size and sha256
    m = json.loads((out / "manifest.json").read_text())
    assert m["architecture"] == arch and m["target"] == "comfyui"
    listed = {f["path"]: f for p in m["parts"] for f in p["files"]}
    assert set(listed) == set(files) - {"manifest.json"}
    for rel, f in listed.items():
        assert f["sha256"] == _sha(out / rel) and f["bytes"] == (out / rel).stat().st_size


def test_forge_and_sdcpp_keep_sd_text_encoders_in_the_model_file(tmp_path, singles):
    split(singles["sdxl"], tmp_path / "forge", "forge", name="m")
    assert _files(tmp_path / "forge") == ["Stable-diffusion/m.safetensors", "VAE/m_vae.safetensors",
                                          "manifest.json"]
    keys, _ = _keys(tmp_path / "forge/Stable-diffusion/m.safetensors")
    # huggingface_guess reads the model from model.diffusion_model.*; CLIP-G stays OpenCLIP
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert not any(k.startswith("first_stage_model.") for k in keys)
    r = split(singles["flux_dev"], tmp_path / "sdcpp", "sdcpp", name="f")
    assert ("load with: sd-cli --diffusion-model f.safetensors --clip_l f_clip_l.safetensors "
            "--t5xxl f_t5xxl.safetensors --vae f_vae.safetensors") in r.plan.notes
    assert _files(tmp_path / "sdcpp") == ["f.safetensors", "f_clip_l.safetensors",
                                          "f_t5xxl.safetensors", "f_vae.safetensors",
                                          "manifest.json"]


def test_per_part_dtypes(tmp_path, singles):
    split(singles["sdxl"], tmp_path / "o", "comfyui", name="m", dtype=["fp32", "unet=bf16"])
    with open_source(tmp_path / "o/diffusion_models/m.safetensors") as s:
        assert {s.info(k).dtype for k in s.keys()} == {"BF16"}
    with open_source(tmp_path / "o/text_encoders/m_clip_g.safetensors") as s:
        assert {s.info(k).dtype for k in s.keys()} == {"F32"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("target", ["comfyui", "forge", "sdcpp"])
def test_split_then_assemble_is_bit_exact(tmp_path, singles, arch, target):
    out = tmp_path / "parts"
    split(singles[arch], out, target, name="m")
    m = json.loads((out / "manifest.json").read_text())
    parts = {}
    for p in m["parts"]:
        parts[p["part"]] = [str(out / p["files"][0]["path"])]
    assemble(parts, tmp_path / "back.safetensors")
    with open_source(singles[arch]) as a, open_source(tmp_path / "back.safetensors") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert a.info(k).dtype == b.info(k).dtype, k
            assert torch.equal(a.load(k).reshape(-1).view(torch.uint8),
                               b.load(k).reshape(-1).view(torch.uint8)), k


def test_sd3_for_sdcpp_and_forge_every_text_encoder_in_a_file_of_its_own(tmp_path, singles):
    """sd.cpp docs/sd3.md: --clip_l --clip_g --t5xxl next to the model (--diffusion-model adds
    model.diffusion_model.); Forge sd35.py: the checkpoint with model.diffusion_model. names,
    each text encoder unconverted in models/text_encoder."""
    r = split(singles["sd35_large"], tmp_path / "sdcpp", "sdcpp", name="s")
    assert ("load with: sd-cli --diffusion-model s.safetensors --clip_l s_clip_l.safetensors "
            "--clip_g s_clip_g.safetensors --t5xxl s_t5xxl.safetensors --vae s_vae.safetensors"
            ) in r.plan.notes
    keys, _ = _keys(tmp_path / "sdcpp/s_clip_g.safetensors")
    assert "text_projection.weight" in keys and "text_model.final_layer_norm.weight" in keys
    split(singles["sd35_large"], tmp_path / "forge", "forge", name="s")
    assert _files(tmp_path / "forge") == [
        "Stable-diffusion/s.safetensors", "VAE/s_vae.safetensors", "manifest.json",
        "text_encoder/s_clip_g.safetensors", "text_encoder/s_clip_l.safetensors",
        "text_encoder/s_t5xxl.safetensors"]
    keys, _ = _keys(tmp_path / "forge/Stable-diffusion/s.safetensors")
    # backend/loader.py sd3_test_key
    assert "model.diffusion_model.final_layer.adaLN_modulation.1.bias" in keys
    assert all(k.startswith("model.diffusion_model.") for k in keys)


@pytest.mark.parametrize("arch", ["sdxl", "flux_dev", "sd35_large"])
def test_every_part_is_recognised_by_inspect(tmp_path, singles, arch):
    from convkit.inspection import inspect as inspect_path

    out = tmp_path / "parts"
    split(singles[arch], out, "comfyui", name="m")
    m = json.loads((out / "manifest.json").read_text())
    for p in m["parts"]:
        rep = inspect_path(out / p["files"][0]["path"])
        if p["part"] == "unet":
            assert rep["architecture"] == arch
        else:
            # convkit.part narrows the fit to the component it was split from
            assert rep["part"]["fits"] == [f"{arch}/{p['component']}"], (p, rep.get("part"))


def test_split_for_diffusers_writes_loadable_component_folders(tmp_path, singles):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    split(singles["sdxl"], tmp_path / "d", "diffusers", parts=["unet", "vae"])
    assert (tmp_path / "d/unet/config.json").is_file()
    unet, info = UNet2DConditionModel.from_pretrained(tmp_path / "d/unet", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    vae, info = AutoencoderKL.from_pretrained(tmp_path / "d/vae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    m = json.loads((tmp_path / "d/manifest.json").read_text())
    assert [p["part"] for p in m["parts"]] == ["unet", "vae"]


def test_quantized_unet_with_fp16_text_encoders(tmp_path, singles):
    """--to unet=gguf:Q8_0 --dtype te=fp16: the GGUF is byte-identical in its tensors to
    `convkit quantize --to gguf:Q8_0`, the text encoders are fp16."""
    from convkit.quantize import quantize
    from gguf import GGUFReader

    src = singles["flux_dev"]
    split(src, tmp_path / "o", "comfyui", name="f", to=["unet=gguf:Q8_0"], dtype=["te=fp32"])
    quantize(src, tmp_path / "ref.gguf", "gguf:Q8_0")
    got = tmp_path / "o/diffusion_models/f-Q8_0.gguf"
    a, b = GGUFReader(got), GGUFReader(tmp_path / "ref.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and x.data.tobytes() == y.data.tobytes(), x.name
    with open_source(tmp_path / "o/text_encoders/f_t5xxl.safetensors") as s:
        assert {s.info(k).dtype for k in s.keys()} == {"F32"}
    m = json.loads((tmp_path / "o/manifest.json").read_text())
    assert m["parts"][0]["files"][0]["path"] == "diffusion_models/f-Q8_0.gguf"


def test_lora_part_is_extract_lora(tmp_path):
    """--parts lora --base B --rank R writes what extract-lora writes, byte for byte (the demo's
    Lightning UNet, diffusers names, against the demo base)."""
    from convkit import tiny as tiny_pkg
    from convkit.layouts.split import LoraPart
    from convkit.lora.extract import extract_lora
    from pathlib import Path

    demo = Path(tiny_pkg.__file__).parent / "demo"
    unet, base = demo / "lightning_unet.safetensors", demo / "base.safetensors"
    split(unet, tmp_path / "o", "comfyui", name="l", parts=["lora"],
          lora=LoraPart(str(base), 8))
    extract_lora(unet, base, tmp_path / "ref.safetensors", rank=8, fmt="comfy")
    got = tmp_path / "o/loras/l_lora_r8.safetensors"
    ga, gb = _keys(got), _keys(tmp_path / "ref.safetensors")
    assert ga[0] == gb[0]
    from safetensors.torch import load_file

    a, b = load_file(got), load_file(tmp_path / "ref.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    m = json.loads((tmp_path / "o/manifest.json").read_text())
    assert m["parts"][0]["part"] == "lora" and m["parts"][0]["files"][0]["sha256"] == _sha(got)


def test_cli_dry_run_writes_nothing_and_json_describes_the_plan(tmp_path, singles):
    from click.testing import CliRunner

    from convkit.cli import main

    src = singles["sdxl"]
    r = CliRunner().invoke(main, ["split", str(src), "-o", str(tmp_path / "o"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "text_encoders/sdxl_clip_g.safetensors" in r.output and "split rows" in r.output
    r = CliRunner().invoke(main, ["assemble", "--unet", str(src), "--vae", str(src), "-o",
                                  str(tmp_path / "x.safetensors"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["dry_run"] and d["plan"]["tensors"] > 0
    assert any("text_encoder" in n for n in d["notes"])       # the parts not given
    r = CliRunner().invoke(main, ["split", str(src), "-o", str(tmp_path / "o"), "--json",
                                  "--parts", "unet,vae", "--dtype", "fp16"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["bytes_written"] > 0
    assert list(tmp_path.iterdir()) == [tmp_path / "o"]
