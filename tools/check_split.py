#!/usr/bin/env python
"""Load the parts `convkit split --for comfyui` wrote with ComfyUI's own loaders (CPU).

Developer tool, never run by the tests.  Same venv and ComfyUI checkout as tools/check_loaders.py
(see docs/loaders.md, "Split parts (convkit split)").

    python tools/check_split.py /path/to/ComfyUI --split DIR --source SRC.safetensors \
        [--arch sd15|sdxl] [--unet-dtype fp16] [--only REGEX] [--json results.json]

DIR is the -o folder of `convkit split SRC -o DIR --for comfyui` (diffusion_models/, text_encoders/,
vae/); SRC is the full single-file checkpoint it was split from.  Each check runs in its own
subprocess (one model at a time); ComfyUI is not patched: its missing / unexpected / left-over key
messages are captured from its log.

* unet: `comfy.sd.load_diffusion_model` (the UNETLoader node) on diffusion_models/*.safetensors;
  every loaded diffusion-model tensor vs the source tensor of the same name
  (`model.diffusion_model.` + name).  `--unet-dtype fp16` passes model_options={"dtype": fp16}
  (the code path of UNETLoader's weight_dtype option; only to save memory: ComfyUI's CPU default
  would upcast the SDXL UNet to 10 GB of fp32).  `--forward` (sd15): one UNet call vs the full
  checkpoint loaded by `load_checkpoint_guess_config` with its weights rounded to the part's dtype.
* clip: `comfy.sd.load_clip` on text_encoders/*_clip_l (sd15, type stable_diffusion) or
  *_clip_l + *_clip_g (sdxl, type sdxl = DualCLIPLoader); `detect_te_model` per file.  Reference:
  the full checkpoint's CLIP from `load_checkpoint_guess_config(SRC, output_model=False)`, i.e.
  ComfyUI's own mapping of the single-file names (`clip_text_transformers_convert`, which
  transposes the OpenCLIP `text_projection`).  Every tensor of both `cond_stage_model`s is compared
  by name, a few directly with the source tensors, and both encode the same prompt
  (`encode_from_tokens(..., return_pooled=True)`).
* vae: `comfy.sd.VAE(sd=load_torch_file(vae/*.safetensors))` (the VAELoader node); every tensor vs
  `first_stage_model.` + name in the source; the mid-block attention modules' type and weight
  shape; one decode of a 1x4x8x8 latent vs the full checkpoint's VAE (weights rounded to the
  part's dtype, and as loaded).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_loaders as CL  # noqa: E402  (setup_comfy, key_logs, compare_unet, model_info)

PROMPT = "a photograph of an astronaut riding a horse"


def _one(pattern):
    hits = sorted(glob.glob(pattern))
    if len(hits) != 1:
        raise SystemExit(f"expected one file for {pattern}, found {hits}")
    return hits[0]


def _rel(a, b):
    import torch
    return (torch.linalg.vector_norm((a.double() - b.double())) /
            torch.linalg.vector_norm(b.double()).clamp_min(1e-30)).item()


def _part_dtype(path):
    """The float dtype the part was written in (first float tensor)."""
    import torch
    from safetensors import safe_open
    m = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    with safe_open(path, "pt") as f:
        for k in f.keys():
            dt = f.get_slice(k).get_dtype()
            if dt in m:
                return m[dt]
    return torch.float32


def compare_named(named, source, prefix, part_dtype):
    """named: (name, tensor) from the loaded model; source key = prefix + name.  Returns the
    count, the max rel. RMSE vs the fp32 source, and how many are bit-equal to the source tensor
    rounded to the part's dtype (what an exact mapping gives)."""
    import torch
    from safetensors import safe_open
    n, exact, worst, not_exact, missing_src, mism = 0, 0, (0.0, None), [], [], []
    with safe_open(source, "pt") as f:
        keys = set(f.keys())
        for name, t in named:
            sk = prefix + name
            if sk not in keys:
                missing_src.append(name)
                continue
            ref = f.get_tensor(sk)
            got = CL._dequant(t)
            if tuple(got.shape) != tuple(ref.shape):
                mism.append(f"{name}: loaded {tuple(got.shape)} vs source {tuple(ref.shape)}")
                continue
            n += 1
            r = _rel(got.float(), ref.float())
            if r > worst[0]:
                worst = (r, name)
            if torch.equal(got.to(part_dtype), ref.to(part_dtype)):
                exact += 1
            else:
                not_exact.append(name)
    return {"compared": n, "bit_equal_to_source_in_part_dtype": exact, "not_bit_equal": not_exact[:10],
            "max_rel_rmse_vs_fp32_source": worst[0], "worst": worst[1], "shape_mismatch": mism[:10],
            "loaded_not_in_source": missing_src[:10]}


def _round_params(module, dtype):
    import torch
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype).to(p.dtype)


# --------------------------------------------------------------------------- checks (child)

def check_unet(a):
    import torch
    cap, stub = CL.setup_comfy(a.comfyui)
    import comfy.sd
    path = _one(os.path.join(a.split, "diffusion_models", "*.safetensors"))
    opts = {"dtype": getattr(torch, a.unet_dtype)} if a.unet_dtype else {}
    t0 = time.time()
    mp = comfy.sd.load_diffusion_model(path, model_options=opts)
    r = {"loader": "comfy.sd.load_diffusion_model (UNETLoader)", "file": os.path.relpath(path, a.split),
         "model_options": {k: str(v) for k, v in opts.items()}, "seconds": round(time.time() - t0, 1)}
    r.update(CL.model_info(mp))
    dm = mp.model.diffusion_model
    pdt = _part_dtype(path)
    named = list(dm.state_dict().items())
    r["weights"] = compare_named(named, a.source, "model.diffusion_model.", pdt)
    from safetensors import safe_open
    with safe_open(a.source, "pt") as f:
        r["weights"]["source_unet_tensors"] = sum(1 for k in f.keys() if k.startswith("model.diffusion_model."))
    r["logs"] = CL.key_logs(cap)
    if a.forward:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=g)
        if a.arch != "sd15":
            raise SystemExit("--forward: sd15 only (an SDXL call also needs the ADM vector y)")
        ctx = torch.randn(1, 77, 768, generator=g)
        ts = torch.tensor([500.0])
        dt = mp.model.get_dtype() if mp.model.manual_cast_dtype is None else mp.model.manual_cast_dtype
        with torch.no_grad():
            out = dm(x.to(dt), ts, context=ctx.to(dt)).float()
        del mp, dm
        ref = comfy.sd.load_checkpoint_guess_config(a.source, output_vae=False, output_clip=False)[0]
        rdm = ref.model.diffusion_model
        rdt = ref.model.get_dtype() if ref.model.manual_cast_dtype is None else ref.model.manual_cast_dtype
        with torch.no_grad():
            ref_out = rdm(x.to(rdt), ts, context=ctx.to(rdt)).float()
            _round_params(rdm, pdt)
            ref_out_r = rdm(x.to(rdt), ts, context=ctx.to(rdt)).float()
        r["forward"] = {"vs_full_checkpoint": _rel(out, ref_out),
                        f"vs_full_checkpoint_weights_rounded_to_{str(pdt)[6:]}": _rel(out, ref_out_r),
                        "max_abs_vs_rounded": (out - ref_out_r).abs().max().item()}
    return r


SOURCE_PAIRS = {
    # (loaded cond_stage_model key, source key, transform) - a few tensors straight from the source
    "sd15": [
        ("clip_l.transformer.text_model.embeddings.token_embedding.weight",
         "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", None),
        ("clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
         "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", None),
        ("clip_l.transformer.text_model.final_layer_norm.weight",
         "cond_stage_model.transformer.text_model.final_layer_norm.weight", None),
    ],
    "sdxl": [
        ("clip_l.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
         "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight", None),
        ("clip_g.transformer.text_projection.weight", "conditioner.embedders.1.model.text_projection", "T"),
        ("clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
         "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "rows0"),
        ("clip_g.transformer.text_model.encoder.layers.31.self_attn.v_proj.bias",
         "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias", "rows2"),
        ("clip_g.transformer.text_model.embeddings.position_embedding.weight",
         "conditioner.embedders.1.model.positional_embedding", None),
        ("clip_g.transformer.text_model.final_layer_norm.bias", "conditioner.embedders.1.model.ln_final.bias", None),
    ],
}


def check_clip(a):
    import torch
    cap, stub = CL.setup_comfy(a.comfyui)
    import comfy.sd
    import comfy.utils
    te = os.path.join(a.split, "text_encoders")
    if a.arch == "sd15":
        paths, ctype = [_one(os.path.join(te, "*_clip_l.safetensors"))], comfy.sd.CLIPType.STABLE_DIFFUSION
    else:
        paths = [_one(os.path.join(te, "*_clip_l.safetensors")), _one(os.path.join(te, "*_clip_g.safetensors"))]
        # DualCLIPLoader(type="sdxl"): getattr(CLIPType, "SDXL", CLIPType.STABLE_DIFFUSION) (nodes.py)
        ctype = getattr(comfy.sd.CLIPType, "SDXL", comfy.sd.CLIPType.STABLE_DIFFUSION)
    detected = {}
    for p in paths:
        sd = comfy.utils.load_torch_file(p, safe_load=True)
        detected[os.path.basename(p)] = comfy.sd.detect_te_model(sd).name
        del sd
    t0 = time.time()
    clip = comfy.sd.load_clip(paths, clip_type=ctype)   # CLIPLoader / DualCLIPLoader
    r = {"loader": f"comfy.sd.load_clip({len(paths)} files, clip_type={ctype.name})", "files": [os.path.relpath(p, a.split) for p in paths],
         "detect_te_model": detected, "clip_class": type(clip.cond_stage_model).__name__,
         "seconds": round(time.time() - t0, 1)}
    r["split_logs"] = CL.key_logs(cap)
    n_logs = len(cap.records)
    got = clip.cond_stage_model.state_dict()
    r["loaded_dtypes"] = sorted({str(v.dtype) for v in got.values()})
    # a few tensors straight from the source
    from safetensors import safe_open
    direct = []
    with safe_open(a.source, "pt") as f:
        for lk, sk, how in SOURCE_PAIRS[a.arch]:
            s = f.get_tensor(sk)
            if how == "T":
                s = s.T
            elif how and how.startswith("rows"):
                i = int(how[4:]); n = s.shape[0] // 3
                s = s[i * n:(i + 1) * n]
            g = got[lk]
            d = {"loaded": lk, "source": sk + (f" ({how})" if how else ""), "shape": list(g.shape),
                 "bit_equal_in_loaded_dtype": torch.equal(g, s.to(g.dtype)),
                 "rel_vs_fp32_source": _rel(g.float(), s.float())}
            if how == "T":
                d["rel_vs_untransposed_source"] = _rel(g.float(), s.T.float())
            direct.append(d)
    r["direct_vs_source"] = direct
    # reference: the full checkpoint through ComfyUI's own single-file mapping
    ref = comfy.sd.load_checkpoint_guess_config(a.source, output_vae=False, output_clip=True, output_model=False)[1]
    r["reference"] = {"loader": "load_checkpoint_guess_config(output_model=False)",
                      "clip_class": type(ref.cond_stage_model).__name__,
                      "logs": CL.key_logs(type("C", (), {"records": cap.records[n_logs:]})())}
    rsd = ref.cond_stage_model.state_dict()
    diff = {k: (got[k].float() - rsd[k].float()).abs().max().item() for k in got if k in rsd and got[k].shape == rsd[k].shape}
    r["vs_full_checkpoint"] = {
        "tensors": len(got), "reference_tensors": len(rsd), "compared": len(diff),
        "only_in_split": sorted(set(got) - set(rsd))[:10], "only_in_reference": sorted(set(rsd) - set(got))[:10],
        "shape_mismatch": [k for k in got if k in rsd and got[k].shape != rsd[k].shape][:10],
        "max_abs_diff": max(diff.values()) if diff else None,
        "not_equal": [k for k, v in diff.items() if v != 0][:10]}
    tp = "clip_g.transformer.text_projection.weight"
    if tp in got:
        r["vs_full_checkpoint"]["text_projection_equal"] = torch.equal(got[tp], rsd[tp])
    # forward: same tokens through both
    outs = {}
    for name, c in (("split", clip), ("full", ref)):
        tokens = c.tokenize(PROMPT)
        with torch.no_grad():
            cond, pooled = c.encode_from_tokens(tokens, return_pooled=True)
        outs[name] = (cond.float(), pooled.float() if pooled is not None else None)
    fw = {"cond_shape": list(outs["split"][0].shape), "cond_rel_diff": _rel(outs["split"][0], outs["full"][0]),
          "cond_max_abs": (outs["split"][0] - outs["full"][0]).abs().max().item()}
    if outs["split"][1] is not None:
        fw.update(pooled_shape=list(outs["split"][1].shape), pooled_rel_diff=_rel(outs["split"][1], outs["full"][1]),
                  pooled_max_abs=(outs["split"][1] - outs["full"][1]).abs().max().item())
    r["forward"] = fw
    return r


def check_vae(a):
    import torch
    cap, stub = CL.setup_comfy(a.comfyui)
    import comfy.sd
    import comfy.utils
    path = _one(os.path.join(a.split, "vae", "*.safetensors"))
    t0 = time.time()
    sd = comfy.utils.load_torch_file(path)
    vae = comfy.sd.VAE(sd=sd)     # VAELoader.load_vae
    r = {"loader": "comfy.sd.VAE(sd=load_torch_file(...)) (VAELoader)", "file": os.path.relpath(path, a.split),
         "seconds": round(time.time() - t0, 1), "vae_dtype": str(vae.vae_dtype),
         "model_class": type(vae.first_stage_model).__name__}
    m = vae.first_stage_model
    pdt = _part_dtype(path)
    r["weights"] = compare_named(list(m.state_dict().items()), a.source, "first_stage_model.", pdt)
    mid = {}
    for n, mod in m.named_modules():
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)$", n):
            mid[n] = f"{type(mod).__name__} {tuple(mod.weight.shape)}"
    r["mid_attention"] = mid
    r["split_logs"] = CL.key_logs(cap)
    n_logs = len(cap.records)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        out = vae.decode(lat).float()
    del vae, m, sd
    ref = comfy.sd.load_checkpoint_guess_config(a.source, output_vae=True, output_clip=False, output_model=False)[2]
    with torch.no_grad():
        ref_out = ref.decode(lat).float()
        _round_params(ref.first_stage_model, pdt)
        ref_out_r = ref.decode(lat).float()
    r["forward"] = {"decode_shape": list(out.shape), "vs_full_checkpoint": _rel(out, ref_out),
                    f"vs_full_checkpoint_weights_rounded_to_{str(pdt)[6:]}": _rel(out, ref_out_r),
                    "max_abs_vs_rounded": (out - ref_out_r).abs().max().item()}
    r["reference_logs"] = CL.key_logs(type("C", (), {"records": cap.records[n_logs:]})())
    return r


CHECKS = {"unet": check_unet, "clip": check_clip, "vae": check_vae}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("comfyui", help="ComfyUI checkout")
    ap.add_argument("--split", required=True, help="the -o folder of convkit split --for comfyui")
    ap.add_argument("--source", required=True, help="the full checkpoint it was split from")
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--unet-dtype", choices=["float16", "bfloat16", "float32"],
                    help="model_options dtype for load_diffusion_model (default: ComfyUI's)")
    ap.add_argument("--forward", action="store_true", help="unet: one forward vs the full checkpoint (sd15)")
    ap.add_argument("--only", help="regex on the check names (unet, clip, vae)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        try:
            r = {"ok": True, **CHECKS[a.one](a)}
        except Exception as e:  # a loader refusing the file is a result
            import traceback
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
        print("@@RESULT@@" + json.dumps(r, default=str))
        return 0
    results = []
    for kind in CHECKS:
        if a.only and not re.search(a.only, kind):
            continue
        cmd = [sys.executable, os.path.abspath(__file__), a.comfyui, "--split", a.split, "--source", a.source,
               "--arch", a.arch, "--one", kind] + (["--unet-dtype", a.unet_dtype] if a.unet_dtype else []) \
            + (["--forward"] if a.forward else [])
        print(f"== {kind}", file=sys.stderr, flush=True)
        t0 = time.time()
        cp = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in cp.stdout.splitlines() if ln.startswith("@@RESULT@@")]
        r = json.loads(line[-1][10:]) if line else {"ok": False, "error": f"exit {cp.returncode}: {cp.stderr[-2000:]}"}
        r = {"check": kind, "arch": a.arch, "wall_s": round(time.time() - t0, 1), **r}
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "traceback"}, default=str, indent=1)[:6000], file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    bad = [r for r in results if not r.get("ok")]
    print(f"{len(results) - len(bad)} loaded, {len(bad)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
