"""extract-lora accounts for the whole difference (issue 8, finding 5): k×k convs are extracted
at --rank unless --conv-rank says otherwise, what is left out is reported by reason with its share
of ‖ΔW‖², and the total error counts it. Quantized TUNED / BASE are decoded before ΔW is taken."""
from __future__ import annotations

import math

import pytest
import safetensors.torch as st
import torch

from convkit import tiny
from convkit.errors import UnknownNameError, UsageError
from convkit.lora import extract_lora, merge_lora
from convkit.sources import open_source

UNET = {"attention": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "feed-forward": "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "conv 1x1": "down_blocks.1.resnets.0.conv_shortcut",
        "conv 3x3": "down_blocks.1.resnets.0.conv1"}
NORM = ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.norm1")     # no LoRA carries it
TE = ("text_encoder", "encoder.layers.0.self_attn.q_proj")
TE2 = ("text_encoder_2", "text_model.encoder.layers.0.self_attn.k_proj")   # rows of in_proj
TE2_BIAS = ("text_encoder_2", "text_model.encoder.layers.1.self_attn.q_proj", "bias")
VAE = ("vae", "decoder.conv_in")


def _tuned(m, changes, seed, rank=2, scale=0.02):
    """A copy of ``m`` with a rank-``rank`` change in each (component, module) weight (a full
    change for 1-D weights); returns the copy and {(component, module): ΔW}."""
    t = tiny.build_copy(m)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for comp, name, *param in changes:
            w = getattr(t.components[comp].get_submodule(name), (param or ["weight"])[0])
            if w.ndim == 1:
                d = torch.randn(w.shape, generator=g) * scale
            else:
                d = (torch.randn(w.shape[0], rank, generator=g)
                     @ torch.randn(rank, w[0].numel(), generator=g)).reshape(w.shape) * scale
            w += d
            deltas[(comp, name, *param)] = d
    return t, deltas


@pytest.fixture(scope="module")
def models(sdxl, tmp_path_factory):
    base_m, base_file, _, _ = sdxl
    d = tmp_path_factory.mktemp("extract_report")
    t4, d4 = _tuned(base_m, [("unet", n) for n in UNET.values()], seed=3)
    tall, dall = _tuned(base_m, [("unet", n) for n in UNET.values()]
                        + [NORM, TE, TE2, TE2_BIAS, VAE], seed=4)
    tiny.save_diffusers(tall, d / "tuned_all_diffusers")
    return (base_file, tiny.save_single_file(t4, d / "tuned4.safetensors"), d4,
            tiny.save_single_file(tall, d / "tuned_all.safetensors"), dall, d)


def _sgm_key(lora_key: str, base_keys) -> str:
    """The single-file weight a kohya ``lora_unet_`` module name stands for."""
    names = {"lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_"): k
             for k in base_keys if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    return names[lora_key]


def test_kxk_convs_are_extracted_at_rank_and_merge_back(models, tmp_path):
    """Attention, feed-forward, 1×1 and 3×3 conv changes: all four modules are in the LoRA
    (before: the 3×3 conv was left out silently and the error said 6e-07), nothing else is left
    out, and the LoRA merges back to TUNED with convkit and with ComfyUI's arithmetic."""
    base, tuned, deltas, _, _, _ = models
    lora = tmp_path / "lora.safetensors"
    r = extract_lora(tuned, base, lora, rank=8, dtype="fp32")
    assert r.modules == 4 and r.conv_rank == 8
    assert r.total_error < 1e-5 and r.modules_error < 1e-5
    assert set(r.left_out_dict()) == {"unchanged"} and r.share("unchanged") == 0.0
    assert "left out: nothing that differs" in r.summary_lines()
    sd, want, b = st.load_file(lora), st.load_file(tuned), st.load_file(base)
    convs = [k for k, v in sd.items() if k.endswith(".lora_down.weight") and v.ndim == 4
             and v.shape[2:] == (3, 3)]
    assert len(convs) == 1
    # ComfyUI / kohya LoCon: lora_down (r, in, k, k), lora_up (out, r, 1, 1),
    # W + (up.flatten(1) @ down.flatten(1)).reshape(W.shape) * alpha / r
    mod = convs[0][: -len(".lora_down.weight")]
    key = _sgm_key(mod, b)
    up, down, alpha = sd[mod + ".lora_up.weight"], sd[mod + ".lora_down.weight"], sd[mod + ".alpha"]
    r_ = down.shape[0]
    assert up.shape == (b[key].shape[0], r_, 1, 1) and down.shape == (r_, *b[key].shape[1:])
    comfy = b[key] + (up.flatten(1) @ down.flatten(1)).reshape(b[key].shape) * (alpha / r_)
    dw = deltas[("unet", UNET["conv 3x3"])]
    assert (comfy - want[key]).norm() / dw.norm() < 1e-5
    # convkit merge-lora: every tensor of BASE + LoRA equals TUNED within the SVD error
    out = tmp_path / "merged.safetensors"
    merge_lora(base, [lora], out)
    got = st.load_file(out)
    for k, w in want.items():
        if w.is_floating_point():
            assert (got[k] - w).norm() <= 1e-5 * max(float((w - b[k]).norm()), 1e-6), k


def test_conv_rank_zero_and_everything_left_out_is_reported(models, tmp_path):
    """--conv-rank 0, a changed norm (no LoRA module carries it), a changed VAE and text
    encoder with --components unet: each reported with its share of ‖ΔW‖², and the total error
    counts them."""
    base, _, _, tuned, deltas, _ = models
    r = extract_lora(tuned, base, tmp_path / "l.safetensors", rank=8, conv_rank=0,
                     components=["unet"], dtype="fp32")
    sq = {k: float(d.norm()) ** 2 for k, d in deltas.items()}
    total = sum(sq.values())
    want = {"conv": sq[("unet", UNET["conv 3x3"])], "not-lora": sq[NORM],
            "unselected": sq[TE] + sq[TE2] + sq[TE2_BIAS], "vae": sq[VAE]}
    left = r.left_out_dict()
    assert r.modules == 3 and r.conv_rank == 0
    for reason, s in want.items():
        assert left[reason]["tensors"] == (3 if reason == "unselected" else 1), reason
        assert left[reason]["share"] == pytest.approx(s / total, rel=1e-4), reason
    assert r.total_error == pytest.approx(math.sqrt(sum(want.values()) / total), rel=1e-4)
    assert r.modules_error < 1e-5
    text = "\n".join(r.summary_lines())
    for reason in want:
        assert f"{100 * left[reason]['share']:.3f}%" in text
    assert "--conv-rank 0" in text and "VAE" in text and "--components" in text
    sd = st.load_file(tmp_path / "l.safetensors")
    assert not any(v.ndim == 4 and v.shape[2:] == (3, 3) for v in sd.values())
    d = r.to_dict()
    assert d["left_out"]["conv"]["tensors"] == 1 and d["total_error"] == r.total_error


def test_layouts_differ_same_accounting(models, tmp_path):
    """TUNED a diffusers folder, BASE a single file (OpenCLIP q/k/v are rows of in_proj there):
    the same modules, products and shares as from two single files; a changed in_proj bias is a
    tensor no LoRA module carries."""
    base, _, _, tuned, deltas, d = models
    sq = {k: float(x.norm()) ** 2 for k, x in deltas.items()}
    total = sum(sq.values())
    got = {}
    for name, t in (("single", tuned), ("folder", d / "tuned_all_diffusers")):
        out = tmp_path / f"{name}.safetensors"
        got[name] = (extract_lora(t, base, out, rank=8, conv_rank=0, dtype="fp32"), out)
    r, _ = got["folder"]
    assert r.modules == 5                # attention, ff, 1x1 conv, CLIP-L q, OpenCLIP k
    left = r.left_out_dict()
    assert left["not-lora"]["share"] == pytest.approx((sq[NORM] + sq[TE2_BIAS]) / total,
                                                      rel=1e-4)
    assert left["vae"]["share"] == pytest.approx(sq[VAE] / total, rel=1e-4)
    assert r.total_error == pytest.approx(got["single"][0].total_error, rel=1e-6)
    assert r.left_out_dict().keys() == got["single"][0].left_out_dict().keys()
    _same_lora(got["single"][1], got["folder"][1])


def test_conv_rank_sets_the_kxk_rank_and_usage(models, tmp_path):
    base, tuned, _, _, _, _ = models
    r = extract_lora(tuned, base, tmp_path / "l.safetensors", rank=8, conv_rank=1)
    conv = next(n for n in r.ranks if n.endswith(("in_layers.2", "conv1")))
    assert r.ranks[conv] == 1 and {v for n, v in r.ranks.items() if n != conv} == {8}
    meta = open_source(tmp_path / "l.safetensors").metadata
    assert '"conv_dim": "1"' in meta["ss_network_args"]
    with pytest.raises(UsageError, match="conv-rank"):
        extract_lora(tuned, base, tmp_path / "x.safetensors", rank=8, conv_rank=-1)
    with pytest.raises(UnknownNameError, match="did you mean 'kohya'"):
        extract_lora(tuned, base, tmp_path / "x.safetensors", rank=8, fmt="kohay")
    assert not (tmp_path / "x.safetensors").exists()


def test_dry_run_reads_nothing_and_writes_nothing(models, tmp_path, monkeypatch):
    base, tuned, _, _, _, _ = models
    import convkit.lora.extract as E

    monkeypatch.setattr(E.SvdOp, "run", lambda *a: pytest.fail("read in a dry run"))
    r = extract_lora(tuned, base, tmp_path / "l.safetensors", rank=8, dry_run=True)
    assert r.dry_run and not (tmp_path / "l.safetensors").exists()
    text = r.plan.format()
    assert "ΔW -> SVD rank 8" in text and "‖ΔW‖² only" in text
    assert r.plan.to_dict()["tensors"] == len(r.plan.items)


def _dequantized_copy(path, out):
    with open_source(path) as v:
        st.save_file({k: v.load(k).contiguous() for k in v.keys()}, out)
    return out


def _same_lora(a, b):
    """Same modules, same up·down (the factors of a flat noise spectrum are not unique: LAPACK
    may rotate near-equal singular vectors differently from one buffer to another)."""
    x, y = st.load_file(a), st.load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        if k.endswith(".lora_down.weight"):
            m = k[: -len(".lora_down.weight")]
            px = x[m + ".lora_up.weight"].flatten(1) @ x[k].flatten(1)
            py = y[m + ".lora_up.weight"].flatten(1) @ y[k].flatten(1)
            assert (px - py).norm() <= 1e-5 * py.norm(), m


@pytest.mark.parametrize("which, target", [("base", "fp8-scaled"), ("tuned", "gguf:Q8_0")])
def test_quantized_input_is_decoded(models, tmp_path, which, target):
    """ΔW is taken between DEQUANTIZED weights: extracting from the quantized file gives the
    LoRA extracted from a float file of its decoded values (``open_source(...).load``). The GGUF
    holds the UNet alone, in another key layout than BASE."""
    from convkit.quantize import quantize

    base, tuned, _, _, _, _ = models
    src = base if which == "base" else tuned
    q = tmp_path / ("q.gguf" if target.startswith("gguf") else "q.safetensors")
    quantize(src, q, target)
    deq = _dequantized_copy(q, tmp_path / "deq.safetensors")
    args = {"base": lambda x: (tuned, x), "tuned": lambda x: (x, base)}[which]
    r1 = extract_lora(*args(q), tmp_path / "from_q.safetensors", rank=4, dtype="fp32")
    r2 = extract_lora(*args(deq), tmp_path / "from_deq.safetensors", rank=4, dtype="fp32")
    assert any("quantized" in n for n in r1.notes)
    assert r1.modules == r2.modules > 4        # the quantization error is part of ΔW
    _same_lora(tmp_path / "from_q.safetensors", tmp_path / "from_deq.safetensors")
    assert r1.total_error == pytest.approx(r2.total_error, rel=1e-6)
    if which == "tuned":
        assert any("no counterpart in TUNED" in n for n in r1.notes)   # text encoders, VAE


def test_provenance_of_extracted_lora(models, tmp_path):
    base, tuned, _, _, _, _ = models
    odd = tmp_path / "tuned-\udcff.safetensors"       # a file name that is not UTF-8
    odd.write_bytes(tuned.read_bytes())
    extract_lora(odd, base, tmp_path / "l.safetensors", rank=2)
    meta = open_source(tmp_path / "l.safetensors").metadata
    assert meta["convkit.source"] == "tuned-\\xff.safetensors, base.safetensors"
    assert meta["convkit.tuned"] == "tuned-\\xff.safetensors"
    import json

    step = json.loads(meta["convkit.steps"])[-1]
    assert step["op"] == "extract-lora" and step["rank"] == 2 and step["conv_rank"] == 2
    assert meta["ss_network_dim"] == "2" and "convkit.version" in meta
