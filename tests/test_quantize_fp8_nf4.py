"""FP8 (plain, ComfyUI scaled: scale_weight and comfy_quant) and NF4/FP4 in Forge's layout."""
from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from convkit import tiny
from convkit.quantize import nf4, quantize
from convkit.quantize.rules import rules_for

UNET = "model.diffusion_model."


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str, dtype: torch.dtype = torch.float32) -> Path:
    d = Path(tempfile.mkdtemp(prefix="convkit-q-"))
    return tiny.save_single_file(tiny.build(arch, 0), d / f"{arch}.safetensors", dtype,
                                 layout="bfl" if arch.startswith("flux") else "sgm")


def _load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _meta(path: Path) -> dict:
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def _rel(a, b) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def _eligible(name: str, t: torch.Tensor, arch: str, section: str, ndims) -> bool:
    rules = rules_for(arch)
    rel = name[len(UNET):] if name.startswith(UNET) else name
    return (name.endswith(".weight") and t.ndim in ndims and t.numel() > rules.small_values
            and not rules.kept(section, rel))


@pytest.mark.parametrize("target,dt,bound", [("fp8-e4m3fn", torch.float8_e4m3fn, 0.06),
                                             ("fp8-e5m2", torch.float8_e5m2, 0.12)])
def test_fp8_plain(tmp_path, target, dt, bound):
    src = checkpoint("sdxl")
    out = tmp_path / "m.safetensors"
    res = quantize(src, out, target)
    ref, got = _load(src), _load(out)
    assert set(got) == set(ref)
    n = 0
    for k, t in ref.items():
        if k.startswith(UNET) and _eligible(k, t, "sdxl", "fp8", (2, 4)):
            assert got[k].dtype == dt, k
            assert _rel(got[k], t) < bound, k
            n += 1
        else:
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k   # untouched
    assert n == len(res.report.tensors) > 50
    rep = json.loads(_meta(out)["convkit.quant_report"])
    assert rep["quantized_tensors"] == n and rep["rel_rmse"] < bound


@pytest.mark.parametrize("fmt", ["scale_weight", "comfy_quant"])
def test_fp8_scaled(tmp_path, fmt):
    src = checkpoint("flux_dev", torch.bfloat16)
    out = tmp_path / "m.safetensors"
    quantize(src, out, "fp8-scaled", scaled_format=fmt)
    ref, got = _load(src), _load(out)
    scale_key = "scale_weight" if fmt == "scale_weight" else "weight_scale"
    if fmt == "scale_weight":
        assert got["scaled_fp8"].dtype == torch.float8_e4m3fn and got["scaled_fp8"].numel() == 2
    else:
        assert "scaled_fp8" not in got
    n = 0
    for k, t in ref.items():
        layer = k[: -len("weight")]
        if _eligible(k, t, "flux_dev", "fp8", (2,)):
            w8, s = got[k], got[layer + scale_key]
            assert w8.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == ()
            # absmax maps to 448
            assert abs(float(w8.float().abs().max()) - 448.0) < 1e-3
            assert _rel(w8.float() * s, t) < 0.04, k
            if fmt == "comfy_quant":
                conf = json.loads(bytes(got[layer + "comfy_quant"].tolist()))
                assert conf == {"format": "float8_e4m3fn"}
            n += 1
        else:
            assert torch.equal(got[k], t) and layer + scale_key not in got, k
    assert n >= 20
    extra = {k for k in got if k not in ref}
    per = 1 if fmt == "scale_weight" else 2
    assert len(extra) == n * per + (fmt == "scale_weight")


@pytest.mark.parametrize("arch,qt,double", [("flux_dev", "nf4", False), ("sdxl", "nf4", True),
                                            ("flux_schnell", "fp4", False)])
def test_bnb4_forge_layout(tmp_path, arch, qt, double):
    import bitsandbytes.functional as F

    src = checkpoint(arch)
    out = tmp_path / "m.safetensors"
    quantize(src, out, qt, double_quant=double)
    ref, got = _load(src), _load(out)
    bound = 0.12 if qt == "nf4" else 0.2
    n = 0
    prefix = UNET if arch.startswith("sd") else ""
    for k, t in ref.items():
        if not (k.startswith(prefix) and _eligible(k, t, arch, "nf4", (2,))):
            assert torch.equal(got[k], t), k
            continue
        n += 1
        keys = {x[len(k) + 1:] for x in got if x.startswith(k + ".")}
        want = {"absmax", "quant_map", f"quant_state.bitsandbytes__{qt}"}
        if double:
            want |= {"nested_absmax", "nested_quant_map"}
        assert keys == want, k
        assert got[k].dtype == torch.uint8 and got[k].shape == ((t.numel() + 1) // 2, 1)
        assert got[k + ".absmax"].dtype == (torch.uint8 if double else torch.float32)
        state = json.loads(bytes(got[f"{k}.quant_state.bitsandbytes__{qt}"].tolist()))
        assert state["shape"] == list(t.shape) and state["blocksize"] == 64
        assert state["quant_type"] == qt and state["dtype"] == "float32"
        # as Forge loads it: QuantState.from_dict over the '.weight.' keys
        sd = {x: got[k + "." + x] for x in keys}
        qs = F.QuantState.from_dict(sd, device=torch.device("cpu"))
        assert tuple(qs.shape) == tuple(t.shape) and qs.blocksize == 64
        deq = nf4.dequantize(k, {k: got[k], **{k + "." + x: v for x, v in sd.items()}})
        assert _rel(deq, t) < bound, k
    assert n >= 20


def test_nf4_state_matches_bitsandbytes():
    """Our packed state is byte-identical to bitsandbytes' own as_dict(packed=True)."""
    import bitsandbytes.functional as F

    t = torch.randn(320, 40) * 0.02          # last dim not a multiple of 64: flattened path
    outs, deq = nf4.quantize("w", t, "nf4", False)
    q, qs = F.quantize_4bit(t.reshape(1, -1), blocksize=64, quant_type="nf4",
                            compress_statistics=False)
    qs.shape = torch.Size(t.shape)
    theirs = qs.as_dict(packed=True)
    assert bytes(outs["w.quant_state.bitsandbytes__nf4"].tolist()) == \
        bytes(theirs["quant_state.bitsandbytes__nf4"].tolist())
    assert torch.equal(outs["w.absmax"], theirs["absmax"])
    assert torch.equal(outs["w"].reshape(-1), q.reshape(-1))
    # dequantizing flattened agrees with the in-memory result and stays accurate
    again = nf4.dequantize("w", outs)
    assert torch.equal(again, deq) and _rel(deq, t) < 0.12
