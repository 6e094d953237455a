"""LoRA on SD3 / SD3.5: merge-lora against diffusers' own LoRA loading + fuse, every spelling
(kohya fused qkv, diffusers/PEFT, ComfyUI, OneTrainer, SimpleTuner) to the same bytes,
extract-lora and convert-lora round trips, and SD3 <-> SDXL LoRAs refused with both names."""
from __future__ import annotations

import re

import pytest
import safetensors.torch as st
import torch
from click.testing import CliRunner

from convkit import keymap, tiny
from convkit.cli import main
from convkit.lora import convert_lora, extract_lora, merge_lora
from convkit.sources import open_source

# single-file prefix of each component -> kohya prefix (sd-scripts networks/lora_sd3.py:
# LORA_PREFIX_SD3 "lora_unet", lora_te1 CLIP-L, lora_te2 CLIP-G, lora_te3 T5)
KOHYA = {"model.diffusion_model.": ("transformer", "lora_unet_"),
         "text_encoders.clip_l.transformer.": ("text_encoder", "lora_te1_"),
         "text_encoders.clip_g.transformer.": ("text_encoder_2", "lora_te2_"),
         "text_encoders.t5xxl.transformer.": ("text_encoder_3", "lora_te3_")}
TE_PREFIX = {c: p for c, p in KOHYA.values()}
# what sd-scripts trains in the text encoders: CLIPAttention, CLIPMLP, T5Attention,
# T5DenseGatedActDense
TE_TARGETS = ("self_attn.", "mlp.", "SelfAttention.", "DenseReluDense.")
RANK, ALPHA = 4, 2.0            # scale 0.5: a power of two, so folding it into up is exact


# ------------------------------------------------------------------ reference -> diffusers
# Written out here from diffusers loaders/single_file_utils.py
# convert_sd3_transformer_checkpoint_to_diffusers (0.42.1), not taken from convkit's key map:
# qkv -> to_q/to_k/to_v (context: add_*_proj) as equal thirds; the last block's context adaLN and
# final_layer adaLN with (shift, scale) -> (scale, shift) (swap_scale_shift).
FIXED = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
         "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
         "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
         "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
         "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
         "final_layer.linear": "proj_out"}
BLOCK = {  # rest of the name -> (x_block modules, context_block modules)
    "attn.qkv": (["attn.to_q", "attn.to_k", "attn.to_v"],
                 ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    "attn.proj": (["attn.to_out.0"], ["attn.to_add_out"]),
    "attn2.qkv": (["attn2.to_q", "attn2.to_k", "attn2.to_v"], None),
    "attn2.proj": (["attn2.to_out.0"], None),
    "adaLN_modulation.1": (["norm1.linear"], ["norm1_context.linear"]),
    "mlp.fc1": (["ff.net.0.proj"], ["ff_context.net.0.proj"]),
    "mlp.fc2": (["ff.net.2"], ["ff_context.net.2"])}


def diffusers_modules(ref: str, depth: int) -> tuple[list[str], bool]:
    """(diffusers modules in row order, halves swapped) of a reference module."""
    if ref in FIXED:
        return [FIXED[ref]], False
    if ref == "final_layer.adaLN_modulation.1":
        return ["norm_out.linear"], True
    i, blk, rest = re.fullmatch(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)", ref).groups()
    mods = BLOCK[rest][blk == "context_block"]
    swap = blk == "context_block" and rest == "adaLN_modulation.1" and int(i) == depth - 1
    return [f"transformer_blocks.{i}.{m}" for m in mods], swap


def swap(t):
    a, b = t.chunk(2, 0)
    return torch.cat([b, a], 0)


# ------------------------------------------------------------------ fixtures

def make_factors(sf: dict, seed: int) -> dict:
    """(component, module) -> (up, down, alpha) for every module sd-scripts' lora_sd3.py can
    target (every Linear of the joint blocks, the embedders and final layer with emb_dims, the
    x_embedder conv) and the text encoders' attention/MLP linears."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in sf.items():
        pre = next((p for p in KOHYA if k.startswith(p)), None)
        if pre is None or not k.endswith(".weight") or w.ndim not in (2, 4):
            continue
        comp, mod = KOHYA[pre][0], k[len(pre):-len(".weight")]
        if comp != "transformer" and not any(t in mod for t in TE_TARGETS):
            continue
        down = torch.randn(RANK, *w.shape[1:], generator=g) * 0.1
        up = torch.randn(w.shape[0], RANK, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        out[(comp, mod)] = (up, down, ALPHA)
    return out


@pytest.fixture(scope="module")
def sd35l(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3lora")
    m = tiny.build("sd35_large", 0)
    base = tiny.save_single_file(m, d / "sd35_large.safetensors")
    sf = st.load_file(base)
    f = make_factors(sf, 5)
    depth = m.components["transformer"].config.num_layers
    kohya = d / "kohya.safetensors"
    st.save_file(spell(f, "kohya", depth), kohya)
    out = d / "merged_kohya.safetensors"
    res = merge_lora(base, [kohya], out)
    return m, base, sf, f, depth, kohya, out, res


def spell(f: dict, style: str, depth: int) -> dict:
    """The LoRA ``f`` written as one tool writes it.

    kohya: lora_unet_ + reference names (fused qkv), lora_te1/2/3_; comfy: diffusion_model. +
    reference names; peft: transformer./text_encoder*. + diffusers names, alpha folded into
    lora_B; peft-raw: base_model.model. (a PeftModel's state dict); onetrainer:
    lora_transformer_ + diffusers names with "_"; simpletuner: lycoris_ + the same (ComfyUI
    comfy/lora.py model_lora_keys_unet for SD3)."""
    sd = {}
    for (comp, mod), (up, down, a) in f.items():
        if comp != "transformer" or style in ("kohya", "comfy"):
            if comp != "transformer":
                names = [(TE_PREFIX[comp] + mod.replace(".", "_")) if style != "peft"
                         and style != "peft-raw" else f"{comp}.{mod}"]
            elif style == "kohya":
                names = ["lora_unet_" + mod.replace(".", "_")]
            else:
                names = ["diffusion_model." + mod]
            parts = [up]
        else:
            dmods, sw = diffusers_modules(mod, depth)
            u = swap(up) if sw else up
            parts = list(u.chunk(len(dmods), 0))
            pre = {"peft": "transformer.", "peft-raw": "base_model.model.",
                   "onetrainer": "lora_transformer_", "simpletuner": "lycoris_"}[style]
            under = style in ("onetrainer", "simpletuner")
            names = [pre + (n.replace(".", "_") if under else n) for n in dmods]
        for n, u in zip(names, parts):
            if n.startswith(("transformer.", "base_model.", "text_encoder")):
                sd |= {n + ".lora_A.weight": down, n + ".lora_B.weight": u * (a / RANK)}
            else:
                sd |= {n + ".lora_down.weight": down, n + ".lora_up.weight": u.contiguous(),
                       n + ".alpha": torch.tensor(a)}
    return {k: v.contiguous().clone() for k, v in sd.items()}


def logical_diffusers(path) -> dict:
    """A merged single file read through convkit's logical view, in diffusers names."""
    with open_source(path) as s:
        sd = {k: s.load(k) for k in s.keys()}
    return keymap.arch_to_diffusers("sd35_large", sd)


# ------------------------------------------------------------------ 1. against diffusers

def test_kohya_merge_equals_diffusers_fuse(sd35l):
    m, base, sf, f, depth, kohya, out, res = sd35l
    rep = res.loras[0]
    assert rep.unmatched == [] and rep.modules == len(f)
    comps = {c for c, _ in f}
    assert comps == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert ("transformer", f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1") in f
    got = logical_diffusers(out)

    # diffusers: SD3LoraLoaderMixin reads PEFT names only (no kohya SD3 conversion), and loads
    # transformer / text_encoder / text_encoder_2 (_lora_loadable_modules): the same LoRA in
    # PEFT names, loaded and fused by diffusers on the same tiny model
    ref_model = tiny.build_copy(m)
    pipe = tiny.pipeline(ref_model)
    peft_sd = {k: v for k, v in spell(f, "peft", depth).items()
               if not k.startswith("text_encoder_3.")}
    pipe.load_lora_weights(peft_sd)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    base_d = m.state_dicts()
    changed = 0
    for comp in ("transformer", "text_encoder", "text_encoder_2"):
        want = tiny.component_state_dict(getattr(pipe, comp))
        assert want.keys() == got[comp].keys(), comp
        for k, w in want.items():
            torch.testing.assert_close(got[comp][k], w, atol=2e-6, rtol=1e-5, msg=f"{comp} {k}")
            changed += not torch.equal(w, base_d[comp][k])
    # every LoRA-targeted diffusers weight changed (q/k/v count three times)
    n_tr = sum(len(diffusers_modules(mod, depth)[0]) for c, mod in f if c == "transformer")
    n_te = sum(1 for c, _ in f if c in ("text_encoder", "text_encoder_2"))
    assert changed == n_tr + n_te
    # the swapped halves reach the LoRA's up rows: without the swap the result is far off
    for dname, ref in ((f"transformer_blocks.{depth - 1}.norm1_context.linear",
                        f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1"),
                       ("norm_out.linear", "final_layer.adaLN_modulation.1")):
        up, down, a = f[("transformer", ref)]
        unswapped = base_d["transformer"][dname + ".weight"] + up @ down * (a / RANK)
        assert (got["transformer"][dname + ".weight"] - unswapped).abs().max() > 1e-2
    # T5 (not LoRA-loadable in diffusers' SD3 pipeline): base + alpha/rank * up @ down
    t5 = base_d["text_encoder_3"]
    for (comp, mod), (up, down, a) in f.items():
        if comp == "text_encoder_3":
            torch.testing.assert_close(got[comp][mod + ".weight"],
                                       t5[mod + ".weight"] + up @ down * (a / RANK),
                                       atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ 2. every spelling

def test_every_spelling_merges_to_the_same_bytes(sd35l, tmp_path):
    m, base, sf, f, depth, kohya, out, res = sd35l
    ref = st.load_file(out)
    for style in ("peft", "peft-raw", "comfy", "onetrainer", "simpletuner"):
        lora = tmp_path / f"{style}.safetensors"
        st.save_file(spell(f, style, depth), lora)
        o = tmp_path / f"o_{style}.safetensors"
        r = merge_lora(base, [lora], o)
        assert r.loras[0].unmatched == [], style
        got = st.load_file(o)
        assert got.keys() == ref.keys()
        bad = [k for k in ref if not torch.equal(got[k], ref[k])]
        assert not bad, (style, bad[:3])


# ------------------------------------------------------------------ 3. extract / convert

@pytest.fixture(scope="module")
def sd35m(tmp_path_factory):
    """Tiny SD3.5 medium (dual attention in block 0) and a tuned copy = base + known rank-2
    deltas on modules of every kind: a third of a fused qkv, attn2, the last block's swapped
    context adaLN, an MLP, CLIP-G and T5 linears."""
    d = tmp_path_factory.mktemp("sd35m")
    m = tiny.build("sd35_medium", 0)
    base = tiny.save_single_file(m, d / "base.safetensors")
    tuned_m = tiny.build_copy(m)
    g = torch.Generator().manual_seed(9)
    last = m.components["transformer"].config.num_layers - 1
    targets = [("transformer", "transformer_blocks.0.attn.to_k"),
               ("transformer", "transformer_blocks.0.attn2.to_v"),
               ("transformer", "transformer_blocks.0.attn.to_out.0"),
               ("transformer", f"transformer_blocks.{last}.norm1_context.linear"),
               ("transformer", f"transformer_blocks.{last}.ff.net.2"),
               ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1"),
               ("text_encoder_3", "encoder.block.0.layer.0.SelfAttention.q")]
    deltas = {}
    with torch.no_grad():
        for comp, name in targets:
            w = tuned_m.components[comp].get_submodule(name).weight
            dl = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
            dl *= 0.05
            w += dl
            deltas[(comp, name)] = dl
    tuned = tiny.save_single_file(tuned_m, d / "tuned.safetensors")
    return m, base, tuned_m, tuned, deltas, d


def test_extract_recovers_known_delta(sd35m, tmp_path):
    m, base, tuned_m, tuned, deltas, _ = sd35m
    lora = tmp_path / "x.safetensors"
    r = extract_lora(tuned, base, lora, rank=4, dtype="fp32")
    assert r.modules == len(deltas)
    keys = st.load_file(lora)
    # kohya names over the reference modules: fused qkv / attn2 qkv, lora_te2_, lora_te3_
    for k in ("lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
              "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
              "lora_te2_text_model_encoder_layers_1_mlp_fc1",
              "lora_te3_encoder_block_0_layer_0_SelfAttention_q"):
        assert k + ".lora_down.weight" in keys, k
    merged = tmp_path / "m.safetensors"
    mr = merge_lora(base, [lora], merged)
    assert mr.loras[0].unmatched == []
    with open_source(merged) as s:
        got = keymap.arch_to_diffusers("sd35_medium", {k: s.load(k) for k in s.keys()})
    want = tuned_m.state_dicts()
    for (comp, name), dl in deltas.items():
        err = (got[comp][name + ".weight"] - want[comp][name + ".weight"]).norm() / dl.norm()
        # rank-2 deltas, rank 4 extracted: the report's bound (its relative error) holds
        assert float(err) <= max(r.total_error, 1e-6) * 10 + 1e-5, (comp, name, float(err))
    assert r.total_error < 1e-5


def test_convert_kohya_diffusers_roundtrip_bit_exact(sd35m, tmp_path):
    m, base, tuned_m, tuned, deltas, _ = sd35m
    kohya = tmp_path / "k.safetensors"
    extract_lora(tuned, base, kohya, rank=4, dtype="fp32")
    peft = tmp_path / "p.safetensors"
    rp = convert_lora(kohya, peft, "peft", base=base)
    pk = st.load_file(peft)
    for n in ("transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn2.to_v",
              "transformer.transformer_blocks.1.norm1_context.linear",
              "text_encoder_2.text_model.encoder.layers.1.mlp.fc1",
              "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q"):
        assert n + ".lora_A.weight" in pk, n
    assert rp.arch == "sd35_medium"
    back = tmp_path / "k2.safetensors"
    rb = convert_lora(peft, back, "kohya", base=base)
    assert any("sharing one down factor" in n for n in rb.notes)
    a, b = st.load_file(kohya), st.load_file(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)          # the same tensors, bit for bit
    # comfy = kohya names (ComfyUI maps "lora_unet_" + every diffusion_model key)
    comfy = tmp_path / "c.safetensors"
    convert_lora(peft, comfy, "comfy", base=base)
    assert st.load_file(comfy).keys() == a.keys()
    # the converted files merge to the same bytes
    outs = []
    for i, lora in enumerate((kohya, peft, comfy)):
        o = tmp_path / f"m{i}.safetensors"
        merge_lora(base, [lora], o)
        outs.append(st.load_file(o))
    for o in outs[1:]:
        bad = [k for k in outs[0] if not torch.equal(o[k], outs[0][k])]
        assert not bad, bad[:3]


# ------------------------------------------------------------------ 4. bad input

def test_sd3_and_sdxl_loras_refused_with_both_architectures(sd35l, sdxl, tmp_path):
    _, base3, _, f, depth, kohya3, _, _ = sd35l
    _, basexl, _, _ = sdxl
    # an SDXL LoRA: kohya names over SGM paths
    sd = {}
    for name, w in st.load_file(basexl).items():
        if name.startswith("model.diffusion_model.") and name.endswith("attn1.to_q.weight"):
            k = "lora_unet_" + name[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            sd |= {k + ".lora_down.weight": torch.zeros(2, w.shape[1]),
                   k + ".lora_up.weight": torch.zeros(w.shape[0], 2)}
    assert sd
    xl_lora = tmp_path / "xl.safetensors"
    st.save_file(sd, xl_lora)
    # the SD3 LoRA's transformer modules (an SD3 LoRA as most are trained: no text encoders)
    sd3_lora = tmp_path / "sd3.safetensors"
    st.save_file({k: v for k, v in st.load_file(kohya3).items() if k.startswith("lora_unet_")},
                 sd3_lora)
    for b, lora, lora_arch, base_arch in ((basexl, sd3_lora, "sd3", "sdxl"),
                                          (base3, xl_lora, "sdxl", "sd35_large")):
        o = tmp_path / "o.safetensors"
        res = CliRunner().invoke(main, ["merge-lora", str(b), str(lora), "-o", str(o)])
        assert res.exit_code != 0
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("convkit: error:"), res.output
        msg = lines[0]
        assert re.search(rf"this LoRA is for {lora_arch}\w*", msg) and \
            f"the base is {base_arch}" in msg, msg
        assert not o.exists()
