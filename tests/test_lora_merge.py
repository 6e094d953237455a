"""LoRA merge: name mapping for every format, against diffusers and hand-computed deltas."""
from __future__ import annotations


import pytest
import safetensors.torch as st
import torch

from convkit import keymap, tiny
from convkit.lora import merge_lora

from tests.lora_helpers import (TE_PRE, assert_matches, diffusers_state, expected,
                                kohya_diffusers_paths, modules, peft)


@pytest.mark.parametrize("base_kind", ["single", "folder"])
def test_kohya_diffusers_paths_zero_unmatched(sdxl, factors, base_kind, tmp_path):
    """The SDXL-Lightning spelling (lora_unet_ over diffusers module paths) matches every key."""
    m, single, folder, _ = sdxl
    lora = tmp_path / "lightning_style.safetensors"
    st.save_file(kohya_diffusers_paths(factors), lora)
    out = tmp_path / ("out.safetensors" if base_kind == "single" else "out")
    r = merge_lora(single if base_kind == "single" else folder, [f"{lora}:0.7"], out)
    assert r.loras[0].unmatched == [] and r.loras[0].modules == len(factors)
    assert_matches(diffusers_state(out), expected(m, factors, 0.7))


def test_matches_diffusers_fuse_lora(sdxl, factors, tmp_path):
    """diffusers' own load_lora_weights + fuse_lora gives the same UNet and TE weights."""
    pytest.importorskip("peft")
    m, single, folder, _ = sdxl
    out = {}
    for fmt, sd in [("kohya", kohya_diffusers_paths(factors)), ("peft", peft(factors))]:
        lora = tmp_path / f"{fmt}.safetensors"
        st.save_file(sd, lora)
        pipe = tiny.pipeline(tiny.build("sdxl", 0))
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora(lora_scale=0.6)
        pipe.unload_lora_weights()
        merged = tmp_path / f"merged_{fmt}.safetensors"
        merge_lora(single, [f"{lora}:0.6"], merged)
        ours = diffusers_state(merged)
        n = 0
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            theirs = getattr(pipe, comp).state_dict()
            for (c, _, name) in factors:
                if c == comp:
                    torch.testing.assert_close(ours[comp][name + ".weight"], theirs[name + ".weight"],
                                               atol=2e-6, rtol=1e-5, msg=f"{fmt} {comp}.{name}")
                    n += 1
        out[fmt] = n
    assert out["kohya"] == out["peft"] == len(factors)


def variants(m, f):
    """The same LoRA spelled in every supported format."""
    cfg = m.spec["components"]["unet"]["config"]
    sgm = {}
    for (comp, n, name), (up, down, a) in f.items():
        if comp == "unet":
            s, _ = keymap.single_file_name("unet", name + ".weight", cfg)
            k = "lora_unet_" + s[: -len(".weight")].replace(".", "_")
        else:
            k = TE_PRE[comp] + n.replace(".", "_")
        sgm |= {k + ".lora_down.weight": down, k + ".lora_up.weight": up, k + ".alpha": torch.tensor(a)}
    out = {"kohya-sgm": sgm, "kohya-diffusers": kohya_diffusers_paths(f),
           "peft": peft(f), "peft-alpha": peft(f, fold=False),
           "peft-default": peft(f, ".lora_B.default.weight", ".lora_A.default.weight"),
           "comfy-linear-layer": peft(f, ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
           "comfy-dot-lora": peft(f, ".lora.up.weight", ".lora.down.weight")}
    # ComfyUI's dotted single-file names (diffusion_model.<sgm path>)
    out["comfy-sgm-dotted"] = {k.replace("lora_unet_", "XX"): v for k, v in sgm.items()}
    dotted = {}
    for k, v in sgm.items():
        if k.startswith("lora_unet_"):
            continue
        dotted[k] = v
    for (comp, n, name), (up, down, a) in f.items():
        if comp == "unet":
            s, _ = keymap.single_file_name("unet", name + ".weight", cfg)
            k = "diffusion_model." + s[: -len(".weight")]
            dotted |= {k + ".lora_up.weight": up, k + ".lora_down.weight": down, k + ".alpha": torch.tensor(a)}
    out["comfy-sgm-dotted"] = dotted
    # the old diffusers attention-processor format (unet attention only)
    old = {}
    for (comp, n, name), (up, down, a) in f.items():
        if comp == "unet" and ".attn1." in n:
            k = "unet." + n.replace(".to_out.0", ".processor.to_out").replace(".to_", ".processor.to_")
            old |= {k + "_lora.down.weight": down, k + "_lora.up.weight": up * (a / down.shape[0])}
    out["diffusers-old"] = old
    return out


def test_every_format_same_weights(sdxl, factors, tmp_path):
    m, single, _, _ = sdxl
    exp = expected(m, factors, 1.0)
    for name, sd in variants(m, factors).items():
        lora = tmp_path / f"{name}.safetensors"
        st.save_file({k: v.contiguous() for k, v in sd.items()}, lora)
        out = tmp_path / f"out_{name}.safetensors"
        r = merge_lora(single, [lora], out)
        assert not r.loras[0].unmatched, name
        got = diffusers_state(out)
        sub = exp if name != "diffusers-old" else {
            k: v for k, v in exp.items() if k[0] == "unet" and ".attn1." in k[1]}
        assert r.loras[0].modules == len(sub), name
        assert_matches(got, sub)


def test_weight_then_minus_weight_returns_base(sdxl, factors, tmp_path):
    m, single, _, _ = sdxl
    lora = tmp_path / "l.safetensors"
    st.save_file(kohya_diffusers_paths(factors), lora)
    merge_lora(single, [f"{lora}:0.8"], tmp_path / "a.safetensors")
    merge_lora(tmp_path / "a.safetensors", [f"{lora}:-0.8"], tmp_path / "b.safetensors")
    base, back = st.load_file(single), st.load_file(tmp_path / "b.safetensors")
    assert base.keys() == back.keys()
    for k in base:
        torch.testing.assert_close(back[k], base[k], atol=1e-6, rtol=1e-5)


def test_lycoris_loha_lokr_tucker_full_and_dora(sdxl, tmp_path):
    m, single, folder, _ = sdxl
    g = torch.Generator().manual_seed(3)
    R = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    unet = m.components["unet"].state_dict()
    sd, exp = {}, {}
    # LoHa on a linear
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    w = unet[n + ".weight"]
    a1, b1, a2, b2 = R(w.shape[0], 4), R(4, w.shape[1]), R(w.shape[0], 4), R(4, w.shape[1])
    k = "lora_unet_" + n.replace(".", "_")
    sd |= {k + ".hada_w1_a": a1, k + ".hada_w1_b": b1, k + ".hada_w2_a": a2, k + ".hada_w2_b": b2,
           k + ".alpha": torch.tensor(2.0)}
    exp[n] = w + (a1 @ b1) * (a2 @ b2) * 0.5
    # LoKr (w1 full, w2 low rank) on a 3x3 conv
    n = "down_blocks.1.resnets.0.conv1"
    w = unet[n + ".weight"]                       # (32, 16, 3, 3)
    w1, w2a, w2b = R(4, 2), R(8, 2), R(2, 8 * 9)
    k = "lora_unet_" + n.replace(".", "_")
    sd |= {k + ".lokr_w1": w1, k + ".lokr_w2_a": w2a, k + ".lokr_w2_b": w2b, k + ".alpha": torch.tensor(1.0)}
    w2 = (w2a @ w2b).reshape(8, 8, 3, 3)
    exp[n] = w + torch.kron(w1[:, :, None, None], w2) * 0.5
    # LoCon with Tucker core on a 3x3 conv
    n = "down_blocks.1.resnets.0.conv2"
    w = unet[n + ".weight"]                       # (32, 32, 3, 3)
    down, mid, up = R(3, 32, 1, 1), R(3, 3, 3, 3), R(32, 3, 1, 1)
    k = "lora_unet_" + n.replace(".", "_")
    sd |= {k + ".lora_down.weight": down, k + ".lora_mid.weight": mid, k + ".lora_up.weight": up}
    full_down = torch.einsum("ajkl,ji->aikl", mid, down[:, :, 0, 0])
    exp[n] = w + torch.einsum("oa,aikl->oikl", up[:, :, 0, 0], full_down)
    # full diff + diff_b
    n = "down_blocks.1.attentions.0.proj_in"
    w = unet[n + ".weight"]
    dw, db = R(*w.shape), R(w.shape[0])
    k = "lora_unet_" + n.replace(".", "_")
    sd |= {k + ".diff": dw, k + ".diff_b": db}
    exp[n] = w + dw
    exp[n + ".BIAS"] = unet[n + ".bias"] + db
    # DoRA (kohya/LyCORIS dora_scale, input axis as LyCORIS stores it)
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    w = unet[n + ".weight"]
    up, down = R(w.shape[0], 2), R(2, w.shape[1])
    mag = w.norm(dim=0, keepdim=True) * 1.1
    k = "lora_unet_" + n.replace(".", "_")
    sd |= {k + ".lora_down.weight": down, k + ".lora_up.weight": up, k + ".dora_scale": mag,
           k + ".alpha": torch.tensor(2.0)}
    wc = w + up @ down
    exp[n] = wc * (mag / wc.norm(dim=0, keepdim=True))
    lora = tmp_path / "lyco.safetensors"
    st.save_file(sd, lora)
    for base in (single, folder):
        out = tmp_path / ("o.safetensors" if base == single else "o")
        r = merge_lora(base, [lora], out)
        assert r.loras[0].modules == 5
        got = diffusers_state(out)["unet"]
        for n, ref in exp.items():
            if n.endswith("BIAS"):
                torch.testing.assert_close(got[n[:-5] + ".bias"], ref)
            else:
                torch.testing.assert_close(got[n + ".weight"], ref, atol=1e-6, rtol=1e-5, msg=n)


def test_peft_dora_matches_diffusers(sdxl, tmp_path):
    pytest.importorskip("peft")
    m, single, _, _ = sdxl
    g = torch.Generator().manual_seed(5)
    unet = m.components["unet"].state_dict()
    sd = {}
    names = [n for n, _, w in modules(m, "unet") if ".attn2.to_" in n][:6]
    for n in names:
        w = unet[n + ".weight"]
        sd[f"unet.{n}.lora_A.weight"] = torch.randn(2, w.shape[1], generator=g) * 0.1
        sd[f"unet.{n}.lora_B.weight"] = torch.randn(w.shape[0], 2, generator=g) * 0.1
        sd[f"unet.{n}.lora_magnitude_vector"] = w.norm(dim=1) * 1.05
    lora = tmp_path / "dora.safetensors"
    st.save_file(sd, lora)
    pipe = tiny.pipeline(tiny.build("sdxl", 0))
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    merge_lora(single, [f"{lora}:0.5"], tmp_path / "o.safetensors")
    ours = diffusers_state(tmp_path / "o.safetensors")["unet"]
    theirs = pipe.unet.state_dict()
    for n in names:
        assert not torch.equal(ours[n + ".weight"], unet[n + ".weight"])
        torch.testing.assert_close(ours[n + ".weight"], theirs[n + ".weight"], atol=2e-6, rtol=1e-5)
