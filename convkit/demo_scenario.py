"""``convkit demo`` on the trained demo model: the Lightning release, in miniature, verified.

The demo model (``convkit/tiny/demo/``, trained here by tools/train_demo.py) is a tiny
SDXL-architecture pipeline that draws one coloured shape on a coloured background. It comes as
a base checkpoint (SGM single file, fp16) and two UNets in diffusers names: a "custom"
fine-tune (outlined shapes on striped backgrounds) and a "lightning" model distilled from the
base to draw in 4 steps. The demo does what a publisher of a Lightning merge does:

1. assemble the custom and lightning checkpoints (base text encoders and VAE + their UNet);
2. extract the Lightning LoRA (lightning - base) and merge it into the custom model;
3. convert and quantize the merge: fp16 -> fp32 (lossless), fp8, NF4, GGUF Q8_0 and Q4_K;
4. verify, with two reports and contact sheets: the merge at 4 steps, guidance 0 must render
   like the custom model at 25 steps, guidance 5 (the ``lora`` gate) and not like the custom
   model at 4 steps without the LoRA (the LoRA took); every variant must pass its gate against
   the merge. The demo fails (exit 9) when any of these fails.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from .errors import ConvkitError, UsageError

from .tiny import DEMO_DIR
DEMO_FILES = ("base.safetensors", "custom_unet.safetensors", "lightning_unet.safetensors",
              "demo.json")
LORA_RANK = 32


class DemoCheckFailed(ConvkitError, AssertionError):
    exit_code = 9


def demo_available(model_dir: Path | None = None) -> bool:
    d = Path(model_dir or DEMO_DIR)
    return all((d / f).is_file() for f in DEMO_FILES)


def demo_spec(model_dir: Path | None = None) -> dict:
    return json.loads((Path(model_dir or DEMO_DIR) / "demo.json").read_text())


def with_unet(base: Path, unet_file: Path, out: Path, unet_config: dict) -> Path:
    """``base`` with its UNet replaced by ``unet_file``'s (diffusers names), SGM names."""
    import safetensors.torch as st

    from . import keymap
    from .tiny import save_state_dict

    from .sources import open_raw

    sd = st.load_file(str(base))
    unet = keymap.arch_to_single_file("sdxl", {"unet": st.load_file(str(unet_file))},
                                      layout="sgm", configs={"unet": unet_config})
    with open_raw(base) as src:
        meta = dict(src.metadata)
    meta["modelspec.title"] = f"convkit demo {unet_file.stem.split('_')[0]}"
    merged = {k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.")}
    merged.update(unet)
    return save_state_dict(merged, out, meta)


def reads_as(img, caption: str) -> dict:
    """Whether a render shows its caption's colours (convkit.tiny.world.measure)."""
    from .tiny import world

    words = caption.split()
    want_colour, want_bg = words[1], words[-2]
    m = world.measure(img)
    return {"colour": m["colour"] == want_colour, "background": m["background"] == want_bg}


def run_scenario(out_dir, echo: Callable[[str], None] | None = None,
                 model_dir: Path | None = None) -> dict:
    from .convert import convert
    from .inspection import inspect
    from .lora import extract_lora, merge_lora
    from .quantize import quantize
    from .verify import verify

    say = echo or (lambda s: None)
    model_dir = Path(model_dir or DEMO_DIR)
    if not demo_available(model_dir):
        raise UsageError(f"the demo model is not in {model_dir}",
                         hint="reinstall convkit, or train it: python tools/train_demo.py")
    spec = demo_spec(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"model": str(model_dir), "out_dir": str(out), "steps": []}

    def step(name: str, **kw):
        report["steps"].append({"step": name, **kw})

    base = out / "base.safetensors"
    shutil.copyfile(model_dir / "base.safetensors", base)
    custom = with_unet(base, model_dir / "custom_unet.safetensors", out / "custom.safetensors",
                       spec["components"]["unet"])
    lightning = with_unet(base, model_dir / "lightning_unet.safetensors",
                          out / "lightning.safetensors", spec["components"]["unet"])
    info = inspect(base)
    params = sum(v["params"] for v in info["components"].values())
    say(f"demo model: {info['architecture_title']}, {params:,d} params, "
        f"{base.stat().st_size / 1e6:.1f} MB fp16 ({info['layout']}); custom and lightning "
        "checkpoints assembled")
    step("inspect", architecture=info["architecture"], layout=info["layout"], params=params)

    lora = out / "lightning-lora.safetensors"
    ex = extract_lora(lightning, base, lora, rank=LORA_RANK, overwrite=True)
    say(f"extract-lora lightning - base, rank {LORA_RANK}: {ex.modules} modules, relative "
        f"error {ex.total_error:.3f}")
    step("extract-lora", output=str(lora), modules=ex.modules, error=ex.total_error)
    merged = out / "custom-lightning.safetensors"
    mr = merge_lora(custom, [f"{lora}:1.0"], merged, overwrite=True)
    say(f"merge-lora into custom: {sum(r.modules for r in mr.loras)} modules")
    step("merge-lora", output=str(merged))

    variants = []
    fp32 = out / "custom-lightning-fp32.safetensors"
    convert(merged, fp32, "fp32", overwrite=True)
    variants.append(fp32)
    for target, name in (("fp8-e4m3fn", "fp8.safetensors"), ("nf4", "nf4.safetensors"),
                         ("gguf:Q8_0", "Q8_0.gguf"), ("gguf:Q4_K", "Q4_K.gguf")):
        dst = out / f"custom-lightning-{name}"
        r = quantize(merged, dst, target, overwrite=True)
        variants.append(dst)
        rel = r.report.summary(3).get("rel_rmse")
        step("quantize", target=target, output=str(dst), bytes=dst.stat().st_size, rel_rmse=rel)
    say("variants: " + ", ".join(f"{v.name} ({v.stat().st_size / 1e6:.1f} MB)"
                                 for v in [merged, *variants]))

    ls = spec["sampling"]["lightning"]
    bs = spec["sampling"]["base"]
    common = dict(prompts="demo", size=spec["size"], cache=True)
    # the scenario: 4 steps with the merged LoRA must look like 25 steps without it
    scen = verify([merged], custom, steps=ls["steps"], sampler=ls["sampler"],
                  guidance=ls["guidance"], reference_steps=bs["steps"],
                  reference_sampler=bs["sampler"], reference_guidance=bs["guidance"],
                  gate=["kind=lora"], must_differ_from=custom,
                  report_dir=out / "verify-lightning", **common)
    a = scen.artifacts[0]
    reads = [reads_as(img.pixels, img.prompt.text) for img in scen.reference.images]
    reads_m = [reads_as(img.pixels, img.prompt.text) for img in a.run.images]
    say(f"verify merge @{ls['steps']} steps vs custom @{bs['steps']} steps, guidance "
        f"{bs['guidance']:g}: mean PSNR {a.mean['psnr']:.1f} dB, SSIM {a.mean['ssim']:.3f} "
        f"[{'ok' if a.ok else 'FAIL'}]; vs custom @{ls['steps']} steps without it: "
        f"{a.differ_psnr:.1f} dB (the LoRA took: below {a.thresholds['differ_psnr']:g})")
    say(f"  colours as captioned: custom @{bs['steps']} {_count(reads)}, merge "
        f"@{ls['steps']} {_count(reads_m)}")
    step("verify-lightning", ok=a.ok, mean=a.mean, differ_psnr=a.differ_psnr,
         reads_reference=reads, reads_merge=reads_m, report=str(scen.report_dir))

    res = verify(variants, merged, base=merged, steps=ls["steps"], sampler=ls["sampler"],
                 guidance=ls["guidance"], report_dir=out / "verify", **common)
    for v in res.artifacts:
        say(f"verify {v.ref.name} [{v.kind}]: mean PSNR {_db(v.mean['psnr'])}, SSIM "
            f"{v.mean['ssim']:.4f} [{'ok' if v.ok else 'FAIL'}]")
    step("verify-variants", ok=res.ok,
         artifacts={v.ref.name: {"kind": v.kind, "ok": v.ok, "mean": v.mean}
                    for v in res.artifacts}, report=str(res.report_dir))
    say(f"contact sheets: {scen.contact_sheet} and {res.contact_sheet}")
    report["ok"] = scen.ok and res.ok
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["contact_sheets"] = [str(scen.contact_sheet), str(res.contact_sheet)]
    if not report["ok"]:
        raise DemoCheckFailed(scen.failure_message() if not scen.ok else
                              res.failure_message())
    say(f"demo ok in {report['seconds']} s; files in {out}/")
    return report


def _count(reads: list[dict]) -> str:
    return f"{sum(r['colour'] and r['background'] for r in reads)}/{len(reads)}"


def _db(v: float) -> str:
    return "equal" if v >= 100 else f"{v:.1f} dB"
