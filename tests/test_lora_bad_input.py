"""LoRA bad input: wrong architecture, rank mismatch, NaN, missing alpha, odd weight, quantized base."""
from __future__ import annotations

import json

import pytest
import safetensors.torch as st
import torch
from click.testing import CliRunner

from convkit import tiny
from convkit.cli import main
from convkit.errors import ConvkitError, TensorValueError, UsageError
from convkit.lora import UnmatchedLoraError, merge_lora




N = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def lora(path, **extra):
    sd = {N + ".lora_down.weight": torch.randn(2, 32) * 0.1, N + ".lora_up.weight": torch.randn(32, 2) * 0.1}
    sd.update(extra)
    st.save_file(sd, path)
    return path


def test_sd15_lora_on_sdxl_is_refused_and_named(sdxl, tmp_path):  # noqa: F811
    _, single, _, _ = sdxl
    m = tiny.build("sd15", 0)
    sd = {}
    for name, mod in m.components["unet"].named_modules():
        if isinstance(mod, torch.nn.Linear) and ".attn" in name:
            k = "lora_unet_" + name.replace(".", "_")
            sd |= {k + ".lora_down.weight": torch.zeros(1, mod.weight.shape[1]),
                   k + ".lora_up.weight": torch.zeros(mod.weight.shape[0], 1)}
    st.save_file(sd, tmp_path / "sd15.safetensors")
    with pytest.raises(ConvkitError, match="for sd15"):
        merge_lora(single, [tmp_path / "sd15.safetensors"], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_rank_mismatch_nan_and_unmatched(sdxl, tmp_path):  # noqa: F811
    _, single, _, _ = sdxl
    bad = {N + ".lora_down.weight": torch.randn(3, 32), N + ".lora_up.weight": torch.randn(32, 2)}
    st.save_file(bad, tmp_path / "rank.safetensors")
    with pytest.raises(ValueError, match="rank mismatch"):
        merge_lora(single, [tmp_path / "rank.safetensors"], tmp_path / "o.safetensors")
    down = torch.randn(2, 32)
    down[0, 0] = float("nan")
    st.save_file({N + ".lora_down.weight": down, N + ".lora_up.weight": torch.randn(32, 2)},
                 tmp_path / "nan.safetensors")
    with pytest.raises(TensorValueError, match="NaN"):
        merge_lora(single, [tmp_path / "nan.safetensors"], tmp_path / "o.safetensors")
    extra = {"lora_unet_no_such_module.lora_down.weight": torch.zeros(2, 4),
             "lora_unet_no_such_module.lora_up.weight": torch.zeros(4, 2)}
    p = lora(tmp_path / "unm.safetensors", **extra)
    with pytest.raises(UnmatchedLoraError, match="lora_unet_no_such_module"):
        merge_lora(single, [p], tmp_path / "o.safetensors")
    r = merge_lora(single, [p], tmp_path / "o.safetensors", allow_unmatched=True)
    assert r.loras[0].modules == 1 and r.loras[0].unmatched == ["lora_unet_no_such_module"]


def test_missing_alpha_and_odd_weight_are_said(sdxl, tmp_path):  # noqa: F811
    _, single, _, _ = sdxl
    p = lora(tmp_path / "l.safetensors")
    r = merge_lora(single, [f"{p}:5"], tmp_path / "o.safetensors")
    text = " ".join(r.notes)
    assert "no alpha" in text and "outside the usual range" in text


def test_quantized_base_refused(sdxl, tmp_path):  # noqa: F811
    _, single, _, _ = sdxl
    sd = st.load_file(single)
    f8 = {k: (v.to(torch.float8_e4m3fn) if v.is_floating_point() else v) for k, v in sd.items()}
    st.save_file(f8, tmp_path / "f8.safetensors")
    p = lora(tmp_path / "l.safetensors")
    with pytest.raises(UsageError, match="quantized"):
        merge_lora(tmp_path / "f8.safetensors", [p], tmp_path / "o.safetensors")
    r = merge_lora(tmp_path / "f8.safetensors", [p], tmp_path / "o.safetensors", dtype="bf16")
    assert r.loras[0].modules == 1


def test_cli_merge_json_and_error_line(sdxl, tmp_path):  # noqa: F811
    _, single, _, _ = sdxl
    p = lora(tmp_path / "l.safetensors", **{N + ".alpha": torch.tensor(2.0)})
    res = CliRunner().invoke(main, ["merge-lora", str(single), f"{p}:0.5", "-o",
                                    str(tmp_path / "o.safetensors"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["loras"][0]["modules"] == 1 and d["merged_tensors"] == 1
    res = CliRunner().invoke(main, ["merge-lora", str(single), str(single), "-o",
                                    str(tmp_path / "x.safetensors")])
    assert res.exit_code != 0 and "convkit: error:" in res.output and "LoRA" in res.output
