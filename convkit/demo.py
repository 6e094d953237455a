"""``convkit demo --arch ARCH``: the conversion mechanics on a tiny random model (no renders:
a random model draws noise; the trained demo model's scenario is :mod:`convkit.demo_scenario`).

1. build a tiny model from the real diffusers/transformers classes (fixed seed) and save it as
   a single-file checkpoint in the real SGM/LDM key layout, fp32, and as a diffusers folder;
2. inspect it;
3. convert it to fp16 (and the folder too), streaming; reopen every output and check every
   tensor: names, shapes, dtypes, and values equal to a direct cast of the source (bit-exact),
   plus an fp16 -> fp32 -> fp16 lossless round trip;
4. the Lightning scenario in miniature: a "tuned" copy of the model gets a
   low-rank change, a LoRA is extracted from it, merged into a "custom" model of another seed,
   and the merged change is checked against the original one;
5. quantize the merged model (fp8, NF4, GGUF Q8_0) with every output reopened and its error
   measured.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from . import archs
from .convert import convert
from .errors import ConvkitError
from .inspection import inspect
from .sources import open_source


class DemoCheckFailed(ConvkitError, AssertionError):
    exit_code = 9


def _check_cast(src_path: Path, out_path: Path, dtype: torch.dtype) -> int:
    """Every output tensor equals the source tensor cast to ``dtype``; returns tensors checked."""
    with open_source(src_path) as a, open_source(out_path) as b:
        if a.keys() != b.keys():
            missing = set(a.keys()) ^ set(b.keys())
            raise DemoCheckFailed(f"key sets differ ({len(missing)} keys)", path=out_path)
        for k in a.keys():
            x, y = a.load(k), b.load(k)
            want = x.to(dtype) if x.is_floating_point() else x
            if y.dtype != want.dtype or y.shape != want.shape or not torch.equal(y, want):
                raise DemoCheckFailed("differs from a direct cast of the source", path=out_path,
                                      key=k)
        return len(a)


def _quiet_savers() -> None:
    """save_pretrained's own progress bars would interleave with the demo's lines."""
    try:
        import transformers.utils.logging as tlog
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover - older/newer transformers
        pass
    try:
        import diffusers.utils.logging as dlog
        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def run_demo(out_dir, arch: str = "sdxl", echo: Callable[[str], None] | None = None,
             overwrite: bool = True) -> dict:
    from . import tiny

    _quiet_savers()
    say = echo or (lambda s: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"arch": arch, "out_dir": str(out), "steps": []}

    def step(name: str, **kw):
        report["steps"].append({"step": name, **kw})

    model = tiny.build(arch, seed=0)
    layout = archs.get(arch).single_file_layout
    single = out / f"tiny-{arch}-fp32.safetensors"
    tiny.save_single_file(model, single, dtype=torch.float32, layout=layout)
    folder = out / f"tiny-{arch}-diffusers"
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    tiny.save_diffusers(model, folder)
    say(f"built tiny {arch} from {model.pipeline_class_name} components "
        f"({sum(model.param_counts().values()):,d} params): {single.name}, {folder.name}/")
    step("build", single=str(single), folder=str(folder), params=model.param_counts())

    info = inspect(single)
    comps = ", ".join(f"{c} {v['tensors']}" for c, v in info["components"].items())
    say(f"inspect: {info['architecture']} / {info['layout']}; {info['tensors']} tensors ({comps})")
    if info["architecture"] != archs.get(arch).name:
        raise DemoCheckFailed(f"detected as {info['architecture']}, built as {arch}", path=single)
    step("inspect", architecture=info["architecture"], layout=info["layout"],
         components={c: v["tensors"] for c, v in info["components"].items()})

    fp16 = out / f"tiny-{arch}-fp16.safetensors"
    r = convert(single, fp16, "fp16", overwrite=overwrite)
    n = _check_cast(single, fp16, torch.float16)
    say(f"convert fp32 -> fp16: {fp16.name} ({fp16.stat().st_size:,d} B, "
        f"{single.stat().st_size / fp16.stat().st_size:.2f}x smaller); {n} tensors verified")
    step("convert", dtype="fp16", output=str(fp16), tensors_verified=n, bytes=fp16.stat().st_size)

    back32 = out / f"tiny-{arch}-fp16-to-fp32.safetensors"
    again16 = out / f"tiny-{arch}-fp16-roundtrip.safetensors"
    convert(fp16, back32, "fp32", overwrite=overwrite)
    convert(back32, again16, "fp16", overwrite=overwrite)
    _check_cast(fp16, back32, torch.float32)
    n = _check_cast(fp16, again16, torch.float16)
    say(f"round trip fp16 -> fp32 -> fp16: bit-exact on {n} tensors")
    step("roundtrip", tensors_verified=n)

    unet = out / f"tiny-{arch}-unet-bf16.safetensors"
    r = convert(single, unet, "bf16", components="unet", overwrite=overwrite)
    say(f"convert --components unet --dtype bf16: {unet.name} ({len(r.plan.items)} tensors)")
    step("convert-unet", output=str(unet), tensors=len(r.plan.items))

    folder16 = out / f"tiny-{arch}-diffusers-fp16"
    convert(folder, folder16, "fp16", overwrite=overwrite)
    n = _check_cast(folder, folder16, torch.float16)
    say(f"convert diffusers folder -> fp16 folder: {folder16.name}/ ({n} tensors verified)")
    step("convert-folder", output=str(folder16), tensors_verified=n)

    merged = _lightning_demo(model, out, say, step)
    _quantize_demo(merged, arch, out, say, step)

    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["ok"] = True
    say(f"demo ok in {report['seconds']} s; files in {out}/")
    return report


def _lightning_demo(model, out: Path, say, step) -> Path:
    """Extract a LoRA from tuned - base, merge it into another model, check the change."""
    import safetensors.torch as st

    from . import tiny
    from .lora import extract_lora, merge_lora

    base = out / "lightning-base.safetensors"
    tuned = out / "lightning-tuned.safetensors"
    custom = out / "custom.safetensors"
    sd = tiny.state_dict_single_file(model)
    tiny.save_single_file(model, base)
    g = torch.Generator().manual_seed(1234)
    changed = {}
    for k, w in sd.items():
        if k.startswith("model.diffusion_model.") and w.ndim == 2 and "attn" in k \
                and k.endswith("weight") and "norm" not in k:
            u = torch.randn(w.shape[0], 4, generator=g) * 0.05
            v = torch.randn(4, w.shape[1], generator=g) * 0.05
            changed[k] = w + u @ v
    tiny.save_state_dict({k: changed.get(k, v).contiguous() for k, v in sd.items()}, tuned)
    lora = out / "lightning-lora.safetensors"
    ex = extract_lora(tuned, base, lora, rank=8, dtype="fp32", overwrite=True)
    say(f"extract-lora tuned - base, rank 8: {ex.modules} modules, "
        f"relative reconstruction error {ex.total_error:.1e}")
    tiny.save_single_file(tiny.build(model.arch, seed=7), custom)
    merged = out / "custom-lightning.safetensors"
    mr = merge_lora(custom, [f"{lora}:1.0"], merged, overwrite=True)
    cus, mer = st.load_file(str(custom)), st.load_file(str(merged))
    worst = 0.0
    for k, w in changed.items():
        want = w - sd[k]
        got = mer[k] - cus[k]
        worst = max(worst, float((got - want).norm() / want.norm()))
    if worst > 1e-4:
        raise DemoCheckFailed(f"merged change differs from the tuned change by {worst:.2e}",
                              path=merged)
    touched = sum(r.modules for r in mr.loras)
    say(f"merge-lora into custom (seed 7): {touched} modules; merged change equals the tuned "
        f"change within {worst:.1e} relative")
    step("lightning", lora=str(lora), modules=ex.modules, extract_error=ex.total_error,
         merged=str(merged), worst_rel_error=worst)
    return merged


def _quantize_demo(merged: Path, arch: str, out: Path, say, step) -> None:
    from .quantize import quantize

    for target, name in (("fp8-e4m3fn", "fp8.safetensors"), ("nf4", "nf4.safetensors"),
                         ("gguf:Q8_0", "Q8_0.gguf")):
        dst = out / f"custom-lightning-{name}"
        r = quantize(merged, dst, target, overwrite=True)
        summary = r.report.summary(3)
        rel = summary.get("rel_rmse")
        say(f"quantize {target}: {dst.name} ({dst.stat().st_size:,d} B), reopened and checked; "
            f"relative RMSE {rel:.4f}" if rel is not None else f"quantize {target}: {dst.name}")
        step("quantize", target=target, output=str(dst), rel_rmse=rel,
             bytes=dst.stat().st_size)
        _readback_demo(merged, dst, summary, out, say, step)


def _readback_demo(merged: Path, quantized: Path, summary: dict, out: Path, say, step) -> None:
    """A quantized output is an input again: converted back to fp16 through the logical-weights
    view, it holds the dequantized values (none of the scales / quant states / GGUF records)
    and is within the error its own report states."""
    from .sources import open_raw

    back = out / f"{quantized.stem}-to-fp16.safetensors"
    convert(quantized, back, "fp16", overwrite=True)
    with open_source(quantized) as q, open_source(back) as b, open_source(merged) as m:
        if set(b.keys()) != set(q.keys()):
            raise DemoCheckFailed("key set differs from the quantized file's logical keys",
                                  path=back)
        worst = 0.0
        for k in b.keys():
            got, want = b.load(k), q.load(k)
            if got.dtype != (torch.float16 if want.is_floating_point() else want.dtype) or \
                    not torch.equal(got, want.to(got.dtype)):
                raise DemoCheckFailed("differs from the dequantized value cast to fp16",
                                      path=back, key=k)
            src_k = k if k in m else "model.diffusion_model." + k
            if want.is_floating_point() and src_k in m and want.numel() > 1:
                ref = m.load(src_k).float()
                n = float(ref.pow(2).mean().sqrt()) or 1.0
                worst = max(worst, float((want - ref).pow(2).mean().sqrt()) / n)
    bound = summary.get("max_rel_rmse") or 0.0
    if worst > bound * 1.001 + 1e-12:
        raise DemoCheckFailed(f"read back with error {worst:.4g}, above the {bound:.4g} its "
                              "report states", path=back)
    with open_raw(back) as r:
        kinds = sorted({r.info(k).dtype for k in r.keys()})
        stale = [k for k in r.metadata if k.startswith(("convkit.quant", "comfy.gguf."))]
    if stale:
        raise DemoCheckFailed(f"storage metadata carried into a float file: {stale[:3]}",
                              path=back)
    say(f"  read back {quantized.name} -> {back.name}: dequantized ({', '.join(kinds)}), no "
        f"auxiliary tensors; worst error {worst:.4f} <= {bound:.4f} stated")
    step("readback", source=str(quantized), output=str(back), worst_rel_rmse=worst)
