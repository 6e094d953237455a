#!/usr/bin/env python
"""Load a checkpoint with Forge's backend loader (CPU) — developer tool, never run by tests.

    python tools/check_forge.py FORGE_DIR CHECKPOINT --source SRC_FP32.safetensors

FORGE_DIR: a stable-diffusion-webui-forge checkout with `huggingface_guess` importable (put
lllyasviel/huggingface_guess next to `backend/`).  Runs the body of `backend.loader.forge_loader`
(split_state_dict + load_huggingface_component for every component of the pipeline config) with
`--always-cpu`; it stops before the diffusion-engine object, whose text-processing import needs
the web UI's `modules.shared`.  Prints what Forge prints (Missing / Unexpected keys) and compares
the loaded UNet weights with the source (nf4 weights dequantized with bitsandbytes on CPU).

`--unet-only`: load only the diffusion-model component (`guess.unet_target`: `unet` for SD,
`transformer` for Flux).  For a transformer-only Flux file (like the released BFL
flux1-dev.safetensors) Forge needs the VAE / text encoders from separate files chosen in the UI
(`additional_state_dicts`); their loaders would only assert "You do not have VAE state dict!".
The source may carry the `model.diffusion_model.` prefix (full SD checkpoint) or not (BFL Flux
transformer file); that is detected from its keys.

Split parts (`convkit split --for forge`, docs/loaders.md "Split parts"):

    python tools/check_forge.py FORGE_DIR DIR/Stable-diffusion/NAME.safetensors --source SRC \
        --additional DIR/VAE/NAME_vae.safetensors --reference

`--additional FILE` (repeatable): the files the web UI's "VAE / Text Encoder" selection passes
(`modules/sd_models.py`: `forge_loader(state_dict, additional_state_dicts=[...])`, i.e.
`split_state_dict(ckpt, additional_state_dicts)` -> `replace_state_dict`).  `--reference`: also
load SRC alone the same way and compare every tensor of every loaded component (UNet, VAE, text
encoder) by name: bit-equal after rounding the reference to the part's dtype, max rel. RMSE.
"""
import io, json, os, sys, contextlib, argparse

ap = argparse.ArgumentParser()
ap.add_argument("forge"); ap.add_argument("ckpt"); ap.add_argument("--source", required=True)
ap.add_argument("--unet-only", action="store_true", help="load only guess.unet_target (Flux transformer-only files)")
ap.add_argument("--additional", action="append", default=[], help="external VAE / text encoder file (additional_state_dicts)")
ap.add_argument("--reference", action="store_true", help="also load --source alone and compare every component by name")
a = ap.parse_args()
sys.argv = [sys.argv[0], "--always-cpu"]
sys.path.insert(0, os.path.abspath(a.forge))
sys.path.insert(0, os.path.join(os.path.abspath(a.forge), "packages_3rdparty"))  # as modules/paths.py does
import types
import torch
# backend.loader imports the diffusion engines, whose text processing imports the web UI's
# `modules.shared.opts` at module level; the loading path run here never reads it.
_m = types.ModuleType("modules"); _m.shared = types.ModuleType("modules.shared"); _m.shared.opts = types.SimpleNamespace()
sys.modules.setdefault("modules", _m); sys.modules.setdefault("modules.shared", _m.shared)
import backend.args  # noqa
from backend import loader
from diffusers import DiffusionPipeline

buf = io.StringIO()
res = {"ckpt": os.path.basename(a.ckpt), "additional": [os.path.basename(x) for x in a.additional]}


def forge_load(ckpt, additional):
    """The body of backend.loader.forge_loader up to the engine object."""
    state_dicts, guess = loader.split_state_dict(ckpt, additional_state_dicts=additional or None)
    local_path = os.path.join(os.path.dirname(loader.__file__), "huggingface", guess.huggingface_repo)
    config = DiffusionPipeline.load_config(local_path)
    comps = {}
    for name, v in config.items():
        if isinstance(v, list) and len(v) == 2:
            if a.unet_only and name != guess.unet_target:
                continue
            comps[name] = loader.load_huggingface_component(guess, name, v[0], v[1], local_path, state_dicts.get(name))
    return state_dicts, guess, comps


try:
    with contextlib.redirect_stdout(buf):
        state_dicts, guess, comps = forge_load(a.ckpt, a.additional)
    res.update(ok=True, guess=type(guess).__name__, repo=guess.huggingface_repo,
               components={k: type(v).__name__ for k, v in comps.items() if v is not None})
    res["state_dict_sizes"] = {k: len(v) for k, v in state_dicts.items()}
    unet = comps[guess.unet_target]
    res["unet_storage_dtype"] = str(unet.storage_dtype)
    # compare with the source (diffusers names -> LDM names via huggingface_guess' map is not needed:
    # Forge's IntegratedUNet2DConditionModel uses the LDM layout)
    from safetensors import safe_open
    worst, n, kinds = (0.0, None), 0, {}
    with safe_open(a.source, "pt") as f:
        keys = set(f.keys())
        prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in keys) else ""
        for mname, mod in unet.named_modules():
            for pname, p in list(mod.named_parameters(recurse=False)):
                sk = prefix + (f"{mname}.{pname}" if mname else pname)
                if sk not in keys:
                    continue
                ref = f.get_tensor(sk).float()
                if getattr(p, "quant_state", None) is not None:   # pre-quantized 4-bit weight
                    import bitsandbytes.functional as F
                    got = F.dequantize_4bit(p.data, quant_state=p.quant_state).float().reshape(ref.shape)
                else:
                    got = p.detach().float()
                sw = getattr(mod, "scale_weight", None)   # Forge applies it in get_weight_and_bias
                if pname == "weight" and sw is not None:
                    got = got * sw.float()
                kinds[type(p).__name__ + ":" + str(p.dtype)] = kinds.get(type(p).__name__ + ":" + str(p.dtype), 0) + 1
                # norms in float64: float32 accumulation over 66M values moves the 4th digit
                rel = (torch.linalg.vector_norm(got - ref, dtype=torch.float64) / torch.linalg.vector_norm(ref, dtype=torch.float64)).item()
                n += 1
                if rel > worst[0]:
                    worst = (rel, sk)
    n_src = sum(1 for k in keys if k.startswith(prefix))
    res["weights"] = {"compared": n, "source_dm_tensors": n_src, "max_rel_rmse": worst[0], "worst": worst[1], "param_kinds": kinds}
    if a.reference:
        res["split_key_messages"] = [l[:800] for l in buf.getvalue().splitlines() if "Missing" in l or "Unexpected" in l or "StateDict" in l]
        got = {k: {n: t.detach() for n, t in m.state_dict().items()} for k, m in comps.items() if isinstance(m, torch.nn.Module)}
        res["component_classes"] = {k: type(m).__name__ for k, m in comps.items() if m is not None}
        mid = {}
        for k, m in comps.items():
            if isinstance(m, torch.nn.Module) and "vae" in k:
                for n_, mod in m.named_modules():
                    if n_.endswith("mid_block.attentions.0.to_q") or n_.endswith("mid.attn_1.q"):
                        mid[f"{k}.{n_}"] = f"{type(mod).__name__} {tuple(mod.weight.shape)}"
        res["vae_mid_attention"] = mid
        del comps
        buf2 = io.StringIO()
        with contextlib.redirect_stdout(buf2):
            _, rguess, rcomps = forge_load(a.source, [])
        cmp = {}
        for k, sd in got.items():
            rm = rcomps.get(k)
            if not isinstance(rm, torch.nn.Module):
                cmp[k] = {"error": "not in the reference"}
                continue
            rsd = rm.state_dict()
            c = {"tensors": len(sd), "reference_tensors": len(rsd), "only_in_split": sorted(set(sd) - set(rsd))[:10],
                 "only_in_reference": sorted(set(rsd) - set(sd))[:10], "bit_equal_after_rounding": 0, "not_equal": [],
                 "max_rel_rmse": 0.0, "worst": None, "dtypes": sorted({str(t.dtype) for t in sd.values()})}
            for n_, t in sd.items():
                if n_ not in rsd or not t.is_floating_point():
                    continue
                r_ = rsd[n_]
                if t.shape != r_.shape:
                    c.setdefault("shape_mismatch", []).append(f"{n_}: {tuple(t.shape)} vs {tuple(r_.shape)}")
                    continue
                if torch.equal(t.float(), r_.to(torch.float16).float()) or torch.equal(t, r_):
                    c["bit_equal_after_rounding"] += 1
                elif len(c["not_equal"]) < 10:
                    c["not_equal"].append(n_)
                rel = (torch.linalg.vector_norm(t.double() - r_.double()) / torch.linalg.vector_norm(r_.double()).clamp_min(1e-30)).item()
                if rel > c["max_rel_rmse"]:
                    c["max_rel_rmse"], c["worst"] = rel, n_
            cmp[k] = c
        res["vs_source_loaded_by_forge"] = cmp
except Exception as e:
    import traceback
    res.update(ok=False, error=f"{type(e).__name__}: {e}"[:1500], tb=traceback.format_exc()[-2500:])
out = buf.getvalue()
res["forge_key_messages"] = [l[:800] for l in out.splitlines() if "Missing" in l or "Unexpected" in l or "Detected" in l or "StateDict" in l or "pre-quant" in l]
print(json.dumps(res, indent=1, default=str))
