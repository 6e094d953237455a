"""Bad input to convert --layout / split / assemble (issue 10): one line saying what is wrong
and which inputs disagree, a non-zero exit, nothing written."""
from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from convkit import keymap, tiny
from convkit.cli import main


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def one_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("convkit: error:")]
    assert len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


def listing(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    out = {}
    for arch in ("sdxl", "sdxl_refiner", "sd15", "flux_schnell"):
        t = tiny.build(arch)
        out[arch] = tiny.save_single_file(t, d / f"{arch}.safetensors")
        out[arch + "_tiny"] = t
    # lone parts as users keep them: an SGM UNet, a CLIP-L in transformers names
    sd = tiny.state_dict_single_file(out["sdxl_tiny"])
    out["unet"] = tiny.save_state_dict(
        {k[len("model.diffusion_model."):]: v for k, v in sd.items()
         if k.startswith("model.diffusion_model.")}, d / "unet.safetensors")
    # a CLIP-L (real class, transformers names) wider than the tiny SDXL's
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(**{**out["sdxl_tiny"].components["text_encoder"].config.to_dict(),
                            "hidden_size": 48, "intermediate_size": 96})
    torch.manual_seed(0)
    out["wide_clip_l"] = tiny.save_state_dict(
        {k: v.contiguous() for k, v in CLIPTextModel(cfg).state_dict().items()},
        d / "wide_clip_l.safetensors")
    out["sd15_clip_l"] = tiny.save_state_dict(
        dict(out["sd15_tiny"].components["text_encoder"].state_dict()), d / "sd15_clip_l.safetensors")
    out["refiner_clip_g"] = tiny.save_state_dict(
        {k: v for k, v in tiny.state_dict_single_file(out["sdxl_refiner_tiny"]).items()
         if k.startswith("conditioner.embedders.0.model.")}, d / "refiner_te.safetensors")
    return out


def test_parts_of_different_architectures(tmp_path, files):
    code, out = run("assemble", "--unet", files["sdxl"], "--clip-g", files["sdxl_refiner"],
                    "-o", tmp_path / "x.safetensors")
    assert code == 2
    line = one_line(out)
    assert "--clip-g" in line and "(refiner) checkpoint" in line and "--unet is" in line
    assert listing(tmp_path) == []


def test_refiner_text_encoder_given_as_a_base_one(tmp_path, files):
    code, out = run("assemble", "--unet", files["sdxl"], "--clip-g", files["refiner_clip_g"],
                    "-o", tmp_path / "x.safetensors")
    assert code == 2
    line = one_line(out)
    assert "--clip-g" in line and "refiner" in line.lower()
    assert listing(tmp_path) == []


def test_parts_whose_sizes_disagree_name_the_pair(tmp_path, files):
    # a wider CLIP-L: the cross-attention width no longer adds up
    code, out = run("assemble", "--unet", files["unet"], "--clip-l", files["wide_clip_l"],
                    "--clip-g", files["sdxl"], "--vae", files["sdxl"], "-o",
                    tmp_path / "x.safetensors")
    assert code == 2
    line = one_line(out)
    assert "--unet" in line and "--clip-l" in line and "--clip-g" in line
    assert "48" in line
    assert listing(tmp_path) == []


def test_a_part_given_twice(tmp_path, files):
    code, out = run("assemble", "--unet", files["unet"], "--clip-l", files["sdxl"], "--clip-l",
                    files["sd15_clip_l"], "-o", tmp_path / "x.safetensors")
    assert code == 2 and "given twice" in one_line(out)
    assert listing(tmp_path) == []


def test_a_part_the_architecture_does_not_have(tmp_path, files):
    code, out = run("assemble", "--unet", files["sdxl_refiner"], "--clip-l", files["sdxl"],
                    "-o", tmp_path / "x.safetensors")
    assert code == 2 and "--clip-l" in one_line(out)


def test_split_of_a_file_that_is_one_part(tmp_path, files):
    code, out = run("split", files["unet"], "-o", tmp_path / "o")
    assert code == 2
    assert "already one part" in one_line(out)
    assert listing(tmp_path) == []


def test_diffusers_folder_with_a_component_missing(tmp_path, files):
    folder = tiny.save_diffusers(files["sdxl_tiny"], tmp_path / "model")
    shutil.rmtree(folder / "text_encoder_2")
    (folder / "text_encoder_2").mkdir()
    before = listing(tmp_path)
    code, out = run("convert", folder, tmp_path / "x.safetensors", "--layout", "single-file")
    assert code == 3
    line = one_line(out)
    assert "text_encoder_2" in line and "no weights" in line
    assert listing(tmp_path) == before


def test_output_folder_inside_the_input_folder(tmp_path, files):
    folder = tiny.save_diffusers(files["sdxl_tiny"], tmp_path / "model")
    before = listing(tmp_path)
    code, out = run("convert", folder, folder / "out.safetensors", "--layout", "single-file")
    assert code == 2 and "inside the input folder" in one_line(out)
    code, out = run("split", files["sdxl"], "-o", tmp_path / "model" / "parts")
    assert code == 0       # a single-file input: its folder is not an input
    shutil.rmtree(tmp_path / "model" / "parts")
    assert listing(tmp_path) == before


def test_unknown_layout_and_target_get_a_suggestion(tmp_path, files):
    code, out = run("convert", files["sdxl"], tmp_path / "o", "--layout", "difusers")
    assert code != 0 and "diffusers" in one_line(out)
    code, out = run("split", files["sdxl"], "-o", tmp_path / "o", "--for", "comfy")
    assert code != 0 and "comfyui" in out
    assert listing(tmp_path) == []


def test_lone_parts_assemble_into_the_checkpoint(tmp_path, files):
    """The reverse of the bad cases: a bare SGM UNet plus parts from the full checkpoint."""
    code, out = run("assemble", "--unet", files["unet"], "--clip-l", files["sdxl"], "--clip-g",
                    files["sdxl"], "--vae", files["sdxl"], "-o", tmp_path / "x.safetensors")
    assert code == 0, out
    from convkit.sources import open_source

    with open_source(files["sdxl"]) as a, open_source(tmp_path / "x.safetensors") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.load(k), b.load(k)), k
    assert keymap  # the names came from the key map data (imported for the reader's sake)
