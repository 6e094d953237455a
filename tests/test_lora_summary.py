"""convkit.lora.summary: LoRA files described from their headers (format, architecture, coverage).

The files are real: extracted / converted by convkit from the tiny SDXL, saved by diffusers from
PEFT's own state dict, or spelled as ComfyUI / LyCORIS / DoRA files spell them.
"""
from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch as st
import torch
from safetensors import safe_open

from convkit import keymap, tiny
from convkit.errors import InputFormatError
from convkit.lora import convert_lora, extract_lora
from convkit.lora.summary import format_summary, summarize

from tests.lora_helpers import kohya_diffusers_paths

TE = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
SKIP = ("conv_in", "conv_out", "time_embedding", "add_embedding")


@pytest.fixture(scope="module")
def tuned(sdxl, tmp_path_factory):
    """The tiny SDXL with every UNet and text-encoder Linear/Conv weight changed (full rank)."""
    m, single, _, _ = sdxl
    t = tiny.build_copy(m)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            for name, mod in t.components[comp].named_modules():
                if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and not name.startswith(SKIP):
                    mod.weight += torch.randn(mod.weight.shape, generator=g) * 0.01
    return tiny.save_single_file(t, tmp_path_factory.mktemp("tuned") / "tuned.safetensors"), single


@pytest.fixture(scope="module")
def kohya_full(tuned, tmp_path_factory):
    """kohya SDXL LoRA of UNet and both text encoders, 3×3 convs included (rank 4)."""
    tuned_file, base = tuned
    out = tmp_path_factory.mktemp("kohya") / "kohya.safetensors"
    extract_lora(tuned_file, base, out, rank=4, conv_rank=4, fmt="kohya")
    return out


def header(path):
    """{key: shape} read from the safetensors header (independent of convkit)."""
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def downs(path, suffix=".lora_down.weight"):
    return {k[: -len(suffix)]: s for k, s in header(path).items() if k.endswith(suffix)}


def per_prefix(names, prefixes):
    out = {}
    for n in names:
        pre = next(p for p in prefixes if n.startswith(p))
        out[prefixes[pre]] = out.get(prefixes[pre], 0) + 1
    return out


def test_kohya_sdxl_extracted_with_convs_and_text_encoders(kohya_full):
    d = summarize(kohya_full)
    ds = downs(kohya_full)
    n = len(ds)
    convs = sum(len(s) == 4 and s[2] * s[3] > 1 for s in ds.values())
    one_by_one = sum(len(s) == 4 and s[2] * s[3] == 1 for s in ds.values())
    assert convs > 0
    assert d["format"] == d["family"] == "kohya" and d["variants"] == []
    assert d["architecture"] == "sdxl" and d["also_matches"] == []
    assert d["matched"] == d["modules"] == n and d["unmatched"] == 0
    assert d["per_component"] == per_prefix(ds, TE)
    assert set(d["per_component"]) == {"unet", "text_encoder", "text_encoder_2"}
    # kohya SDXL: SGM paths for the UNet, transformers names for the text encoders
    assert d["module_names"] == {"unet": "single-file", "text_encoder": "diffusers",
                                 "text_encoder_2": "diffusers"}
    assert d["algos"] == {"lora": n}
    assert d["ranks"] == {"4": n} and d["alphas"] == {"4": n}
    assert d["scale"] == {"min": 1.0, "max": 1.0, "values": {"1": n}}
    c = d["covers"]
    assert c["convs_3x3"] == convs and c["convs_1x1"] == one_by_one
    assert c["linear"] == n - convs - one_by_one
    assert c["text_encoders"] == d["per_component"]["text_encoder"] + \
        d["per_component"]["text_encoder_2"]
    assert 0 < c["attention"] < n and 0 < c["feed_forward"] < n
    assert d["tensors"] == 3 * n and sum(d["dtypes"].values()) == d["tensors"]
    assert d["dtypes"]["F16"] == 2 * n
    assert d["metadata"]["ss_network_dim"] == "4" and d["metadata"]["convkit.arch"] == "sdxl"
    assert "ss_network_args" in d["metadata"]
    assert d["other_tensors"] == 0 and d["notes"] == []
    assert json.loads(json.dumps(d)) == d
    lines = format_summary(d)
    assert all(isinstance(x, str) for x in lines)
    assert lines[0].startswith("LoRA:         kohya")
    assert any(x.startswith("architecture: sdxl") and f"{n} of {n}" in x for x in lines)
    assert any(x.startswith("covers:") and f"3×3 convs {convs}" in x for x in lines)


def test_unet_only_without_conv_rank(tuned, tmp_path):
    tuned_file, base = tuned
    out = tmp_path / "unet_only.safetensors"
    extract_lora(tuned_file, base, out, rank=2, conv_rank=0, fmt="kohya", components=["unet"])
    d = summarize(out)
    n = len(downs(out))
    assert d["format"] == "kohya" and d["architecture"] == "sdxl"
    assert d["per_component"] == {"unet": n} and d["matched"] == n
    assert d["covers"]["convs_3x3"] == 0 and d["covers"]["convs_1x1"] > 0
    assert d["covers"]["text_encoders"] == 0
    assert d["ranks"] == {"2": n} and d["alphas"] == {"2": n}


def test_converted_comfy_and_peft(kohya_full, tmp_path):
    ref = summarize(kohya_full)
    # convkit's "comfy" output is kohya names over single-file paths (what ComfyUI maps)
    comfy = tmp_path / "comfy.safetensors"
    convert_lora(kohya_full, comfy, "comfy")
    d = summarize(comfy)
    assert d["family"] == "kohya" and d["architecture"] == "sdxl"
    assert d["metadata"]["convkit.lora_format"] == "comfy"
    for k in ("modules", "matched", "per_component", "module_names", "ranks", "covers"):
        assert d[k] == ref[k], k
    # diffusers/PEFT: diffusers module names everywhere, alpha folded into lora_B
    peft = tmp_path / "peft.safetensors"
    convert_lora(kohya_full, peft, "peft")
    d = summarize(peft)
    n = len(downs(peft, ".lora_A.weight"))
    assert d["format"] == "peft" and d["architecture"] == "sdxl" and d["matched"] == n
    assert d["per_component"] == ref["per_component"]
    assert set(d["module_names"].values()) == {"diffusers"}
    assert d["alphas"] == {"none": n} and d["ranks"] == {"4": n}
    assert d["covers"]["convs_3x3"] == ref["covers"]["convs_3x3"]
    assert d["covers"]["text_encoders"] == ref["covers"]["text_encoders"]
    assert any("no alpha" in x for x in d["notes"])


def _peft_unet(m):
    """A copy of the tiny UNet with a PEFT LoRA (diffusers' add_adapter), B non-zero."""
    from peft import LoraConfig

    unet = copy.deepcopy(m.components["unet"])
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    unet.add_adapter(cfg)
    return unet


def test_peft_state_dict_saved_by_diffusers(sdxl, tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    m = sdxl[0]
    unet = _peft_unet(m)
    sd = get_peft_model_state_dict(unet)
    n = sum(k.endswith("lora_A.weight") for k in sd)
    convs = sum(v.ndim == 4 and v.shape[2] * v.shape[3] > 1
                for k, v in sd.items() if k.endswith("lora_A.weight"))
    attn = sum(".attn" in k for k in sd if k.endswith("lora_A.weight"))
    assert convs > 0 and attn > 0
    # as diffusers' save_lora_weights writes it ("unet." + PEFT names, adapter metadata)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=sd,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    d = summarize(tmp_path / "peft" / "pytorch_lora_weights.safetensors")
    assert d["format"] == "peft" and d["families"] == {"peft": n}
    assert d["architecture"] == "sdxl" and d["matched"] == n and d["unmatched"] == 0
    assert d["per_component"] == {"unet": n} and d["module_names"] == {"unet": "diffusers"}
    assert d["ranks"] == {"4": n} and d["alphas"] == {"none": n}
    assert d["covers"]["convs_3x3"] == convs and d["covers"]["text_encoders"] == 0
    assert d["covers"]["attention"] == attn and d["covers"]["feed_forward"] == 0
    assert any("lora_adapter_metadata" in x for x in d["notes"])
    # the raw PEFT state dict (no component prefix) is found in the UNet all the same
    st.save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "raw.safetensors")
    d = summarize(tmp_path / "raw.safetensors")
    assert d["format"] == "peft" and d["per_component"] == {"unet": n} and d["matched"] == n
    # diffusers' training scripts save convert_state_dict_to_diffusers(...) of it: attention
    # modules become ".lora.down/up" (diffusers' own format), the convs stay lora_A/lora_B
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "diff",
                                                unet_lora_layers=convert_state_dict_to_diffusers(sd))
    d = summarize(tmp_path / "diff" / "pytorch_lora_weights.safetensors")
    assert d["families"] == {"diffusers": attn, "peft": n - attn}
    assert d["format"] == ("diffusers" if attn > n - attn else "peft")
    assert d["matched"] == n and d["covers"]["convs_3x3"] == convs
    assert any(x.startswith("              mixed spellings") for x in format_summary(d))


def test_comfy_dotted_old_diffusers_and_unmatched(sdxl, factors, tmp_path):
    m = sdxl[0]
    cfg = m.spec["components"]["unet"]["config"]
    unet = {k: v for k, v in factors.items() if k[0] == "unet"}
    # ComfyUI's own key names: diffusion_model.<SGM path> + lora_up/lora_down/alpha
    sd = {}
    for (_, _, name), (up, down, a) in unet.items():
        s, _ = keymap.single_file_name("unet", name + ".weight", cfg)
        k = "diffusion_model." + s[: -len(".weight")]
        sd |= {k + ".lora_up.weight": up, k + ".lora_down.weight": down, k + ".alpha": torch.tensor(a)}
    st.save_file(sd, tmp_path / "comfy.safetensors")
    d = summarize(tmp_path / "comfy.safetensors")
    assert d["format"] == "comfy" and d["architecture"] == "sdxl"
    assert d["matched"] == len(unet) and d["module_names"] == {"unet": "single-file"}
    assert d["alphas"] == {"1": len(unet)} and d["scale"]["values"] == {"0.5": len(unet)}
    # the old diffusers attention-processor format
    old = {}
    for (_, n, _), (up, down, a) in unet.items():
        if ".attn1." in n:
            k = "unet." + n.replace(".to_out.0", ".processor.to_out").replace(".to_", ".processor.to_")
            old |= {k + "_lora.down.weight": down, k + "_lora.up.weight": up}
    st.save_file(old, tmp_path / "old.safetensors")
    d = summarize(tmp_path / "old.safetensors")
    assert d["format"] == "diffusers-old" and d["matched"] == len(old) // 2
    assert d["covers"]["attention"] == len(old) // 2
    # kohya prefixes over diffusers module paths (SDXL-Lightning), plus a name that is no module
    sd = kohya_diffusers_paths(factors)
    sd |= {"lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 8),
           "lora_unet_no_such_block.lora_up.weight": torch.zeros(8, 2), "stray_tensor": torch.zeros(1)}
    st.save_file(sd, tmp_path / "lightning.safetensors")
    d = summarize(tmp_path / "lightning.safetensors")
    assert d["format"] == "kohya" and d["architecture"] == "sdxl"
    assert d["matched"] == len(factors) and d["unmatched"] == 1
    assert d["unmatched_first"] == ["lora_unet_no_such_block"]
    assert d["module_names"]["unet"] == "diffusers"
    assert d["per_component"]["unet"] == len(unet) + 1
    assert d["other_tensors"] == 1 and d["other_first"] == ["stray_tensor"]
    text = "\n".join(format_summary(d))
    assert "unmatched:    1 (first: lora_unet_no_such_block)" in text


def _lycoris(m):
    """LoHa, LoKr (3×3 conv), LoCon with a Tucker core (3×3 conv), a full diff and a DoRA module,
    spelled as LyCORIS writes them (as in test_lora_merge)."""
    g = torch.Generator().manual_seed(3)
    R = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    unet = m.components["unet"].state_dict()
    k = lambda n: "lora_unet_" + n.replace(".", "_")  # noqa: E731
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    o, i = unet[n + ".weight"].shape
    loha = {k(n) + ".hada_w1_a": R(o, 4), k(n) + ".hada_w1_b": R(4, i), k(n) + ".hada_w2_a": R(o, 4),
            k(n) + ".hada_w2_b": R(4, i), k(n) + ".alpha": torch.tensor(2.0)}
    n = "down_blocks.1.resnets.0.conv1"                       # (32, 16, 3, 3)
    lokr = {k(n) + ".lokr_w1": R(4, 2), k(n) + ".lokr_w2_a": R(8, 2), k(n) + ".lokr_w2_b": R(2, 72),
            k(n) + ".alpha": torch.tensor(1.0)}
    n = "down_blocks.1.resnets.0.conv2"                       # (32, 32, 3, 3)
    tucker = {k(n) + ".lora_down.weight": R(3, 32, 1, 1), k(n) + ".lora_mid.weight": R(3, 3, 3, 3),
              k(n) + ".lora_up.weight": R(32, 3, 1, 1)}
    n = "down_blocks.1.attentions.0.proj_in"
    w = unet[n + ".weight"]
    full = {k(n) + ".diff": R(*w.shape), k(n) + ".diff_b": R(w.shape[0])}
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    o, i = unet[n + ".weight"].shape
    dora = {k(n) + ".lora_down.weight": R(2, i), k(n) + ".lora_up.weight": R(o, 2),
            k(n) + ".dora_scale": R(1, i), k(n) + ".alpha": torch.tensor(2.0)}
    return loha, lokr, tucker, full, dora


def test_lycoris_tucker_full_and_dora(sdxl, tmp_path):
    loha, lokr, tucker, full, dora = _lycoris(sdxl[0])
    st.save_file(loha | lokr | tucker | full | dora, tmp_path / "lyco.safetensors")
    d = summarize(tmp_path / "lyco.safetensors")
    assert d["family"] == "kohya" and d["variants"] == ["loha", "lokr", "full", "tucker", "dora"]
    assert d["format"] == "kohya loha+lokr+full+tucker+dora"
    # these diffusers UNet names exist in SD1.5 and the SDXL refiner as well, and tiny shapes fit
    # no released model: names alone cannot tell
    assert {d["architecture"], *d["also_matches"]} == {"sd15", "sdxl", "sdxl_refiner"}
    assert d["matched"] == 5 and d["per_component"] == {"unet": 5}
    assert any(x.startswith("              as many match") for x in format_summary(d))
    assert d["algos"] == {"loha": 1, "lokr": 1, "lora": 1, "full": 1, "lora+dora": 1}
    assert d["ranks"] == {"2": 2, "3": 1, "4": 1, "full": 1}
    assert d["alphas"] == {"1": 1, "2": 2, "none": 1}
    c = d["covers"]
    # proj_in is a Linear in SDXL and a 1×1 conv in SD1.5 (whichever of the tie was picked)
    assert c["convs_3x3"] == 2 and c["linear"] + c["convs_1x1"] == 3 and c["attention"] == 2
    assert d["other_tensors"] == 0
    st.save_file(loha, tmp_path / "loha.safetensors")
    d = summarize(tmp_path / "loha.safetensors")
    assert d["format"] == "kohya loha" and d["algos"] == {"loha": 1} and d["ranks"] == {"4": 1}


@pytest.mark.parametrize("context, arch", [(768, "sd15"), (2048, "sdxl")])
def test_names_tie_shapes_decide(tmp_path, context, arch):
    """SD1.5, SDXL and the refiner share this diffusers name; the released models' shapes
    (cross-attention context 768 / 2048 / 1280) tell them apart."""
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    st.save_file({k + ".lora_down.weight": torch.zeros(1, context),
                  k + ".lora_up.weight": torch.zeros(640, 1), k + ".alpha": torch.tensor(1.0)},
                 tmp_path / "l.safetensors")
    d = summarize(tmp_path / "l.safetensors")
    assert d["architecture"] == arch
    assert set(d["also_matches"]) == {"sd15", "sdxl", "sdxl_refiner"} - {arch}
    assert d["covers"] == {"convs_3x3": 0, "convs_1x1": 0, "linear": 1, "text_encoders": 0,
                           "attention": 1, "feed_forward": 0}
    assert any("the tensor shapes fit " + arch in x for x in d["notes"])


def test_peft_dora(sdxl, tmp_path):
    unet = sdxl[0].components["unet"].state_dict()
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    o, i = unet[n + ".weight"].shape
    sd = {f"unet.{n}.lora_A.weight": torch.zeros(2, i), f"unet.{n}.lora_B.weight": torch.zeros(o, 2),
          f"unet.{n}.lora_magnitude_vector": torch.ones(o)}
    st.save_file(sd, tmp_path / "dora.safetensors")
    d = summarize(tmp_path / "dora.safetensors")
    assert d["format"] == "peft dora" and d["algos"] == {"lora+dora": 1} and d["matched"] == 1


def test_not_a_lora(sdxl, tmp_path):
    _, single, folder, _ = sdxl
    assert summarize(single) is None            # a checkpoint
    assert summarize(folder) is None            # a diffusers folder
    # a broken LoRA is an error, not "not a LoRA"
    st.save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4),
                  "lora_unet_x.hada_w1_a": torch.zeros(4, 2)}, tmp_path / "mixed.safetensors")
    with pytest.raises(InputFormatError, match="mixes"):
        summarize(tmp_path / "mixed.safetensors")
