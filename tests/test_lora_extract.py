"""extract-lora (SVD) and the SDXL-Lightning scenario end to end; Flux name mapping; convert-lora."""
from __future__ import annotations


import safetensors.torch as st
import torch

from convkit import keymap, tiny
from convkit.lora import convert_lora, extract_lora, merge_lora, read_lora


from tests.lora_helpers import diffusers_state, peft, random_factors

SKIP = ("conv_in", "conv_out", "time_embedding", "add_embedding")


def perturb(m, seed, scale=0.01):
    """A 'tuned' copy: every extractable unet Linear/Conv weight changed (full rank)."""
    t = tiny.build_copy(m)
    g = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, mod in t.components["unet"].named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and not name.startswith(SKIP):
                mod.weight += torch.randn(mod.weight.shape, generator=g) * scale
                changed.append(name)
    return t, changed


def _assert_merge_reproduces(base_file, lora, tuned_file, out, tol=1e-5):
    """merge(BASE, LORA) equals TUNED within ``tol`` relative, tensor by tensor."""
    merge_lora(base_file, [lora], out)
    want, got = st.load_file(tuned_file), st.load_file(out)
    assert want.keys() == got.keys()
    for k in want:
        if want[k].is_floating_point():
            rel = (got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)
            assert rel < tol, k


def test_lightning_end_to_end(sdxl, tmp_path):  # noqa: F811
    """tuned 'lightning' SDXL vs its base -> full-rank LoRA -> merged into a 'custom' SDXL."""
    base_m, base_file, _, _ = sdxl
    light, changed = perturb(base_m, seed=11)
    light_file = tiny.save_single_file(light, tmp_path / "lightning.safetensors")
    custom = tiny.build("sdxl", 7)
    custom_file = tiny.save_single_file(custom, tmp_path / "custom.safetensors")
    lora = tmp_path / "lightning_lora.safetensors"
    r = extract_lora(light_file, base_file, lora, rank=4096, conv_rank=4096, dtype="fp32")
    assert r.modules == len(changed) and r.total_error < 1e-5
    assert r.skipped > 0            # the text encoders did not change
    # the extracted LoRA reproduces TUNED from BASE
    _assert_merge_reproduces(base_file, lora, light_file, tmp_path / "re.safetensors")
    # ... and carries the same delta into another model
    m = merge_lora(custom_file, [lora], tmp_path / "custom_4step.safetensors")
    assert m.loras[0].unmatched == [] and m.loras[0].modules == len(changed)
    out = diffusers_state(tmp_path / "custom_4step.safetensors")["unet"]
    cu, bu, lu = (x.components["unet"].state_dict() for x in (custom, base_m, light))
    for n in changed:
        k = n + ".weight"
        ref = cu[k] + (lu[k] - bu[k])
        assert (out[k] - ref).norm() / (lu[k] - bu[k]).norm() < 1e-5, n


def test_low_rank_extract_reports_errors(sdxl, tmp_path):  # noqa: F811
    base_m, base_file, _, _ = sdxl
    light, _ = perturb(base_m, seed=12)
    light_file = tiny.save_single_file(light, tmp_path / "l.safetensors")
    r = extract_lora(light_file, base_file, tmp_path / "r2.safetensors", rank=2,
                     dynamic="sv_fro=0.5")
    assert 0 < r.total_error < 1 and max(r.ranks.values()) <= 2
    assert r.worst(3)[0][1] >= r.worst(3)[-1][1]
    lf = read_lora(tmp_path / "r2.safetensors")
    assert all(a.keys["down"] for a in lf.adapters)
    assert lf.source.info(lf.adapters[0].keys["up"]).dtype == "F16"
    lf.close()


def test_flux_names_fused_and_split(tmp_path):
    m = tiny.build("flux_dev", 0)
    bfl = tiny.save_single_file(m, tmp_path / "flux.safetensors", layout="bfl")
    folder = tiny.save_diffusers(m, tmp_path / "flux_d")
    tr = m.components["transformer"].state_dict()
    g = torch.Generator().manual_seed(2)
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
             "transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.attn.to_v",
             "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_out",
             "norm_out.linear", "transformer_blocks.0.ff.net.0.proj"]
    sd, exp = {}, {}
    for n in names:
        w = tr[n + ".weight"]
        a, b = torch.randn(3, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], 3, generator=g) * 0.1
        sd |= {f"transformer.{n}.lora_A.weight": a, f"transformer.{n}.lora_B.weight": b}
        exp[n] = w + b @ a
    lora = tmp_path / "flux_peft.safetensors"
    st.save_file(sd, lora)
    for base, out in ((bfl, tmp_path / "o.safetensors"), (folder, tmp_path / "o_d")):
        r = merge_lora(base, [lora], out)
        assert r.loras[0].modules == len(names)
        if base == bfl:
            got = keymap.to_diffusers("flux", st.load_file(out))
        else:
            got = diffusers_state(out)["transformer"]
        for n, ref in exp.items():
            torch.testing.assert_close(got[n + ".weight"], ref, atol=1e-6, rtol=1e-5, msg=n)
    # kohya (sd-scripts Flux) names: fused qkv / linear1, into the diffusers folder
    kohya = tmp_path / "flux_kohya.safetensors"
    res = convert_lora(lora, kohya, "kohya", base=bfl)
    keys = st.load_file(kohya)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert any("stacked" in n for n in res.notes)
    merge_lora(folder, [kohya], tmp_path / "o_k")
    got = diffusers_state(tmp_path / "o_k")["transformer"]
    for n, ref in exp.items():
        torch.testing.assert_close(got[n + ".weight"], ref, atol=1e-6, rtol=1e-5, msg=n)


def test_convert_roundtrip_same_merge(sdxl, tmp_path):  # noqa: F811
    m, single, _, _ = sdxl
    f = random_factors(m, seed=4)
    src = tmp_path / "peft.safetensors"
    st.save_file(peft(f, fold=False), src)
    merge_lora(single, [src], tmp_path / "ref.safetensors")
    ref = st.load_file(tmp_path / "ref.safetensors")
    prev = src
    for fmt in ("kohya", "comfy", "peft", "kohya"):
        out = tmp_path / f"{fmt}_{prev.stem}.safetensors"
        convert_lora(prev, out, fmt, base=single)
        merge_lora(single, [out], tmp_path / f"m_{out.name}")
        got = st.load_file(tmp_path / f"m_{out.name}")
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=f"{fmt} {k}")
        prev = out
    keys = st.load_file(prev)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)   # sd-scripts SDXL names
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)


def test_lowrank_svd_within_bound_of_full(sdxl, tmp_path, monkeypatch):  # noqa: F811
    """The randomized SVD's error is within 2 % of the full SVD's (the optimum) per module, on the
    tiny model and on synthetic spectra (flat to fast-decaying); the full path stays available."""
    import convkit.lora.svd as S

    base_m, base_file, _, _ = sdxl
    light, _ = perturb(base_m, seed=12)
    light_file = tiny.save_single_file(light, tmp_path / "l.safetensors")
    calls = []
    real = S.lowrank_svd
    monkeypatch.setattr(S, "lowrank_svd", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    res = {}
    for svd in ("lowrank", "full"):
        calls.clear()
        res[svd] = extract_lora(light_file, base_file, tmp_path / f"{svd}.safetensors", rank=4,
                                conv_rank=4, svd=svd)
        assert (len(calls) > 300) if svd == "lowrank" else not calls
    lo, fu = res["lowrank"], res["full"]
    assert lo.errors.keys() == fu.errors.keys()
    for k, e in fu.errors.items():
        assert fu.errors[k] <= lo.errors[k] * (1 + 1e-5) and lo.errors[k] <= 1.02 * e, k
    assert lo.total_error <= 1.01 * fu.total_error
    g = torch.Generator().manual_seed(0)
    for shape, decay in [((512, 768), 0.0), ((512, 768), 0.5), ((768, 300), 1.0)]:
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g))
        a = (u * torch.arange(1, k + 1, dtype=torch.float32) ** -decay) @ v.t()
        for r in (8, 64):
            e = {}
            for svd in ("lowrank", "full"):
                up, down = S.factor(a, r, svd=svd)
                e[svd] = float((a - up @ down).norm())
                # the reported error (from singular values where safe) is the true one
                assert abs(S.residual(a.clone(), up, down, float(a.norm()), True) - e[svd]) \
                    <= 1e-3 * e[svd]
            # the full SVD is the optimum (to float rounding: on a flat spectrum the two agree to
            # ~1e-6, and thread counts change the last digits)
            assert e["full"] <= e["lowrank"] * (1 + 1e-5) and e["lowrank"] <= 1.02 * e["full"], \
                (shape, decay, r)


def test_svd_option_and_usage(sdxl, tmp_path):  # noqa: F811
    import pytest

    from convkit.errors import UsageError

    base_m, base_file, _, _ = sdxl
    with pytest.raises(UsageError):
        extract_lora(base_file, base_file, tmp_path / "x.safetensors", rank=4, svd="exact")


def test_extract_with_changed_text_encoders(sdxl, tmp_path):  # noqa: F811
    """Both text encoders fine-tuned too: every CLIP / OpenCLIP module is extracted once (the
    module table reaches CLIP units under two spellings) and the merge reproduces TUNED."""
    base_m, base_file, _, _ = sdxl
    tuned, changed = perturb(base_m, seed=12)
    g = torch.Generator().manual_seed(13)
    te_changed = 0
    with torch.no_grad():
        for comp in ("text_encoder", "text_encoder_2"):
            for name, mod in tuned.components[comp].named_modules():
                if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                    mod.weight += torch.randn(mod.weight.shape, generator=g) * 0.01
                    te_changed += 1
    tuned_file = tiny.save_single_file(tuned, tmp_path / "tuned.safetensors")
    lora = tmp_path / "lora.safetensors"
    r = extract_lora(tuned_file, base_file, lora, rank=4096, conv_rank=4096, dtype="fp32")
    assert r.modules == len(changed) + te_changed and r.total_error < 1e-5
    _assert_merge_reproduces(base_file, lora, tuned_file, tmp_path / "re.safetensors")
