"""quantize: bad input, already-quantized input, CLI."""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from click.testing import CliRunner

from convkit import tiny
from convkit.cli import main
from convkit.errors import TensorValueError, UnknownNameError, UsageError
from convkit.quantize import quantize
from convkit.sources import open_source


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="convkit-q-"))
    return tiny.save_single_file(tiny.build(arch, 0), d / f"{arch}.safetensors", torch.float32,
                                 layout="bfl" if arch.startswith("flux") else "sgm")


def test_unknown_target_suggests(tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'gguf:Q4_K_M'"):
        quantize(checkpoint("flux_dev"), tmp_path / "x.gguf", "gguf:Q4_KM")
    r = CliRunner().invoke(main, ["quantize", str(checkpoint("flux_dev")), str(tmp_path / "x"),
                                  "--to", "nf5"])
    assert r.exit_code == 2 and "did you mean 'nf4'" in r.output


def test_quanto_torchao_targets(tmp_path):
    """quanto:* and torchao:int8wo plan diffusers folders (tests/test_quantize_hf_libs.py);
    torchao:int4wo is refused up front, naming the missing CPU kernel."""
    with pytest.raises(UsageError, match="torchao:int4wo.*mslk.*compute capability"):
        quantize(checkpoint("flux_dev"), tmp_path / "x", "torchao:int4wo")
    pytest.importorskip("optimum.quanto")
    pytest.importorskip("torchao")
    for t in ("quanto:int8", "quanto:int4", "quanto:fp8", "torchao:int8wo"):
        res = quantize(checkpoint("flux_dev"), tmp_path / "x", t, dry_run=True)
        assert res.plan.fmt == "diffusers" and "config.json" in res.plan.extra_files
    assert not (tmp_path / "x").exists()


def test_nan_refused_naming_tensor(tmp_path):
    sd = st.load_file(checkpoint("flux_dev"))
    bad = "double_blocks.0.img_attn.proj.weight"
    sd[bad][3, 5] = float("nan")
    src = tmp_path / "nan.safetensors"
    st.save_file(sd, src)
    for target, out in (("gguf:Q8_0", "x.gguf"), ("nf4", "x.safetensors")):
        with pytest.raises(TensorValueError, match=bad):
            quantize(src, tmp_path / out, target)
        assert not (tmp_path / out).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["nan.safetensors"]   # no temp files left


def test_already_quantized_inputs(tmp_path):
    src = checkpoint("flux_dev")
    ref = st.load_file(src)
    q8 = tmp_path / "a.gguf"
    quantize(src, q8, "gguf:Q8_0")
    # GGUF -> NF4: dequantized first and said so
    res = quantize(q8, tmp_path / "b.safetensors", "nf4")
    assert "already" in res.plan.notes[0] or "dequantized" in res.plan.notes[0]
    # NF4 -> fp8-scaled -> GGUF: each step sees logical float weights
    res = quantize(tmp_path / "b.safetensors", tmp_path / "c.safetensors", "fp8-scaled")
    assert "bitsandbytes 4-bit" in res.plan.notes[0]
    res = quantize(tmp_path / "c.safetensors", tmp_path / "d.gguf", "gguf:F16")
    assert "scaled fp8" in res.plan.notes[0]
    with open_source(tmp_path / "d.gguf") as g:
        assert set(g.keys()) == set(ref)
        k = "double_blocks.0.img_mlp.0.weight"
        t = g.load(k)
        assert t.shape == ref[k].shape
        err = float((t - ref[k]).pow(2).mean().sqrt() / ref[k].pow(2).mean().sqrt())
        assert err < 0.15


def test_cli_dry_run_json_and_report(tmp_path):
    src = checkpoint("sdxl")
    runner = CliRunner()
    r = runner.invoke(main, ["quantize", str(src), str(tmp_path / "x.gguf"), "--to", "gguf:Q4_K",
                             "--layout", "sdcpp", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "fallback:" in r.output and "model.diffusion_model." in r.output
    assert not (tmp_path / "x.gguf").exists()
    rep = tmp_path / "rep.json"
    r = runner.invoke(main, ["quantize", str(src), str(tmp_path / "x.safetensors"), "--to",
                             "fp8-scaled", "--json", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["verified_tensors"] > 0 and d["error"]["rel_rmse"] < 0.04
    full = json.loads(rep.read_text())
    assert len(full["error"]["tensors"]) == d["error"]["quantized_tensors"]
    r = runner.invoke(main, ["quantize", str(src), str(tmp_path / "x.safetensors"), "--to", "nf4"])
    assert r.exit_code == 5 and "--overwrite" in r.output
