"""GGUF outputs: ComfyUI-GGUF and stable-diffusion.cpp layouts, key by key, and error bounds."""
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

from convkit import tiny
from convkit.errors import UsageError
from convkit.quantize import quantize
from convkit.quantize.gguf_out import gguf_header
from convkit.quantize.rules import GGUFTyper, TypeRule, rules_for
from convkit.sources import open_source
from tests.gguf_helpers import field as _field

# relative RMSE bounds per GGML type on the tiny models' randn*0.02 weights
BOUND = {"F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.05,
         "Q5_1": 0.05, "Q5_0": 0.06, "Q4_K": 0.1, "Q4_1": 0.1, "Q4_0": 0.12, "Q3_K": 0.2,
         "Q2_K": 0.4}


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="convkit-q-"))
    return tiny.save_single_file(tiny.build(arch, 0), d / f"{arch}.safetensors", torch.float32,
                                 layout="bfl" if arch.startswith("flux") else "sgm")


def _source_model(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    with open_source(path) as s:
        return {k[len(prefix):]: s.load(k) for k in s.keys() if k.startswith(prefix)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("arch,target", [("sdxl", "Q8_0"), ("sdxl", "Q4_K_M"), ("sd15", "F16"),
                                         ("sd15", "Q3_K_S"), ("flux_dev", "Q5_K_S"),
                                         ("flux_schnell", "Q2_K")])
def test_comfy_layout(tmp_path, arch, target):
    src = checkpoint(arch)
    out = tmp_path / "m.gguf"
    res = quantize(src, out, f"gguf:{target}")
    unet = arch.startswith("sd")
    prefix = "model.diffusion_model." if unet else ""
    ref = _source_model(src, prefix)
    rules = rules_for(arch)
    r = gguf.GGUFReader(out)
    assert _field(r, "general.architecture") == {"sdxl": "sdxl", "sd15": "sd1"}.get(arch, "flux")
    assert _field(r, "general.quantization_version") == 2
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType[
        {"Q8_0": "MOSTLY_Q8_0", "Q4_K_M": "MOSTLY_Q4_K_M", "F16": "MOSTLY_F16",
         "Q3_K_S": "MOSTLY_Q3_K_S", "Q5_K_S": "MOSTLY_Q5_K_S", "Q2_K": "MOSTLY_Q2_K"}[target]])
    summary = json.loads(_field(r, "convkit.quant_report").strip())
    assert summary["quantized_tensors"] == len(res.report.tensors)
    stored = {t.name: t for t in r.tensors}
    assert set(stored) == set(ref)                      # diffusion model only, prefix stripped
    fallbacks = {i.name for i in res.plan.fallbacks}
    for name, t in stored.items():
        assert len(name) <= 127
        shape = tuple(ref[name].shape)
        n = math.prod(shape)
        qt = t.tensor_type.name
        sshape = tuple(int(d) for d in reversed(t.shape.tolist()))
        orig = _field(r, f"comfy.gguf.orig_shape.{name}")
        if unet and len(shape) > 1 and n >= 512 and n % 256 == 0 and shape[-1] % 256:
            assert sshape == (n // 256, 256) and tuple(orig) == shape, name
            f = r.get_field(f"comfy.gguf.orig_shape.{name}")
            assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
        else:
            assert orig is None and sshape == shape, name
        if len(shape) <= 1 or n <= 1024:
            assert qt == "F32", name
        elif rules.kept("gguf", name):
            assert qt in ("F16", "BF16"), name
        elif name not in fallbacks:
            expect = {"Q4_K_M": ("Q4_K", "Q5_K", "Q6_K"), "Q3_K_S": ("Q3_K",),
                      "Q5_K_S": ("Q5_K",)}.get(target, (target,))
            assert qt in expect, (name, qt)
        if qt not in ("F32", "F16", "BF16"):
            assert sshape[-1] % gguf.GGML_QUANT_SIZES[t.tensor_type][0] == 0
    # reopened through convkit's GGUF source: logical shapes restored, error within bounds
    with open_source(out) as g:
        assert g.metadata["general.architecture"]
        for name in ref:
            t = g.load(name)
            assert tuple(t.shape) == tuple(ref[name].shape)
            qt = g.info(name).stored_as
            err = _rel(t, ref[name])
            assert err <= BOUND[qt] + 1e-7, (name, qt, err)
    for i in res.plan.fallbacks:
        assert i.reason.startswith("fallback:") and i.wanted and i.qtype != i.wanted


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_sdcpp_layout(tmp_path, arch):
    """What sd.cpp's own `-M convert` writes: ONE file, every tensor under its checkpoint name
    (sd.cpp tells SD1 / SDXL apart by the text encoders in the model file, get_sd_version),
    the UNet with sd.cpp's keep rules, never rearranged; text encoders and VAE F16 / F32."""
    from gguf.quants import dequantize

    src = checkpoint(arch)
    out = tmp_path / "m.gguf"
    res = quantize(src, out, "gguf:Q8_0", layout="sdcpp", extras_dir=tmp_path / "x",
                   extras_format="gguf")
    ref = _source_model(src, "")
    buffers = {k for k in ref if k.endswith(("position_ids", "logit_scale"))}
    r = gguf.GGUFReader(out)
    assert r.get_field("general.architecture") is None
    assert not [k for k in r.fields if k.startswith("comfy.gguf.orig_shape.")]
    assert {t.name for t in r.tensors} == set(ref) - buffers
    probe = ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
             if arch == "sdxl" else
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    assert probe in {t.name for t in r.tensors}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        assert shape == tuple(ref[t.name].shape)          # never rearranged
        kind = t.tensor_type.name
        if t.name.endswith(".bias") or len(shape) == 1:
            assert kind == "F32"
        if not t.name.startswith("model.diffusion_model."):
            assert kind in ("F16", "F32")
        if "time_embed." in t.name or "label_emb." in t.name:
            assert kind in ("F32", "F16")
        if kind == "Q8_0":
            assert shape[-1] % 32 == 0
        got = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(shape)
        assert _rel(got, ref[t.name]) <= BOUND[kind] + 1e-7, t.name
    assert not res.extras and any("already in m.gguf" in n for n in res.plan.notes)


def test_type_rule_and_extras(tmp_path):
    src = checkpoint("sdxl")
    out = tmp_path / "m.gguf"
    res = quantize(src, out, "gguf:Q4_K_S", type_rules=[r"ff\.net\.0\.proj\.weight$=Q8_0"],
                   extras_dir=tmp_path / "extras")
    r = gguf.GGUFReader(out)
    hits = [t for t in r.tensors if t.name.endswith("ff.net.0.proj.weight")]
    assert hits and all(t.tensor_type.name == "Q8_0" for t in hits)
    assert sorted(Path(p).name for p in res.extras) == [
        "m.text_encoder.safetensors", "m.text_encoder_2.safetensors", "m.vae.safetensors"]
    with open_source(tmp_path / "extras" / "m.vae.safetensors") as v:
        assert "decoder.conv_out.weight" in v.keys()


def test_mix_rules():
    rules = rules_for("sdxl")
    names = [f"output_blocks.{i}.1.transformer_blocks.0.attn1.to_v.weight" for i in range(6)]
    ffn = "output_blocks.0.1.transformer_blocks.0.ff.net.2.weight"
    q = "output_blocks.0.1.transformer_blocks.0.attn1.to_q.weight"
    s = GGUFTyper("Q4_K_S", rules)
    got = [s.decide(n, (640, 640), "F32").qtype for n in names]
    assert got == ["Q5_K"] * 4 + ["Q4_K"] * 2
    assert s.decide(ffn, (640, 2560), "F32").qtype == "Q5_K"
    m = GGUFTyper("Q4_K_M", rules)
    assert m.decide(names[0], (640, 640), "F32").qtype == "Q6_K"
    assert m.decide(ffn, (640, 2560), "F32").qtype == "Q6_K"
    assert m.decide(q, (640, 640), "F32").qtype == "Q4_K"
    m3 = GGUFTyper("Q3_K_M", rules)
    assert [m3.decide(n, (640, 640), "F32").qtype for n in names[:3]] == ["Q5_K", "Q5_K", "Q4_K"]
    f = GGUFTyper("Q4_K_M", rules_for("flux_dev"))
    assert f.decide("double_blocks.0.img_attn.qkv.weight", (9216, 3072), "BF16").qtype == "Q5_K"
    assert f.decide("img_in.weight", (3072, 64), "BF16").qtype == "BF16"
    # rows of 320 do not fit K blocks of 256 -> stated fallback (sdcpp: no rearrangement)
    sd = GGUFTyper("Q4_K", rules, layout="sdcpp")
    d = sd.decide("input_blocks.1.1.proj_in.weight", (320, 320), "F32")
    assert (d.qtype, d.wanted) == ("Q5_0", "Q4_K") and "fallback" in d.reason
    c = GGUFTyper("Q4_K", rules)   # comfy layout rearranges it into rows of 256 instead
    d = c.decide("input_blocks.1.1.proj_in.weight", (320, 320), "F32")
    assert (d.qtype, d.stored_shape, d.orig_shape) == ("Q4_K", (400, 256), (320, 320))
    tr = GGUFTyper("Q4_K", rules, type_rules=[TypeRule.parse("proj_in=Q8_0")])
    assert tr.decide("input_blocks.1.1.proj_in.weight", (320, 320), "F32").qtype == "Q8_0"


def test_name_limit(tmp_path):
    with pytest.raises(UsageError, match="127"):
        gguf_header([], [("a" * 128, "F32", (4,))])


def test_gguf_matches_kernels_bytes(tmp_path):
    """Stored blocks are exactly convkit.kernels' output for the (rearranged) rows."""
    from convkit import kernels

    src = checkpoint("sd15")
    out = tmp_path / "m.gguf"
    quantize(src, out, "gguf:Q4_K")
    ref = _source_model(src, "model.diffusion_model.")
    r = gguf.GGUFReader(out)
    checked = 0
    for t in r.tensors:
        if t.tensor_type.name == "Q4_K":
            x = ref[t.name].float().numpy().reshape(-1, 256)
            assert np.array_equal(np.asarray(t.data).reshape(-1), kernels.quantize(x, "Q4_K").reshape(-1))
            checked += 1
    assert checked > 10


@functools.lru_cache(maxsize=None)
def wide_sdxl() -> Path:
    """A tiny SDXL (real classes) whose UNet widths (32/64/128, cross-attn 80) make every
    quantizable tensor's value count a multiple of 256: the K-quants are really used (directly
    or through the comfy rows-of-256 rearrangement), not their fallbacks."""
    import copy

    from convkit.models import instantiate

    s = copy.deepcopy(tiny.spec("sdxl"))
    s["components"]["unet"]["config"].update(block_out_channels=[32, 64, 128],
                                             attention_head_dim=[2, 4, 8])
    comps = {}
    for i, (name, c) in enumerate(s["components"].items()):
        m = instantiate(c["class"], c["config"])
        tiny._reinit(m, i)
        comps[name] = m.eval()
    d = Path(tempfile.mkdtemp(prefix="convkit-q-wide-"))
    return tiny.save_single_file(tiny.TinyModel("sdxl", comps, s["pipeline"], s),
                                 d / "sdxl_wide.safetensors", torch.float32, layout="sgm")


@pytest.mark.parametrize("target,types", [("gguf:Q4_K_S", {"Q4_K", "Q5_K"}),
                                          ("gguf:Q3_K_M", {"Q3_K", "Q4_K", "Q5_K"}),
                                          ("gguf:Q6_K", {"Q6_K"})])
def test_kquants_through_the_whole_pipeline(tmp_path, target, types):
    """No fallbacks; every block is kernels' bytes for the source rows; shapes restored; errors
    within the per-type bounds; the report matches a recomputation from the file."""
    from convkit import kernels

    src = wide_sdxl()
    out = tmp_path / "m.gguf"
    res = quantize(src, out, target)
    assert not res.plan.fallbacks
    assert types <= set(res.plan.counts())
    ref = _source_model(src, "model.diffusion_model.")
    r = gguf.GGUFReader(out)
    seen = set()
    by_name = {e.name: e for e in res.report.tensors}
    for t in r.tensors:
        q = t.tensor_type.name
        if q not in types:
            continue
        seen.add(q)
        x = ref[t.name].float().numpy().reshape(-1, 256)
        data = np.asarray(t.data).reshape(x.shape[0], -1)
        assert np.array_equal(data, kernels.quantize(x, q)), t.name
        deq = kernels.dequantize(data, q, 256)
        rel = float(np.sqrt(np.mean((deq - x) ** 2) / np.mean(x ** 2)))
        assert rel < BOUND[q], (t.name, rel)
        assert by_name[t.name].rel_rmse == pytest.approx(rel, rel=1e-3)
        shape = _field(r, "comfy.gguf.orig_shape." + t.name)
        stored = tuple(int(d) for d in reversed(t.shape.tolist()))
        assert (tuple(shape) if shape is not None else stored) == tuple(ref[t.name].shape)
    assert seen == types
