"""FP8 (plain, ComfyUI scaled: scale_weight and comfy_quant) and NF4/FP4 in Forge's layout."""
from __future__ import annotations

import functools
import json

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from convkit import tiny
from convkit.quantize import fp8, nf4, quantize
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
            w_ref, s_ref = fp8.scaled(t, "F8_E4M3")     # the reference formula, same bytes
            assert torch.equal(w8.view(torch.uint8), w_ref.view(torch.uint8)), k
            assert torch.equal(s, s_ref), k
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


# --- the fast paths (numba kernels, chunks on threads) against the libraries' own results ------

def _bnb_cases():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(64 * 10 + 5, generator=g)
    z[64:128] = 0.0
    z[-5:] = 0.0
    tiny_vals = torch.randn(4096, generator=g)
    tiny_vals[::7] = 1e-30
    return [torch.randn(320, 40, generator=g) * 0.02, torch.randn(7, generator=g) * 3,
            torch.randn(1, 129, generator=g), torch.zeros(64, 3), z, tiny_vals,
            torch.randn(300, 1000, generator=g) * 0.02,
            (torch.randn(77, 333, generator=g)).half(), torch.randn(64, 64, generator=g).bfloat16()]


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
def test_bnb4_fast_path_is_byte_identical(qt, double, monkeypatch):
    """quantize_measured (numba, chunked, 2 threads) == bitsandbytes' quantize_4bit, byte for
    byte, incl. tail blocks, odd lengths, all-zero blocks, fp16/bf16 input, double quant."""
    import bitsandbytes.functional as F

    from convkit.quantize import fastops

    monkeypatch.setattr(fastops, "CHUNK_VALUES", 4096)   # several chunks per tensor
    for t in _bnb_cases():
        outs, sums = nf4.quantize_measured("w", t, qt, double, nthreads=2)
        q, qs = F.quantize_4bit(t.reshape(1, -1), blocksize=64, quant_type=qt,
                                compress_statistics=double)
        qs.shape = torch.Size(t.shape)
        theirs = qs.as_dict(packed=True)
        assert torch.equal(outs["w"].reshape(-1), q.reshape(-1)), tuple(t.shape)
        for k, v in theirs.items():
            if "quant_state" in k:
                mine = json.loads(bytes(outs["w." + k].tolist()))
                assert mine == json.loads(bytes(v.tolist()))
            else:
                assert torch.equal(outs["w." + k], v), (k, tuple(t.shape))
        deq = F.dequantize_4bit(q, qs).float().reshape(-1)
        src = t.float().reshape(-1)
        if src.abs().max() > 0 and t.dtype == torch.float32:
            assert sums.rel_rmse() == pytest.approx(_rel(deq, src), rel=1e-4)


@pytest.mark.parametrize("qtype", ["F8_E4M3", "F8_E5M2"])
def test_fp8_fast_path_is_byte_identical(qtype, monkeypatch):
    from convkit.quantize import fastops, fp8

    monkeypatch.setattr(fastops, "CHUNK_VALUES", 1000)
    g = torch.Generator().manual_seed(5)
    for t in [torch.randn(300, 70, generator=g) * 0.02, torch.randn(100, 7, generator=g) * 1000,
              torch.randn(3, generator=g).half() * 100, torch.zeros(10),
              torch.randn(33, 65, generator=g).bfloat16()]:
        w, _, over, bad, sums = fp8.quantize_measured(t, qtype, False, nthreads=2)
        w0, over0 = fp8.cast(t, qtype)
        assert torch.equal(w.view(torch.uint8), w0.view(torch.uint8)) and over == over0
        assert bad == 0 and sums.n == t.numel()
        w1, s1, _, _, sums1 = fp8.quantize_measured(t, qtype, True, nthreads=2)
        w2, s2 = fp8.scaled(t, qtype)
        assert torch.equal(w1.view(torch.uint8), w2.view(torch.uint8)) and torch.equal(s1, s2)
        if t.abs().max() > 0:
            assert sums1.rel_rmse() == pytest.approx(_rel(fp8.dequant(w2, s2), t), rel=1e-3)
    t = torch.randn(50)
    t[7] = float("nan")
    assert fp8.quantize_measured(t, qtype, False)[3] == 1


@pytest.mark.parametrize("target", ["nf4", "fp8-scaled", "gguf:Q4_K_M"])
def test_thread_count_does_not_change_the_file(tmp_path, target, monkeypatch):
    """1 thread or 2, many small chunks: the same bytes (report included)."""
    from convkit.quantize import fastops

    monkeypatch.setattr(fastops, "CHUNK_VALUES", 2048)
    src = checkpoint("sdxl")
    ext = "gguf" if target.startswith("gguf") else "safetensors"
    files = []
    for n in ("1", "2"):
        monkeypatch.setenv("CONVKIT_THREADS", n)
        out = tmp_path / f"m{n}.{ext}"
        quantize(src, out, target)
        files.append(out.read_bytes())
    assert files[0] == files[1]


@pytest.mark.parametrize("target", ["fp8-e4m3fn", "nf4", "gguf:Q8_0", "gguf:Q4_K_M"])
def test_chunking_and_workers_do_not_change_the_file(tmp_path, target, monkeypatch):
    """The engine cuts tensors into chunk tasks run by several workers in any order: tiny
    chunks (many per tensor) and one worker or four give the same bytes, report included."""
    from convkit.engine import executor

    src = checkpoint("sdxl")
    ext = "gguf" if target.startswith("gguf") else "safetensors"
    quantize(src, tmp_path / f"a.{ext}", target)
    monkeypatch.setattr(executor, "CHUNK_BYTES", 4096)
    monkeypatch.setenv("CONVKIT_THREADS", "4")
    quantize(src, tmp_path / f"b.{ext}", target)
    monkeypatch.setenv("CONVKIT_THREADS", "1")
    quantize(src, tmp_path / f"c.{ext}", target)
    a = (tmp_path / f"a.{ext}").read_bytes()
    assert a == (tmp_path / f"b.{ext}").read_bytes() == (tmp_path / f"c.{ext}").read_bytes()


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_nf4_keeps_the_shapes_forge_detection_reads(tmp_path, arch):
    """Forge (huggingface_guess detection.py detect_unet_config) reads context_dim = shape[1] of
    every '<block>.1.transformer_blocks.0.attn2.to_k.weight' and, for SDXL, adm_in_channels =
    shape[1] of 'label_emb.0.0.weight' before it loads anything; packed 4-bit they read as 1 and
    no model matches. They must keep their shapes; every other large Linear weight is 4-bit."""
    import re

    src = checkpoint(arch)
    out = tmp_path / "m.safetensors"
    quantize(src, out, "nf4")
    ref, got = _load(src), _load(out)
    probes = [k for k in ref if re.search(r"\.1\.transformer_blocks\.0\.attn2\.to_k\.weight$", k)]
    if arch == "sdxl":
        probes.append(UNET + "label_emb.0.0.weight")
    assert len(probes) >= 2
    for k in probes:
        assert got[k].shape == ref[k].shape and torch.equal(got[k], ref[k]), k
    big = [k for k in ref if k.startswith(UNET) and k.endswith(".weight") and ref[k].ndim == 2
           and ref[k].numel() > 1024 and k not in probes]
    assert big and all(got[k].dtype == torch.uint8 for k in big)
