"""quantize on SD3 / SD3.5 (formats/quant/sd3.toml): GGUF in the ComfyUI-GGUF and sd.cpp layouts,
scaled fp8 and NF4 on the tiny SD3.5 Large and SD3.5 Medium (MMDiT-X) single files.

Every output is read back through convkit's logical-weights view and compared with the source:
the error of each quantized tensor is the one the quant report states, the kept tensors are
bit-exact, ``pos_embed`` stays 3-D. The tiny models are 128 wide (64 x depth, like the released
ones): their rows do not fit the 256-blocks of K-quants while mlp.fc2 (in 512) does - SD3.5
Large's 2432 vs 9728 - so gguf:Q4_K_S falls back per tensor to a legacy type and says so.
"""
from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from convkit import tiny
from convkit.quantize import quantize
from convkit.quantize.rules import GGUFTyper, block_size, gguf_fallback, rules_for
from convkit.sources import open_source
from tests.gguf_helpers import field as _field

PREFIX = "model.diffusion_model."
ARCHS = ("sd35_large", "sd35_medium")


@functools.cache
def files(arch: str) -> tuple[Path, Path]:
    """(single file, diffusers folder) of the same tiny model."""
    d = Path(tempfile.mkdtemp(prefix="convkit-qsd3-"))
    m = tiny.build(arch, 0)
    single = tiny.save_single_file(m, d / f"{arch}.safetensors")
    folder = tiny.save_diffusers(m, d / "folder") if arch == "sd35_large" else None
    return single, folder


@functools.cache
def source(arch: str) -> dict[str, torch.Tensor]:
    with open_source(files(arch)[0]) as s:
        return {k: s.load(k) for k in s.keys()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def _check_view(out: Path, res, ref: dict[str, torch.Tensor], names: dict[str, str],
                kept_as) -> dict[str, str]:
    """Read ``out`` through convkit's view: each tensor of the diffusion model (output name ->
    source key in ``names``) is either quantized, with exactly the error the report states, or
    kept: bit-exact with the source as ``kept_as(source)``. Returns {name: stored type}."""
    stated = {e.name: e for e in res.report.tensors}
    embedded = json.loads(res.report.summary_text())
    types = {}
    with open_source(out) as v:
        for name, key in names.items():
            t, src = v.load(name), ref[key]
            assert tuple(t.shape) == tuple(src.shape), name
            info = v.info(name)
            types[name] = info.stored_as or info.dtype
            if name in stated and stated[name].qtype not in ("F16", "BF16"):
                err = _rel(t, src)
                assert 0 < err <= stated[name].rel_rmse * (1 + 1e-6) + 1e-9, (name, err)
                assert abs(err - stated[name].rel_rmse) <= 1e-6 * max(err, 1e-3), (name, err)
                assert err <= embedded["max_rel_rmse"] + 1e-6
            else:
                assert torch.equal(t, kept_as(src).float()), name
    return types


def _reader_shapes(r: gguf.GGUFReader) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in r.tensors}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("target", ["Q8_0", "Q4_K_S"])
def test_gguf_comfy(tmp_path, arch, target):
    src = files(arch)[0]
    ref = source(arch)
    rules = rules_for(arch)
    out = tmp_path / "m.gguf"
    res = quantize(src, out, f"gguf:{target}", report_path=tmp_path / "r.json")
    model = {k[len(PREFIX):]: k for k in ref if k.startswith(PREFIX)}

    r = gguf.GGUFReader(out)
    assert _field(r, "general.architecture") == "sd3"
    assert not [k for k in r.fields if k.startswith("comfy.gguf.orig_shape.")]  # shape_fix False
    shapes = _reader_shapes(r)
    assert set(shapes) == set(model)                       # reference names, prefix stripped
    pe = next(t for t in r.tensors if t.name == "pos_embed")
    assert len(pe.shape) == 3 and shapes["pos_embed"] == tuple(ref[PREFIX + "pos_embed"].shape)
    assert shapes["pos_embed"][0] == 1 and pe.tensor_type.name == "F16"
    if arch == "sd35_medium":                              # MMDiT-X dual attention is quantized
        assert "joint_blocks.0.x_block.attn2.qkv.weight" in shapes

    def kept(s):          # kept: small/1-D in F32 (bit-exact), rules in F16 (the cast's bits)
        return s if s.ndim <= 1 or s.numel() <= rules.small_values else s.half()

    types = _check_view(out, res, ref, model, kept)
    want = "Q8_0" if target == "Q8_0" else "Q4_K"
    fallbacks = {i.name: i for i in res.plan.fallbacks}
    n_quant = 0
    for name, qt in types.items():
        s = ref[model[name]]
        if s.ndim <= 1 or s.numel() <= 1024:
            assert qt == "F32", name
        elif rules.kept("gguf", name):
            assert qt == "F16", name
        else:
            n_quant += 1
            assert s.ndim == 2, name
            if s.shape[-1] % block_size(want):
                # per-tensor fallback to the legacy type of the table, never F16 when it fits
                assert qt == gguf_fallback(want) != "F16" and s.shape[-1] % 32 == 0, name
                assert fallbacks[name].wanted == want and fallbacks[name].qtype == qt
                assert fallbacks[name].reason.startswith("fallback: rows of 128")
            else:
                assert qt == want and name not in fallbacks, (name, qt)
    assert n_quant >= 14
    if target == "Q4_K_S":
        # 128-wide rows fall back, mlp.fc2 (in 512) is a K-quant
        assert set(fallbacks) == {n for n, t in types.items() if t == "Q5_0"}
        assert len(fallbacks) >= 13
        assert types["joint_blocks.0.x_block.mlp.fc2.weight"] == "Q4_K"
        assert types["joint_blocks.0.x_block.attn.qkv.weight"] == "Q5_0"
        assert "F16" not in {types[n] for n in fallbacks}
        listing = res.plan.format()
        for n in fallbacks:
            assert f"fallback: {n}: Q4_K -> Q5_0" in listing
        d = json.loads((tmp_path / "r.json").read_text())
        assert {f["name"] for f in d["fallbacks"]} == set(fallbacks)
        assert all(f["wanted"] == "Q4_K" and f["used"] == "Q5_0" for f in d["fallbacks"])
        assert d["error"]["by_type"]["Q5_0"]["tensors"] == len(fallbacks)
    else:
        assert not fallbacks


def test_gguf_only_2d_quantized():
    """lcpp.patch quantizes only 2-D tensors of image models (formats/quant/sd3.toml [gguf]
    ndims): a 3-D / 4-D tensor no keep pattern names stays F16 (BF16 from BF16), saying why."""
    typer = GGUFTyper("Q8_0", rules_for("sd35_large"))
    for shape, src, want in [((1, 256, 128), "F32", "F16"), ((128, 16, 2, 2), "BF16", "BF16")]:
        d = typer.decide("joint_blocks.0.x_block.extra.weight", shape, src)
        assert d.qtype == want and "2-D tensors only" in d.reason
    assert typer.decide("joint_blocks.0.x_block.extra.weight", (256, 128), "F32").qtype == "Q8_0"


def test_gguf_sdcpp(tmp_path):
    """stable-diffusion.cpp: reference names under model.diffusion_model., no
    general.architecture, its keep list (embedders, pos_embed, final_layer, biases)."""
    arch = "sd35_large"
    ref = source(arch)
    rules = rules_for(arch)
    out = tmp_path / "m.gguf"
    res = quantize(files(arch)[0], out, "gguf:Q8_0", layout="sdcpp")
    r = gguf.GGUFReader(out)
    assert r.get_field("general.architecture") is None
    shapes = _reader_shapes(r)
    model = {k: k for k in ref if k.startswith(PREFIX)}
    assert set(shapes) == set(model)
    assert shapes[PREFIX + "pos_embed"] == tuple(ref[PREFIX + "pos_embed"].shape)
    assert len(next(t for t in r.tensors if t.name == PREFIX + "pos_embed").shape) == 3
    types = _check_view(out, res, ref, model,
                        lambda s: s if s.ndim <= 1 or s.numel() <= 1024 else s.half())
    for name, qt in types.items():
        rel = name[len(PREFIX):]
        if rules.kept("sdcpp", rel) or ref[name].ndim <= 1:
            assert qt in ("F16", "F32"), name
        else:
            assert qt == "Q8_0", name
    assert types[PREFIX + "context_embedder.weight"] == "F16"
    assert types[PREFIX + "joint_blocks.1.x_block.mlp.fc1.weight"] == "Q8_0"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("target", ["fp8-scaled", "nf4"])
def test_fp8_scaled_nf4(tmp_path, arch, target):
    ref = source(arch)
    rules = rules_for(arch)
    out = tmp_path / "m.safetensors"
    res = quantize(files(arch)[0], out, target)
    with safe_open(out, "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    section = "fp8" if target == "fp8-scaled" else "nf4"
    expect = set()
    for k, t in ref.items():
        rel = k[len(PREFIX):]
        if (k.startswith(PREFIX) and k.endswith(".weight") and t.ndim == 2
                and t.numel() > rules.small_values and not rules.kept(section, rel)):
            expect.add(k)
    assert {e.name for e in res.report.tensors} == expect
    assert len(expect) >= 14
    for k in ("x_embedder.proj.weight", "pos_embed", "context_embedder.weight",
              "final_layer.linear.weight", "y_embedder.mlp.0.weight"):
        assert PREFIX + k not in expect and stored[PREFIX + k] == "F32", k
    if target == "fp8-scaled":
        assert stored[PREFIX + "scaled_fp8"] == "F8_E4M3"
        assert all(stored[k] == "F8_E4M3" and k[:-6] + "scale_weight" in stored for k in expect)
    else:
        assert all(stored[k] == "U8" and k + ".quant_state.bitsandbytes__nf4" in stored
                   for k in expect)
    # the whole file (text encoders and VAE too) through the view: kept tensors bit-exact
    _check_view(out, res, ref, {k: k for k in ref}, lambda s: s)


@pytest.mark.parametrize("input_kind", ["folder", "transformer-file"])
def test_diffusers_input_same_bytes(tmp_path, input_kind):
    """A diffusers folder, or its diffusers-named transformer file, is mapped to reference names
    through the key map (qkv fused, the swapped adaLN halves) and quantizes to the same tensors
    as the single file: not refused."""
    single, folder = files("sd35_large")
    inp = folder if input_kind == "folder" else \
        folder / "transformer" / "diffusion_pytorch_model.safetensors"
    a = quantize(inp, tmp_path / "a.gguf", "gguf:Q4_K_S")
    quantize(single, tmp_path / "b.gguf", "gguf:Q4_K_S")
    assert "mapped to single-file names" in a.plan.notes[0]
    ta, tb = gguf.GGUFReader(tmp_path / "a.gguf"), gguf.GGUFReader(tmp_path / "b.gguf")
    da = {t.name: (t.tensor_type.name, tuple(t.shape.tolist()), np.asarray(t.data).tobytes())
          for t in ta.tensors}
    db = {t.name: (t.tensor_type.name, tuple(t.shape.tolist()), np.asarray(t.data).tobytes())
          for t in tb.tensors}
    assert da == db
    assert "joint_blocks.1.context_block.adaLN_modulation.1.weight" in da
    assert len(a.plan.fallbacks) >= 13
    assert _field(ta, "convkit.quant_report") == _field(tb, "convkit.quant_report")
    assert math.isclose(json.loads(_field(ta, "convkit.quant_report"))["rel_rmse"],
                        a.report.summary()["rel_rmse"])
