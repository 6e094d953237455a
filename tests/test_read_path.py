"""One read path: every command reads every encoding through the logical-weights view.

* The six findings of issue 8, each as a regression test (they fail on session 2's main).
* The matrix: every input encoding convkit reads (fp8 plain both types, scaled fp8 in both
  ComfyUI forms, NF4, FP4, NF4 double-quant, GGUF F16/Q8_0/Q5_1/Q4_0/Q6_K/Q5_K/Q4_K/Q3_K/Q2_K
  in the ComfyUI-GGUF and sd.cpp layouts, a quanto int8 folder, a diffusers folder) x
  {convert --dtype fp32, merge-lora --dtype fp32, extract-lora against the fp32 base, quantize
  --to gguf:Q8_0}. Asserted on logical tensors read back through convkit's own view: the
  output equals what the same step gives on the input's decoded fp32 values (bit for bit), the
  decoded input is within the input encoding's own error bound (the quant report it carries),
  no auxiliary tensor appears in a float output, and the metadata names no storage format the
  file does not have.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

from convkit import tiny
from convkit.convert import convert
from convkit.lora import extract_lora, merge_lora
from convkit.quantize import quantize
from convkit.sources import open_raw, open_source
from tests.lora_helpers import kohya_diffusers_paths, random_factors

AUX = (".scale_weight", ".weight_scale", ".comfy_quant", "scaled_fp8", ".absmax", ".quant_map",
       ".nested_absmax", ".nested_quant_map", "quant_state.", "._data", "._scale", "._shift",
       ".input_scale", ".output_scale", ".scale_input", ".SCB", "_weight_qdata", "_weight_scale")
STORAGE_META = ("convkit.quantization", "convkit.quant_report", "convkit.layout",
                "comfy.gguf.orig_shape.", "general.file_type", "general.quantization_version",
                "_quantization_metadata")
UNET = "model.diffusion_model."


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(sdxl):
    """(tiny SDXL model, fp32 single file, diffusers folder, work dir)."""
    model, single, folder, d = sdxl
    return model, single, folder, d


@pytest.fixture(scope="module")
def lora(base, tmp_path_factory):
    import safetensors.torch as st

    model = base[0]
    p = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    st.save_file(kohya_diffusers_paths(random_factors(model, comps=("unet",))), p)
    return p


ENCODINGS = {
    # name: (quantize target, extra options, output suffix)
    "fp8-e4m3fn": ("fp8-e4m3fn", {}, ".safetensors"),
    "fp8-e5m2": ("fp8-e5m2", {}, ".safetensors"),
    "fp8-scaled": ("fp8-scaled", {}, ".safetensors"),
    "fp8-scaled-comfy_quant": ("fp8-scaled", {"scaled_format": "comfy_quant"}, ".safetensors"),
    "nf4": ("nf4", {}, ".safetensors"),
    "fp4": ("fp4", {}, ".safetensors"),
    "nf4-double": ("nf4", {"double_quant": True}, ".safetensors"),
    **{f"gguf-{q}-{lay}": (f"gguf:{q}", {"layout": lay}, ".gguf")
       for q in ("F16", "Q8_0", "Q5_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
       for lay in ("comfy", "sdcpp")},
    "quanto-int8": ("quanto:int8", {}, ""),
    "diffusers-folder": (None, {}, ""),
}
# what the view must report as the stored encoding of at least one tensor of each input
STORED = {"fp8-e4m3fn": "F8_E4M3", "fp8-e5m2": "F8_E5M2", "fp8-scaled": "F8_E4M3*scale",
          "fp8-scaled-comfy_quant": "F8_E4M3*scale", "nf4": "nf4", "fp4": "fp4",
          "nf4-double": "nf4+dq", "quanto-int8": "quanto"}


@pytest.fixture(scope="module")
def encoded(base, tmp_path_factory):
    """name -> path of the tiny SDXL in that encoding (made once, lazily)."""
    d = tmp_path_factory.mktemp("encoded")
    cache = {}

    def get(name):
        if name not in cache:
            target, opts, suffix = ENCODINGS[name]
            if target is None:
                cache[name] = base[2]
            else:
                out = d / f"{name}{suffix}"
                quantize(base[1], out, target, **opts)
                cache[name] = out
        return cache[name]

    return get


@pytest.fixture(scope="module")
def decoded(encoded, tmp_path_factory):
    """name -> the encoded input converted to fp32 (made once per encoding, lazily): what
    every matrix step must equal when it reads the encoded input directly."""
    d = tmp_path_factory.mktemp("decoded")
    cache = {}

    def get(name):
        if name not in cache:
            path = encoded(name)
            out = d / (name if path.is_dir() else f"{name}.safetensors")
            convert(path, out, "fp32")
            cache[name] = out
        return cache[name]

    return get


@pytest.fixture(scope="module")
def base_logical(base):
    return _logical(base[1])


def _storage_bound(path: Path) -> float:
    """The worst relative RMSE the input's own quant report states (0 for float inputs)."""
    with open_source(path) as s:
        rep = s.metadata.get("convkit.quant_report")
    if not rep:
        return 0.0
    return float(json.loads(rep)["max_rel_rmse"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    n = float(b.pow(2).mean().sqrt())
    return float((a - b).pow(2).mean().sqrt()) / (n if n > 0 else 1.0)


def _logical(path) -> dict[str, torch.Tensor]:
    with open_source(path) as s:
        return {k: s.load(k) for k in s.keys()}


def _stored_keys(path: Path) -> list[str]:
    with open_raw(path) as r:
        return r.keys()


def _metadata(path: Path) -> dict[str, str]:
    with open_raw(path) as r:
        return dict(r.metadata)


def _assert_float_output(path: Path) -> None:
    """No auxiliary tensor, no quantized dtype, no storage metadata in a float output."""
    with open_raw(path) as r:
        keys = r.keys()
        bad = [k for k in keys if any(a in k for a in AUX)]
        assert not bad, f"auxiliary tensors in a float output: {bad[:5]}"
        kinds = {r.info(k).stored_as for k in keys}
        assert not kinds & {"F8_E4M3", "F8_E5M2", "U8", "I8"}, kinds
        meta = r.metadata
    stale = [k for k in meta if k.startswith(STORAGE_META)]
    assert not stale, f"storage metadata in a float output: {stale[:5]}"


# ----------------------------------------------------------------------------- the six findings


def test_finding1_scaled_fp8_to_fp32_applies_the_scales(base, encoded, tmp_path):
    """Was: raw fp8 values without their scales (relative error ~7,400), the scale tensors and
    marker copied, metadata still saying fp8-scaled."""
    src = base[1]
    m8 = encoded("fp8-scaled")
    out = tmp_path / "back.safetensors"
    r = convert(m8, out, "fp32")
    assert any("dequantized" in n for n in r.plan.notes)
    _assert_float_output(out)
    ref, got = _logical(src), _logical(out)
    assert set(got) == set(ref)
    bound = _storage_bound(m8)
    assert 0 < bound < 0.05
    worst = max(_rel(got[k], ref[k]) for k in ref if ref[k].is_floating_point())
    assert worst <= bound * 1.0001, worst


def test_finding2_nf4_to_fp16_is_dequantized(base, encoded, tmp_path):
    """Was: the output still NF4 (235 bnb4 weights), quant state tensors copied."""
    out = tmp_path / "out.safetensors"
    convert(encoded("nf4"), out, "fp16")
    _assert_float_output(out)
    with open_raw(out) as r:
        assert {r.info(k).dtype for k in r.keys()} <= {"F16", "I64"}
    ref, got = _logical(base[1]), _logical(out)
    assert set(got) == set(ref)
    k = UNET + "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight"
    assert got[k].shape == ref[k].shape and 0 < _rel(got[k].float(), ref[k]) < 0.15


def test_finding3_merge_into_scaled_fp8_base_uses_the_scales(base, encoded, lora, tmp_path):
    """Was: the LoRA added to the unscaled fp8 values (x7,400 error), scales carried along."""
    m8 = encoded("fp8-scaled")
    direct = tmp_path / "direct.safetensors"
    merge_lora(m8, [lora], direct, dtype="fp16")
    _assert_float_output(direct)
    # the same merge on the dequantized base, written as fp32 first: identical values
    deq = tmp_path / "deq.safetensors"
    convert(m8, deq, "fp32")
    two_step = tmp_path / "two.safetensors"
    merge_lora(deq, [lora], two_step, dtype="fp16")
    a, b = _logical(direct), _logical(two_step)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and close to merging into the fp32 source (within the fp8 error of the base)
    ref = tmp_path / "ref.safetensors"
    merge_lora(base[1], [lora], ref, dtype="fp32")
    r = _logical(ref)
    k = UNET + "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight"
    assert _rel(a[k].float(), r[k]) < 0.05


def test_finding4_gguf_to_fp16_drops_gguf_metadata(base, encoded, tmp_path):
    """Was: ~290 comfy.gguf.orig_shape.* keys and convkit.quantization: gguf:Q8_0 copied."""
    q8 = encoded("gguf-Q8_0-comfy")
    assert any(k.startswith("comfy.gguf.orig_shape.") for k in _metadata(q8))
    out = tmp_path / "out.safetensors"
    convert(q8, out, "fp16")
    _assert_float_output(out)
    meta = _metadata(out)
    steps = json.loads(meta["convkit.steps"])
    assert [s["op"] for s in steps] == ["quantize", "convert"]     # history kept, appended


def test_finding5_extract_covers_3x3_convs(base, tmp_path):
    """Was: the changed 3x3 convs left out of the LoRA, the report saying "0 skipped, total
    relative error 6.4e-07"."""
    import safetensors.torch as st

    src = base[1]
    sd = st.load_file(src)
    g = torch.Generator().manual_seed(3)
    changed = []
    for k, w in sd.items():
        if not k.startswith(UNET) or not k.endswith(".weight") or w.ndim < 2 \
                or k.startswith(UNET + "input_blocks.0."):      # conv_in: no LoRA module
            continue
        kind = ("conv3" if w.ndim == 4 and w.shape[-1] == 3 else "conv1" if w.ndim == 4 else
                "attn" if "attn" in k else "ff" if ".ff." in k else None)
        if kind and len([c for c in changed if c[1] == kind]) < 3:
            u = torch.randn(w.shape[0], 2, generator=g) * 0.05
            v = torch.randn(2, math.prod(w.shape[1:]), generator=g) * 0.05
            sd[k] = w + (u @ v).reshape(w.shape)
            changed.append((k, kind))
    assert {c[1] for c in changed} == {"conv3", "conv1", "attn", "ff"}
    tuned = tmp_path / "tuned.safetensors"
    tiny.save_state_dict(sd, tuned)
    out = tmp_path / "lora.safetensors"
    res = extract_lora(tuned, src, out, rank=8, dtype="fp32")
    assert res.total_error < 1e-3 and res.modules == len(changed)
    merged = tmp_path / "merged.safetensors"
    merge_lora(src, [out], merged, dtype="fp32")
    got, ref = _logical(merged), _logical(src)
    for k, kind in changed:
        assert _rel(got[k] - ref[k], sd[k] - ref[k]) < 1e-3, (k, kind)
    # --conv-rank 0 leaves the 3x3 convs out, and says how much of the change that is
    res0 = extract_lora(tuned, src, tmp_path / "noconv.safetensors", rank=8, dtype="fp32",
                        conv_rank=0)
    d3 = sum(float((sd[k] - ref[k]).double().pow(2).sum()) for k, c in changed if c == "conv3")
    dall = sum(float((sd[k] - ref[k]).double().pow(2).sum()) for k, _ in changed)
    assert res0.modules == len(changed) - 3
    assert res0.total_error == pytest.approx(math.sqrt(d3 / dall), rel=1e-3)
    assert any("conv" in line and "%" in line for line in res0.summary_lines())
    # a change no LoRA module can carry (conv_in) is reported, and counted in the total
    k_in = UNET + "input_blocks.0.0.weight"
    sd[k_in] = sd[k_in] * 1.01
    tiny.save_state_dict(sd, tuned)
    res1 = extract_lora(tuned, src, tmp_path / "l1.safetensors", rank=8, dtype="fp32")
    din = float((sd[k_in] - ref[k_in]).double().pow(2).sum())
    assert res1.total_error == pytest.approx(math.sqrt(din / (dall + din)), rel=1e-3)


def test_finding6_every_output_gets_the_umask_mode(tmp_path):
    """Was: some outputs 0600 (written by safetensors' save_file), others 0644."""
    from convkit.demo import run_demo

    run_demo(tmp_path, arch="sd15")
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    bad = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
           for p in tmp_path.rglob("*") if p.is_file() and stat.S_IMODE(p.stat().st_mode) != want}
    assert not bad, f"expected {oct(want)}: {bad}"


# ----------------------------------------------------------------------------- the matrix


MATRIX_INPUTS = list(ENCODINGS)
# The commands (convert, merge, extract, quantize) read through the view, which decodes every
# GGML type; the view matrix above that covers each of the 18 GGUF inputs. Per command, the
# GGUF inputs that differ in what a command sees are the container and naming (comfy / sdcpp
# layout) and the block family: F16, a legacy type and a K-quant in each layout, not all nine
# types again (the full cross product cost ~30 s of the suite's 600 s budget).
COMMAND_INPUTS = [e for e in MATRIX_INPUTS
                  if not e.startswith("gguf-") or e.split("-")[1] in ("F16", "Q8_0", "Q4_K")]


@pytest.mark.parametrize("enc", MATRIX_INPUTS)
def test_matrix_view_decodes_within_the_inputs_bound(enc, base_logical, encoded):
    path = encoded(enc)
    ref = base_logical if enc != "quanto-int8" else None
    with open_source(path) as s:
        stored = s.encodings()
        want = STORED.get(enc) or (enc.split("-")[1] if enc.startswith("gguf-") else None)
        if enc.startswith("gguf-") and enc.endswith("-sdcpp") and "_K" in enc:
            # sd.cpp keeps rows as they are: the tiny models' rows (16-64 wide) do not fit 256,
            # so K types fall back per tensor to legacy block types (the comfy layout, which
            # rearranges rows, carries real K blocks)
            want = "Q"
        if want:
            assert any(want in label for label in stored), stored
        assert not [k for k in s.keys() if any(a in k for a in AUX)]
        if ref is None:
            return
        bound = _storage_bound(path)
        for k in s.keys():
            if k not in ref or not ref[k].is_floating_point():
                continue
            t = s.load(k)
            assert t.shape == ref[k].shape, k
            assert _rel(t, ref[k]) <= max(bound * 1.0001, 1e-3 if "F16" in enc else 0), (k, enc)


@pytest.mark.parametrize("enc", COMMAND_INPUTS)
def test_matrix_convert_fp32(enc, encoded, decoded):
    path = encoded(enc)
    out = decoded(enc)              # convert(path, out, "fp32"), shared with the other steps
    files = [out] if out.is_file() else sorted(out.rglob("*.safetensors"))
    for f in files:
        _assert_float_output(f)
    want, got = _logical(path), _logical(out)
    assert want.keys() == got.keys()
    for k in want:
        w = want[k].float() if want[k].is_floating_point() else want[k]
        assert torch.equal(got[k], w), k          # the decoded values, bit for bit


@pytest.mark.parametrize("enc", COMMAND_INPUTS)
def test_matrix_merge_lora_fp32(enc, encoded, decoded, lora, tmp_path):
    path = encoded(enc)
    out = tmp_path / ("out" if path.is_dir() else "out.safetensors")
    merge_lora(path, [lora], out, dtype="fp32")
    files = [out] if out.is_file() else sorted(out.rglob("*.safetensors"))
    for f in files:
        _assert_float_output(f)
    deq = decoded(enc)
    two = tmp_path / ("two" if path.is_dir() else "two.safetensors")
    merge_lora(deq, [lora], two, dtype="fp32")
    a, b = _logical(out), _logical(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), enc


@pytest.mark.parametrize("enc", [e for e in COMMAND_INPUTS if e != "quanto-int8"])
def test_matrix_extract_against_fp32_base(enc, base, encoded, decoded, tmp_path):
    """TUNED = the encoded model, BASE = the fp32 source: the LoRA is made from the decoded
    weights (the same factors as from TUNED converted to fp32 first)."""
    path = encoded(enc)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    deq = decoded(enc)
    try:
        ra = extract_lora(path, base[1], a, rank=4, dtype="fp32", components=["unet"])
    except Exception as e:      # a lossless input differs in nothing: refused for both
        with pytest.raises(type(e)):
            extract_lora(deq, base[1], b, rank=4, dtype="fp32", components=["unet"])
        assert enc in ("diffusers-folder", "gguf-F16-comfy", "gguf-F16-sdcpp") or \
            "differ in no module" in str(e)
        return
    extract_lora(deq, base[1], b, rank=4, dtype="fp32", components=["unet"])
    x, y = _logical(a), _logical(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert ra.modules > 0


@pytest.mark.parametrize("enc", COMMAND_INPUTS)
def test_matrix_quantize_gguf_q8_0(enc, base_logical, encoded, decoded, tmp_path):
    path = encoded(enc)
    out, two = tmp_path / "out.gguf", tmp_path / "two.gguf"
    r = quantize(path, out, "gguf:Q8_0")
    quantize(decoded(enc), two, "gguf:Q8_0")
    a, b = _logical(out), _logical(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), enc
    meta = _metadata(out)
    assert meta["convkit.quantization"] == "gguf:Q8_0"
    assert r.report.summary(0)["max_rel_rmse"] < 0.02
    if enc != "quanto-int8":
        ref = base_logical
        bound = _storage_bound(path) + 0.02
        for k in a:
            src_k = k if k in ref else UNET + k
            if src_k in ref and ref[src_k].is_floating_point():
                assert _rel(a[k], ref[src_k]) <= bound, (k, enc)


@pytest.mark.parametrize("enc,suffix", [("fp8-scaled", ".scale_input"),
                                        ("fp8-scaled-comfy_quant", ".input_scale")])
def test_scaled_fp8_with_activation_scales(enc, suffix, encoded, tmp_path):
    """ComfyUI files made for its fp8 matmul carry activation scales beside the weight scales
    (``<layer>.scale_input`` in the scaled_fp8 form, ``<layer>.input_scale`` with comfy_quant):
    consumed by the view like the weight scales, so the logical weights are the same and no
    float output carries them."""
    import safetensors.torch as st

    src = encoded(enc)
    sd = st.load_file(src)
    with open_raw(src) as r:
        meta = dict(r.metadata)
    weights = [k[: -len(".weight")] for k in sd if k.endswith(".weight")
               and sd[k].dtype == torch.float8_e4m3fn]
    assert weights
    for w in weights:
        sd[w + suffix] = torch.tensor(0.5)
    act = tmp_path / "act.safetensors"
    st.save_file(sd, act, metadata=meta)
    a, b = _logical(src), _logical(act)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "out.safetensors"
    convert(act, out, "fp16")
    _assert_float_output(out)
