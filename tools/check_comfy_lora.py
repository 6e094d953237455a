#!/usr/bin/env python
"""Apply convkit LoRA outputs with the REAL ComfyUI LoRA code on CPU and compare with convkit's merge.

Developer tool, never run by the tests.  Needs the venv of docs/loaders.md (ComfyUI requirements +
convkit) and a ComfyUI checkout.

Make a random test LoRA (kohya names over diffusers module paths, every UNet attention / ff / proj /
resnet conv module and every CLIP encoder-layer linear; no ComfyUI needed):

    python tools/check_comfy_lora.py --make-lora OUT.safetensors CKPT [--rank 8 --alpha 4]

Check LoRA files:

    python tools/check_comfy_lora.py COMFYUI_DIR CKPT LORA [LORA ...] [--work-dir DIR] [--json OUT]

For every LORA: ComfyUI (`comfy.sd.load_checkpoint_guess_config`, `--cpu`, fp32) loads CKPT once;
the LoRA is read with `comfy.utils.load_torch_file` and applied with
`comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)` (CLIP in fp32: `--fp32-text-enc`, since
ComfyUI's CPU default is an fp16 CLIP; --default-text-enc-dtype keeps that); every `lora key not loaded: …`
(and `NOT LOADED …`) ComfyUI logs is counted.  The patched weights are computed as ComfyUI's
`ModelPatcher.patch_weight_to_device` does (cast to `lora_compute_dtype`, `comfy.lora.calculate_weight`
on the patch list, `stochastic_rounding` to the weight dtype), without touching the shared model.
`convkit merge-lora CKPT LORA -o WORK/merged.safetensors --dtype fp32` is run in a subprocess
(one at a time; the merged file is deleted afterwards unless --keep-merged) and compared tensor by
tensor: the set ComfyUI patched vs the set convkit changed (merged != base), and per tensor
  rel_w  = ‖comfy − convkit‖ / ‖base‖
  rel_dw = ‖comfy − convkit‖ / ‖convkit − base‖   (relative to the LoRA's own delta)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- LoRA generator

def make_lora(ckpt: str, out: str, rank: int, alpha: float, seed: int = 0, scale: float = 0.05):
    import torch

    from convkit.lora.extract import extract_units
    from convkit.lora.table import table_for_source
    from convkit.lora.write import OutModule, write_lora
    from convkit.sources import open_source

    g = torch.Generator().manual_seed(seed)
    with open_source(ckpt) as src:
        table = table_for_source(src)
    seen, mods = set(), []
    # sd15 kohya naming = "lora_unet_"/"lora_te_" over diffusers/transformers module paths
    for u in extract_units(table, "kohya", conv=True, components=["unet", "text_encoder"]):
        if (u.component, u.name) in seen:      # extract_units lists CLIP units twice (see report)
            continue
        seen.add((u.component, u.name))
        r = min(rank, u.shape[0])
        down = (torch.randn(r, *u.shape[1:], generator=g) * scale).half()
        up = (torch.randn(u.shape[0], r, *([1, 1] if len(u.shape) == 4 else []), generator=g) * scale).half()
        mods.append(OutModule(u, "lora", {"up": up, "down": down}, float(alpha)))
    write_lora(out, table.arch, mods, "kohya", overwrite=True)
    kinds: dict[str, int] = {}
    for m in mods:
        k = f"{m.unit.component}:{'conv%dx%d' % m.unit.shape[2:] if len(m.unit.shape) == 4 else 'linear'}"
        kinds[k] = kinds.get(k, 0) + 1
    print(json.dumps({"lora": out, "arch": table.arch, "modules": len(mods), "rank": rank,
                      "alpha": alpha, "kinds": kinds, "bytes": os.path.getsize(out)}))


# --------------------------------------------------------------------------- ComfyUI side

NOT_LOADED = re.compile(r"^(lora key not loaded: |NOT LOADED )(.*)$")


def comfy_patched(model_patcher, lora_sd_keys):
    """key (ComfyUI state-dict name) -> fp32 weight as patch_weight_to_device would set it."""
    import torch

    import comfy.float
    import comfy.lora
    import comfy.model_management as mm
    from comfy.model_patcher import get_key_weight, string_to_seed
    dev = torch.device("cpu")
    for key in sorted(model_patcher.patches):
        weight, set_func, convert_func = get_key_weight(model_patcher.model, key)
        temp_dtype = mm.lora_compute_dtype(dev)
        temp = mm.cast_to_device(weight, dev, temp_dtype, copy=True)
        if convert_func is not None:
            temp = convert_func(temp, inplace=True)
        out = comfy.lora.calculate_weight(model_patcher.patches[key], temp, key)
        if set_func is None:
            out = comfy.float.stochastic_rounding(out, weight.dtype, seed=string_to_seed(key))
        yield key, out


def ckpt_key(component: str, key: str) -> str:
    if component == "unet":
        assert key.startswith("diffusion_model."), key
        return "model." + key
    for pre in ("clip_l.transformer.",):
        if key.startswith(pre):
            return "cond_stage_model.transformer." + key[len(pre):]
    raise KeyError(f"no checkpoint name for CLIP key {key}")


def run_merge(convkit: str, ckpt: str, lora: str, out: str) -> dict:
    t0 = time.time()
    p = subprocess.run([convkit, "merge-lora", ckpt, lora, "-o", out, "--dtype", "fp32", "--overwrite",
                        "--json", "-q"], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"merge-lora failed ({p.returncode}): {p.stderr[-2000:]}")
    try:
        res = json.loads(p.stdout)
    except Exception:
        res = {"stdout": p.stdout[-500:]}
    return {"seconds": round(time.time() - t0, 1), "result": res}


def check(a):
    from check_loaders import setup_comfy
    import torch
    from safetensors import safe_open

    cap, stub = setup_comfy(a.comfyui)
    import comfy.cli_args
    # ComfyUI keeps the CLIP in fp16 on CPU unless told otherwise (model_management.text_encoder_dtype)
    comfy.cli_args.args.fp32_text_enc = not a.default_text_enc_dtype   # = `--fp32-text-enc`
    import comfy.lora
    import comfy.sd
    import comfy.utils
    t0 = time.time()
    mp, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(a.ckpt, output_vae=False, output_clip=True)
    out = {"comfyui": a.comfyui, "ckpt": a.ckpt, "load_seconds": round(time.time() - t0, 1),
           "model_config": type(mp.model.model_config).__name__, "unet_dtype": str(mp.model.get_dtype()),
           "lora_compute_dtype": str(__import__("comfy.model_management").model_management
                                     .lora_compute_dtype(torch.device("cpu"))),
           "torchvision_stub": stub, "fp32_text_enc": comfy.cli_args.args.fp32_text_enc,
           "clip_dtype": str(clip.cond_stage_model.state_dict()["clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"].dtype), "files": {}}
    base = safe_open(a.ckpt, "pt")
    base_keys = set(base.keys())
    os.makedirs(a.work_dir, exist_ok=True)
    for lora in a.loras:
        r: dict = {}
        n0 = len(cap.records)
        lora_sd = comfy.utils.load_torch_file(lora, safe_load=True)
        r["lora_tensors"] = len(lora_sd)
        m2, c2 = comfy.sd.load_lora_for_models(mp, clip, lora_sd, 1.0, 1.0)
        nl = [NOT_LOADED.match(msg) for _, msg in cap.records[n0:]]
        nl = [(m.group(1).strip(": "), m.group(2)) for m in nl if m]
        r["keys_not_loaded"] = len([k for kind, k in nl if kind.startswith("lora key")])
        r["not_loaded_patches"] = len([k for kind, k in nl if kind.startswith("NOT")])
        r["not_loaded_examples"] = [k for _, k in nl][:20]
        r["not_loaded_all"] = [k for _, k in nl]
        r["patched_unet"] = len(m2.patches)
        r["patched_clip"] = len(c2.patcher.patches)
        # convkit merge
        merged = os.path.join(a.work_dir, "merged_" + os.path.basename(lora))
        r["convkit_merge"] = run_merge(a.convkit, a.ckpt, lora, merged)
        mf = safe_open(merged, "pt")
        # tensors convkit changed
        changed = set()
        for k in mf.keys():
            if k in base_keys:
                if not torch.equal(mf.get_tensor(k), base.get_tensor(k)):
                    changed.add(k)
        comfy_set = set()
        for comp, patcher in (("unet", m2), ("clip", c2.patcher)):
            worst_w, worst_dw, n, dmin = (0.0, None), (0.0, None), 0, float("inf")
            for key, w in comfy_patched(patcher, None):
                ck = ckpt_key(comp, key)
                comfy_set.add(ck)
                b = base.get_tensor(ck).float()
                if ck not in changed:
                    continue
                cm = mf.get_tensor(ck).float()
                d = torch.linalg.vector_norm(w.float() - cm)
                rw = (d / torch.linalg.vector_norm(b)).item()
                dn = torch.linalg.vector_norm(cm - b)
                rdw = (d / dn.clamp_min(1e-30)).item()
                dmin = min(dmin, (dn / torch.linalg.vector_norm(b)).item())   # size of the LoRA delta
                n += 1
                if rw > worst_w[0]:
                    worst_w = (rw, ck)
                if rdw > worst_dw[0]:
                    worst_dw = (rdw, ck)
            r[comp] = {"compared": n, "max_rel_w": worst_w[0], "worst_w": worst_w[1],
                       "max_rel_dw": worst_dw[0], "worst_dw": worst_dw[1],
                       "min_delta_over_w": dmin}
        r["convkit_changed"] = len(changed)
        r["comfy_patched"] = len(comfy_set)
        r["only_comfy"] = sorted(comfy_set - changed)[:50]
        r["only_convkit"] = sorted(changed - comfy_set)[:50]
        r["n_only_comfy"] = len(comfy_set - changed)
        r["n_only_convkit"] = len(changed - comfy_set)
        del mf
        if not a.keep_merged:
            os.remove(merged)
        del m2, c2, lora_sd
        out["files"][lora] = r
        summary = {k: v for k, v in r.items() if k not in ("not_loaded_all", "only_comfy", "only_convkit",
                                                             "convkit_merge")}
        print(json.dumps({os.path.basename(lora): summary}, indent=1), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--make-lora", metavar="OUT", help="write a random test LoRA for CKPT and exit")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("paths", nargs="+", help="COMFYUI_DIR CKPT LORA... (or CKPT with --make-lora)")
    ap.add_argument("--work-dir", default="/tmp/check_comfy_lora")
    ap.add_argument("--keep-merged", action="store_true")
    ap.add_argument("--convkit", default=os.path.join(os.path.dirname(sys.executable), "convkit"))
    ap.add_argument("--json")
    ap.add_argument("--default-text-enc-dtype", action="store_true",
                    help="leave ComfyUI's CPU default (fp16 CLIP) instead of --fp32-text-enc")
    a = ap.parse_args()
    if a.make_lora:
        make_lora(a.paths[0], a.make_lora, a.rank, a.alpha)
        return
    if len(a.paths) < 3:
        ap.error("need COMFYUI_DIR CKPT LORA [LORA ...]")
    a.comfyui, a.ckpt, a.loras = a.paths[0], a.paths[1], a.paths[2:]
    check(a)


if __name__ == "__main__":
    main()
