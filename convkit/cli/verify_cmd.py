"""``convkit verify``."""
from __future__ import annotations

import json
import math

import click

from .common import dry_run_option, output_options, progress


@click.command("verify")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@click.option("--reference", "-r", required=True, type=click.Path(),
              help="The model the artifacts must render like (file or diffusers folder).")
@click.option("--base", type=click.Path(),
              help="Full model that completes a UNet/transformer-only file, or that a LoRA "
                   "artifact is applied to (as merge-lora does).")
@click.option("--config-from", type=click.Path(),
              help="Diffusers model folder to take configs, tokenizers and scheduler from.")
@click.option("--prompts", help="A prompt set (sdxl-lightning, demo) or a file (.toml, .json, "
                                ".txt).  [default: sdxl-lightning]")
@click.option("--steps", type=int, help="Sampling steps (default per architecture: 4).")
@click.option("--size", help="Image size, 512 or 768x512 (default: 512, or the model's native "
                             "size when smaller).")
@click.option("--sampler", help="euler-trailing, euler, lcm, flow-euler (default: the one a "
                                "file's metadata states, convkit.sampler; else per "
                                "architecture).")
@click.option("--guidance", type=float, help="Guidance scale (default per architecture: 0 for "
                                             "SDXL/schnell, 3.5 for Flux dev).")
@click.option("--prediction", help="Prediction type: epsilon, v_prediction, sample (x0: the "
                                   "1-step Lightning model). Default: what a file's metadata "
                                   "says (convkit.prediction, modelspec.prediction_type).")
@click.option("--reference-steps", type=int, help="Steps for the reference only (e.g. 25 for "
                                                  "a base model against a 4-step merge).")
@click.option("--reference-sampler", help="Sampler for the reference only.")
@click.option("--reference-guidance", type=float, help="Guidance for the reference only.")
@click.option("--gate", "gate", multiple=True, metavar="KEY=VALUE",
              help="Override a gate value: kind=fp8, psnr=30, ssim=0.9, seed_floor=0.5, ... "
                   "(formats/verify/gates.toml).")
@click.option("--must-differ-from", type=click.Path(),
              help="Fail an artifact that renders like this model (a LoRA that did not take).")
@click.option("--report", "report_dir", type=click.Path(),
              help="Folder for report.json, the PNGs, contact_sheet.png and report.html.")
@click.option("--lpips-weights", multiple=True, type=click.Path(),
              help="LPIPS (AlexNet) weights on disk, one file or two (see docs/verify.md); "
                   "adds LPIPS to the gate. Never downloaded.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, mps.")
@click.option("--no-cache", is_flag=True, help="Render the reference again even if cached.")
@dry_run_option
@output_options
def verify_cmd(artifacts, reference, base, config_from, prompts, steps, size, sampler, guidance,
               prediction, reference_steps, reference_sampler, reference_guidance, gate,
               must_differ_from, report_dir, lpips_weights, device, no_cache, dry_run, quiet,
               as_json):
    """Render ARTIFACTS and REFERENCE with the same prompts and seeds; gate each artifact.

    Each artifact image is compared with the reference's (PSNR, SSIM) against its
    kind's thresholds (lossless, fp16, bf16, fp8, int8, int4, lora: chosen from how
    the file is stored, see formats/verify/gates.toml); NaN/Inf, flat, black or white
    images fail outright; an artifact must stay well closer to the reference than
    another seed's render is. Reference renders are cached.

    Exit codes: 0 every image passes; 10 a gate failed (the message names artifact,
    prompt, score and threshold); 2 bad usage; 3 unreadable input.

    \b
    Examples:
      convkit verify model-fp16.safetensors model-Q8_0.gguf -r model.safetensors --report rep
      convkit verify unet-nf4.safetensors -r model.safetensors --base model.safetensors
      convkit verify lightning-lora.safetensors:1.0 --base custom.safetensors \\
          -r custom.safetensors --reference-steps 25 --reference-guidance 5 \\
          --must-differ-from custom.safetensors
    """
    from ..verify import GateFailed, verify

    r = verify(list(artifacts), reference, base=base, prompts=prompts, steps=steps, size=size,
               sampler=sampler, guidance=guidance, prediction=prediction,
               reference_steps=reference_steps, reference_sampler=reference_sampler,
               reference_guidance=reference_guidance, gate=gate,
               must_differ_from=must_differ_from, config_from=config_from,
               report_dir=report_dir, device=device, cache=not no_cache,
               lpips_weights=lpips_weights, dry_run=dry_run,
               progress=progress(quiet, as_json))
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
    elif dry_run:
        click.echo(r.format())
    elif not quiet:
        _summary(r)
    if not dry_run and not r.ok:
        raise GateFailed(r.failure_message())


def _summary(r) -> None:
    ref = r.reference
    per = ref.render_seconds / max(1, sum(not i.cached for i in ref.images))
    click.echo(f"reference {ref.ref.path}: {ref.settings.label()}"
               + (f", {per:.2f} s/image" if per else ", cached"))
    for a in r.artifacts:
        m = a.mean
        worst = min(a.scores, key=lambda s: s.psnr)
        n = sum(not i.cached for i in a.run.images)
        speed = f"{a.run.render_seconds / n:.2f} s/image" if n else "cached"
        ps = "inf" if math.isinf(worst.psnr) else f"{worst.psnr:.1f}"
        verdict = "ok" if a.ok else "FAIL"
        click.echo(f"  {verdict:4} {a.ref.name} [{a.kind}]: mean PSNR {m['psnr']:.2f} dB, "
                   f"SSIM {m['ssim']:.4f}; worst {worst.prompt} {ps} dB; {speed}"
                   + (f"; peak {a.run.peak_rss / 2**30:.2f} GiB" if a.run.peak_rss else ""))
    if r.contact_sheet:
        click.echo(f"contact sheet: {r.contact_sheet}")
