"""SD3 / SD3.5 as data: detection from keys and ranks only, the Large Turbo variant by hint,
configs inferred from shapes, files without text encoders (issue 12 item 1)."""
from __future__ import annotations

import pytest
import torch

from convkit import archs, configs, tiny
from convkit.inspection import inspect
from convkit.keymap._data import load_config
from convkit.models import instantiate
from convkit.sources import open_source

SD3 = ("sd3_medium", "sd35_medium", "sd35_large")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    out = {}
    for a in SD3:
        m = tiny.build(a)
        out[a] = (m, tiny.save_single_file(m, root / f"{a}.safetensors"),
                  tiny.save_single_file(m, root / f"{a}-mmdit.safetensors", layout="mmdit"))
    return out


def _detect(path):
    with open_source(path) as src:
        d = archs.detect(src)
        return d.arch.name, d.layout.name


@pytest.mark.parametrize("arch", SD3)
def test_each_sd3_is_detected_as_itself(files, arch):
    _, single, mmdit = files[arch]
    assert _detect(single) == (arch, "sd3")
    assert _detect(mmdit) == (arch, "mmdit")


def test_detection_is_unambiguous(files, tmp_path):
    """Every SD3 file matches exactly one architecture's rules (the Large Turbo variant aside,
    which detection leaves out unless hinted), and no other architecture's file matches SD3's."""
    for a in SD3:
        with open_source(files[a][1]) as src:
            matches, _ = archs.candidates(src)
            assert sorted({m[1].name for m in matches if not m[1].variant_of}) == [a]
    for other in ("sdxl", "flux_dev"):
        p = tiny.save_single_file(tiny.build(other), tmp_path / f"{other}.safetensors")
        assert _detect(p)[0] == other


def test_large_turbo_is_told_by_metadata_or_name(files, tmp_path):
    m, single, _ = files["sd35_large"]
    sd = tiny.state_dict_single_file(m)
    named = tiny.save_state_dict(sd, tmp_path / "sd3.5_large_turbo.safetensors")
    assert _detect(named) == ("sd35_large_turbo", "sd3")
    meta = tiny.save_state_dict(sd, tmp_path / "x.safetensors", {"convkit.arch": "sd35_large_turbo"})
    assert _detect(meta) == ("sd35_large_turbo", "sd3")
    assert _detect(single) == ("sd35_large", "sd3")           # no hint: the base model
    # the name's hint becomes metadata every output carries: converted and renamed, still Turbo
    from convkit.convert import convert

    convert(named, tmp_path / "out.safetensors", "fp16")
    assert _detect(tmp_path / "out.safetensors") == ("sd35_large_turbo", "sd3")


def test_file_without_text_encoders(files, tmp_path):
    """Stability's sd3.5_large.safetensors ships the MMDiT and VAE only: detected, and the
    absent text encoders are reported as such."""
    m, _, _ = files["sd35_large"]
    sd = {k: v for k, v in tiny.state_dict_single_file(m).items() if not k.startswith("text_encoders.")}
    p = tiny.save_state_dict(sd, tmp_path / "sd3.5_large.safetensors")
    r = inspect(p)
    assert (r["architecture"], r["layout"]) == ("sd35_large", "sd3")
    assert r["missing_components"] == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert set(r["components"]) == {"transformer", "vae"}


def test_released_parameter_counts():
    """formats/<arch>.toml params = the released transformer incl. its pos_embed buffer (2.085 B,
    2.470 B, 8.146 B), as inspect counts a file's tensors."""
    want = {"sd3_medium": 2_084_951_104, "sd35_medium": 2_469_663_936, "sd35_large": 8_146_280_768}
    for a, n in want.items():
        cfg = dict(load_config(a, "transformer"))
        with torch.device("meta"):
            m = instantiate(cfg.pop("_class_name"), cfg)
        total = sum(t.numel() for t in m.state_dict().values())
        assert total == n == archs.get(a).components["transformer"].params


def test_transformer_config_inferred_from_shapes():
    """A transformer whose shapes fit no known config (3 blocks, dual attention in 0-1) gets one
    inferred from its shapes that builds exactly the same model."""
    cfg = dict(tiny.spec("sd35_medium")["components"]["transformer"]["config"])
    cfg.update(num_layers=3, num_attention_heads=3, caption_projection_dim=192,
               dual_attention_layers=[0, 1], pos_embed_max_size=12)
    m = instantiate("SD3Transformer2DModel", cfg)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    r = configs.resolve("sd35_medium", "transformer", shapes)
    assert "inferred" in r.source
    assert (r.config["num_layers"], r.config["dual_attention_layers"], r.config["qk_norm"],
            r.config["pos_embed_max_size"]) == (3, [0, 1], "rms_norm", 12)


def test_sai_file_without_clip_l_projection(files, tmp_path):
    """SAI's single files leave out CLIP-L's text_projection (SD3 uses the pooled output
    unprojected): a diffusers folder made from one gets the identity the model uses, and so does
    the module convkit builds for a render."""
    import diffusers

    from convkit.convert import convert
    from convkit.loading import load_component

    m, _, _ = files["sd35_large"]
    sd = tiny.state_dict_single_file(m)
    sd.pop("text_encoders.clip_l.transformer.text_projection.weight")
    p = tiny.save_state_dict(sd, tmp_path / "sai.safetensors")
    r = convert(p, tmp_path / "folder", "fp32", layout="diffusers")
    assert any("identity" in n for n in r.plan.notes)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "folder"))
    eye = torch.eye(m.components["text_encoder"].config.hidden_size)
    assert torch.equal(pipe.text_encoder.text_projection.weight, eye)
    assert torch.equal(m.components["text_encoder"].text_projection.weight, eye)   # the tiny's
    with open_source(p) as src:
        te, _ = load_component(src, archs.detect(src), "text_encoder")
    assert torch.equal(te.text_projection.weight, eye)
