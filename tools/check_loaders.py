#!/usr/bin/env python
"""Load convkit outputs with the REAL loader code (ComfyUI, ComfyUI-GGUF) on CPU.

Developer tool, never run by the tests.  Needs a venv with ComfyUI's requirements, the `gguf`
package and convkit (see docs/loaders.md), a ComfyUI checkout and a ComfyUI-GGUF checkout.

    python tools/check_loaders.py /path/to/ComfyUI --gguf-node /path/to/ComfyUI-GGUF \
        --source bench/data/sd15_full_f32.safetensors --out-dir /work/loaders/out --stem sd15 \
        [--forward] [--json results.json]

The outputs are expected as written by the commands in docs/loaders.md
(<stem>-fp8-e4m3fn.safetensors, <stem>-fp8-scaled-sw.safetensors, <stem>-fp8-scaled-cq.safetensors,
<stem>-fp16.safetensors, <stem>-nf4.safetensors, <stem>-Q8_0.gguf, <stem>-Q4_K_S.gguf,
<stem>-sdcpp-Q8_0.gguf).  Each check runs in its own subprocess (one model load at a time);
the loaders are NOT patched: what they log as missing / unexpected / left-over keys is reported.

`--unet-only` (diffusion-model-only files, e.g. a BFL FLUX.1 transformer file without prefix):
the source is a diffusion-model file; the checks are ComfyUI `load_diffusion_model` (UNETLoader)
for <stem>-fp8-e4m3fn / -fp8-scaled-sw / -fp8-scaled-cq / -fp16 .safetensors and ComfyUI-GGUF
`UnetLoaderGGUF` for <stem>-Q8_0 / -Q4_K_S / -sdcpp-Q8_0 .gguf, for the files that exist.  The
source's key prefix (`model.diffusion_model.` or none) is taken from its keys.  With `--forward`
the source and every existing output run one diffusion-model call each (SD3/MMDiT: latent,
context and pooled `y` sized from the detected config).  The source may be a whole single file
(SD3: MMDiT + text encoders + VAE): `load_diffusion_model` keeps the diffusion model only.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
import types

KEY_LOG = re.compile(r"missing|unexpected|left ?over|error|unsupported|compatibility mode", re.I)


# --------------------------------------------------------------------------- setup (child)

class _Inert(types.ModuleType):
    """A module whose every attribute is another inert module; calling one raises."""

    __path__: list = []          # a package: `from stub.sub import X` resolves through _InertFinder

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        m = _Inert(f"{self.__name__}.{name}")
        sys.modules[m.__name__] = m
        return m

    def __call__(self, *a, **k):
        raise RuntimeError(f"stub module: {self.__name__} called (not installed here)")


class _InertFinder:
    """Meta path finder giving an _Inert module for every submodule of the stubbed roots."""

    def __init__(self, roots):
        self.roots = tuple(roots)

    def find_spec(self, fullname, path=None, target=None):
        import importlib.machinery
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return _Inert(spec.name)

    def exec_module(self, module):
        pass


def _stub_missing(roots):
    """Put inert stubs in place of the modules in ``roots`` that do not import here."""
    missing = []
    for root in roots:
        try:
            __import__(root)
        except Exception:
            for k in [k for k in sys.modules if k == root or k.startswith(root + ".")]:
                del sys.modules[k]
            missing.append(root)
    if missing:
        sys.meta_path.insert(0, _InertFinder(missing))
        for root in missing:
            sys.modules[root] = _Inert(root)
    return missing


def _stub_torchvision():
    """ComfyUI imports torchvision at module level only for Stable Cascade / Cosmos / ACE models,
    and PyAV (`av`) only for video / audio inputs (comfy_api, imported by `nodes`, which
    ComfyUI-GGUF imports). If no working torchvision / av is installed (no CPU wheel here), put an
    inert stub in its place; nothing on the image-model load path calls them."""
    import transformers  # noqa: F401  (decides 'no torchvision' before the stub exists)
    from transformers import CLIPTokenizer  # noqa: F401
    return _stub_missing(("torchvision", "av")) or False


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []

    def emit(self, record):
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        self.records.append((record.levelname, msg))


def setup_comfy(comfy_dir: str):
    sys.path.insert(0, os.path.abspath(comfy_dir))
    stubbed = _stub_torchvision()
    cap = _Capture()
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    root.addHandler(cap)
    import comfy.options  # noqa: F401  (args_parsing stays False: cli_args parses [])
    import comfy.cli_args
    comfy.cli_args.args.cpu = True          # = `python main.py --cpu`
    import comfy.model_management as mm
    assert str(mm.get_torch_device()) == "cpu", mm.get_torch_device()
    import comfy.sd  # noqa: F401
    return cap, stubbed


def import_gguf_node(gguf_dir: str):
    """Import ComfyUI-GGUF as the custom-node package ComfyUI would load."""
    spec = importlib.util.spec_from_file_location(
        "ComfyUI_GGUF", os.path.join(gguf_dir, "__init__.py"),
        submodule_search_locations=[gguf_dir])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI_GGUF"] = mod
    spec.loader.exec_module(mod)
    import ComfyUI_GGUF.nodes as nodes_mod
    import ComfyUI_GGUF.dequant as dq
    return nodes_mod, dq


# --------------------------------------------------------------------------- comparison

def _dequant(w, dq=None):
    import torch
    if dq is not None and getattr(w, "tensor_type", None) is not None:
        return dq.dequantize_tensor(w, torch.float32).reshape(w.tensor_shape).float()
    if hasattr(w, "dequantize") and type(w).__name__ == "QuantizedTensor":
        return w.dequantize().float()
    return w.detach().float()


def compare_unet(model_patcher, source: str, dq=None, prefix=None):
    """Every tensor of the loaded diffusion model (dequantized the loader's way) vs the source."""
    import torch
    from safetensors import safe_open
    dm = model_patcher.model.diffusion_model
    worst = (0.0, None)
    n = 0
    kinds: dict[str, int] = {}
    mism = []
    not_in_source = []
    with safe_open(source, "pt") as f:
        src_keys = set(f.keys())
        if prefix is None:
            prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in src_keys) else ""
        for mname, mod in dm.named_modules():
            for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                key = f"{mname}.{pname}" if mname else pname
                sk = prefix + key
                if sk not in src_keys:
                    not_in_source.append(key)
                    continue
                ref = f.get_tensor(sk).float()
                got = _dequant(p, dq)
                scale = getattr(mod, "scale_weight", None)  # legacy scaled-fp8 path (if any)
                if pname == "weight" and scale is not None and got.dtype != ref.dtype:
                    got = got * scale.float()
                if tuple(got.shape) != tuple(ref.shape):
                    mism.append(f"{key}: loaded {tuple(got.shape)} vs source {tuple(ref.shape)}")
                    continue
                # norms in float64: float32 accumulation over 66M values (Flux linear1) moves the 4th digit
                rel = (torch.linalg.vector_norm(got - ref, dtype=torch.float64) / torch.linalg.vector_norm(ref, dtype=torch.float64).clamp_min(1e-30)).item()
                n += 1
                kinds[type(p).__name__ + ":" + str(getattr(p, "tensor_type", p.dtype)).replace("GGMLQuantizationType.", "")] = \
                    kinds.get(type(p).__name__ + ":" + str(getattr(p, "tensor_type", p.dtype)).replace("GGMLQuantizationType.", ""), 0) + 1
                if rel > worst[0]:
                    worst = (rel, key)
        n_src = sum(1 for k in src_keys if k.startswith(prefix))
    return {"compared": n, "source_unet_tensors": n_src, "max_rel_rmse": worst[0], "worst": worst[1],
            "shape_mismatch": mism[:10], "param_kinds": kinds, "loaded_not_in_source": not_in_source[:20]}


def model_info(mp):
    m = mp.model
    q = next((mod for n, mod in m.diffusion_model.named_modules()
              if n.endswith("attn1.to_q") or n.endswith("double_blocks.0.img_attn.qkv")
              or n == "joint_blocks.0.x_block.attn.qkv"), None)
    return {"model_config": type(m.model_config).__name__, "model_class": type(m).__name__,
            "unet_dtype": str(m.get_dtype()) if hasattr(m, "get_dtype") else None,
            "manual_cast": str(getattr(m, "manual_cast_dtype", None)),
            "ops": None if q is None else type(q).__module__ + "." + type(q).__qualname__,
            # the shape-derived config (SD3/MMDiT: depth from x_embedder, pos_embed grid, qk norm,
            # dual-attention blocks; detect_unet_config)
            "unet_config": {k: v for k, v in getattr(m.model_config, "unet_config", {}).items()
                            if k in ("depth", "num_patches", "pos_embed_max_size", "qk_norm",
                                     "x_block_self_attn_layers", "adm_in_channels",
                                     "context_embedder_config", "in_channels", "out_channels")}}


def key_logs(cap):
    noise = re.compile(r"torchaudio missing|comfy_kitchen backend")
    return [f"{lvl}: {msg[:600]}" for lvl, msg in cap.records if KEY_LOG.search(msg) and not noise.search(msg)]


# --------------------------------------------------------------------------- checks (child)

def check_comfy_ckpt(a, path):
    cap, stub = setup_comfy(a.comfyui)
    import comfy.sd
    t0 = time.time()
    mp, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    r = {"loader": "comfy.sd.load_checkpoint_guess_config", "seconds": round(time.time() - t0, 1)}
    r.update(model_info(mp))
    r["clip"] = type(clip.cond_stage_model).__name__ if clip is not None else None
    r["vae"] = vae is not None and getattr(vae, "first_stage_model", None) is not None
    r["weights"] = compare_unet(mp, a.source)
    r["logs"] = key_logs(cap)
    r["torchvision_stub"] = stub
    return r


def check_comfy_unet(a, path):
    cap, stub = setup_comfy(a.comfyui)
    import comfy.sd
    t0 = time.time()
    mp = comfy.sd.load_diffusion_model(path)   # UNETLoader node: load_diffusion_model(path, model_options)
    r = {"loader": "comfy.sd.load_diffusion_model (UNETLoader)", "seconds": round(time.time() - t0, 1)}
    r.update(model_info(mp))
    r["weights"] = compare_unet(mp, a.source)
    r["logs"] = key_logs(cap)
    return r


def _gguf_load(a, path):
    nodes_mod, dq = import_gguf_node(a.gguf_node)
    import folder_paths
    d = os.path.dirname(os.path.abspath(path))
    folder_paths.add_model_folder_path("unet_gguf", d)
    folder_paths.add_model_folder_path("unet", d)
    (mp,) = nodes_mod.UnetLoaderGGUF().load_unet(os.path.basename(path))
    return mp, dq


def check_gguf_unet(a, path):
    cap, stub = setup_comfy(a.comfyui)
    t0 = time.time()
    mp, dq = _gguf_load(a, path)
    r = {"loader": "ComfyUI-GGUF UnetLoaderGGUF.load_unet (gguf_sd_loader + load_diffusion_model_state_dict, GGMLOps)",
         "seconds": round(time.time() - t0, 1)}
    r.update(model_info(mp))
    r["weights"] = compare_unet(mp, a.source, dq=dq)
    r["logs"] = key_logs(cap)
    return r


def _forward_inputs(mp, g):
    """Inputs of one diffusion-model call: SD UNets a 1x4x8x8 latent and a random 77x768 context;
    MMDiT (SD3) a 1xCx8x8 latent, a 16-token context and the pooled vector `y`, sized from the
    loaded model's shape-derived config."""
    import torch
    cfg = getattr(mp.model.model_config, "unet_config", {})
    if type(mp.model).__name__ == "SD3":
        ctx_in = cfg["context_embedder_config"]["params"]["in_features"]
        return (torch.randn(1, cfg.get("in_channels", 16), 8, 8, generator=g),
                {"context": torch.randn(1, 16, ctx_in, generator=g),
                 "y": torch.randn(1, cfg["adm_in_channels"], generator=g)})
    return torch.randn(1, 4, 8, 8, generator=g), {"context": torch.randn(1, 77, 768, generator=g)}


def check_forward(a, paths):
    """One diffusion-model call (t=500, seeded random inputs: `_forward_inputs`) per model;
    rel. L2 difference of each output vs the first (the source). With --unet-only every
    safetensors file is loaded by load_diffusion_model (UNETLoader)."""
    import gc
    import torch
    cap, stub = setup_comfy(a.comfyui)
    import comfy.sd
    ts = torch.tensor([500.0])
    outs = {}
    for p in paths:
        if p.endswith(".gguf"):
            mp, _ = _gguf_load(a, p)
        elif a.unet_only or "fp8" in os.path.basename(p):
            mp = comfy.sd.load_diffusion_model(p)
        else:
            mp = comfy.sd.load_checkpoint_guess_config(p, output_vae=False, output_clip=False)[0]
        dm = mp.model.diffusion_model
        dt = mp.model.get_dtype() if mp.model.manual_cast_dtype is None else mp.model.manual_cast_dtype
        x, kw = _forward_inputs(mp, torch.Generator().manual_seed(0))
        with torch.no_grad():
            outs[p] = dm(x.to(dt), ts, **{k: v.to(dt) for k, v in kw.items()}).float()
        del mp, dm
        gc.collect()
    ref = outs[paths[0]]
    res = {}
    for p in paths[1:]:
        res[os.path.basename(p)] = (torch.linalg.vector_norm(outs[p] - ref) / torch.linalg.vector_norm(ref)).item()
    return {"reference": os.path.basename(paths[0]), "rel_l2_diff": res, "logs": key_logs(cap)}


CHECKS = {"comfy_ckpt": check_comfy_ckpt, "comfy_unet": check_comfy_unet,
          "gguf_unet": check_gguf_unet, "forward": check_forward}


# --------------------------------------------------------------------------- driver (parent)

def plan(a):
    o = lambda s: os.path.join(a.out_dir, f"{a.stem}-{s}")  # noqa: E731
    if a.unet_only:
        p = [("comfy_unet", o(s + ".safetensors")) for s in ("fp16", "fp8-e4m3fn", "fp8-scaled-sw", "fp8-scaled-cq")]
        p += [("gguf_unet", o(s + ".gguf")) for s in ("Q8_0", "Q4_K_S", "sdcpp-Q8_0")]
        p = [(k, f) for k, f in p if os.path.exists(f)]
        if a.forward:
            p += [("forward", [a.source] + [f for _, f in p])]
        return p
    p = [("comfy_ckpt", a.source), ("comfy_ckpt", o("fp16.safetensors"))]
    for s in ("fp8-e4m3fn", "fp8-scaled-sw", "fp8-scaled-cq"):
        p += [("comfy_ckpt", o(s + ".safetensors")), ("comfy_unet", o(s + ".safetensors"))]
    p += [("comfy_ckpt", o("nf4.safetensors"))]
    for s in ("Q8_0", "Q4_K_S", "sdcpp-Q8_0"):
        p += [("gguf_unet", o(s + ".gguf"))]
    if a.forward:
        p += [("forward", [a.source, o("Q8_0.gguf"), o("Q4_K_S.gguf"), o("sdcpp-Q8_0.gguf"),
                           o("fp8-scaled-cq.safetensors")])]
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("comfyui", help="ComfyUI checkout")
    ap.add_argument("--gguf-node", help="ComfyUI-GGUF checkout (default: COMFYUI/custom_nodes/ComfyUI-GGUF)")
    ap.add_argument("--source", required=True, help="the fp32 source checkpoint the outputs came from")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--stem", default="sd15")
    ap.add_argument("--forward", action="store_true", help="also run one diffusion-model forward per model")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--only", help="regex: run only checks whose 'kind file' matches")
    ap.add_argument("--unet-only", action="store_true",
                    help="source and outputs are diffusion-model-only files (e.g. a Flux transformer)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--path", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.gguf_node = a.gguf_node or os.path.join(a.comfyui, "custom_nodes", "ComfyUI-GGUF")

    if a.one:  # child: one check, JSON on the last stdout line
        try:
            arg = a.path if a.one == "forward" else a.path[0]
            r = {"ok": True, **CHECKS[a.one](a, arg)}
        except Exception as e:  # a loader refusing the file is a result, not a crash of the tool
            import traceback
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                 "traceback": traceback.format_exc()[-3000:]}
        print("@@RESULT@@" + json.dumps(r, default=str))
        return 0

    results = []
    for kind, path in plan(a):
        paths = path if isinstance(path, list) else [path]
        label = f"{kind} {' '.join(os.path.basename(p) for p in paths)}"
        if a.only and not re.search(a.only, label):
            continue
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            results.append({"check": kind, "files": paths, "ok": False, "error": f"not found: {missing}"})
            continue
        cmd = [sys.executable, os.path.abspath(__file__), a.comfyui, "--gguf-node", a.gguf_node,
               "--source", a.source, "--out-dir", a.out_dir, "--stem", a.stem, "--one", kind, "--path", *paths] + (["--unet-only"] if a.unet_only else [])
        print(f"== {label}", file=sys.stderr, flush=True)
        t0 = time.time()
        cp = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in cp.stdout.splitlines() if ln.startswith("@@RESULT@@")]
        r = json.loads(line[-1][10:]) if line else {"ok": False, "error": f"exit {cp.returncode}: {cp.stderr[-2000:]}"}
        r = {"check": kind, "files": [os.path.basename(p) for p in paths], "wall_s": round(time.time() - t0, 1), **r}
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "traceback"}, default=str)[:3000], file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    bad = [r for r in results if not r.get("ok")]
    print(f"{len(results) - len(bad)} loaded, {len(bad)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
