"""``convkit merge-lora``, ``extract-lora``, ``convert-lora``."""
from __future__ import annotations

import json

import click

from .common import RegistryChoice, dry_run_option, emit_plan_or_json, output_options, progress
from .sampling_opts import sampling_options, stated


@click.command("merge-lora")
@click.argument("base", type=click.Path())
@click.argument("loras", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="Output file (or folder "
              "for a diffusers base).")
@click.option("--dtype", type=RegistryChoice("cast"), default=None, help="Output float type (fp16, bf16, fp32); default: "
              "each tensor keeps the base's dtype.")
@click.option("--allow-unmatched", is_flag=True, help="Merge even if some LoRA modules match "
              "nothing in the base (they are listed).")
@click.option("--on-overflow", type=click.Choice(["clamp", "inf", "error"]), default="clamp",
              show_default=True)
@dry_run_option
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@sampling_options
@output_options
def merge_lora_cmd(base, loras, output, dtype, allow_unmatched, on_overflow, dry_run, overwrite,
                   prediction, sampler, quiet, as_json):
    """Merge LoRA/LyCORIS files into BASE, streaming one tensor at a time.

    Each LORA may carry a weight: LORA:WEIGHT (default 1). Deltas are added in fp32
    (ΔW·alpha/rank·weight; alpha defaults to the rank), then cast.

    \b
    Examples:
      convkit merge-lora juggernautXL.safetensors sdxl_lightning_4step_lora.safetensors -o jugg-4step.safetensors
      convkit merge-lora base.safetensors style.safetensors:0.7 detail.safetensors:0.3 -o out.safetensors --dtype fp16
      convkit merge-lora ./sdxl-diffusers lora.safetensors -o ./merged-diffusers
      convkit merge-lora sd_xl_base_1.0.safetensors lcm-lora-sdxl.safetensors -o lcm.safetensors --sampler lcm
    """
    from ..lora.merge import merge_lora

    with stated(prediction, sampler):
        r = merge_lora(base, list(loras), output, dtype=dtype, allow_unmatched=allow_unmatched,
                       overwrite=overwrite, dry_run=dry_run, on_overflow=on_overflow,
                       progress=progress(quiet, as_json))
    if as_json:
        emit_plan_or_json(r, as_json=True, dry_run=dry_run)
        return
    if quiet:
        return
    if dry_run:  # the plan, then what each LoRA would touch
        click.echo(r.plan.format(limit=40))
    for rep in r.loras:
        click.echo(f"{rep.path} x{rep.weight:g}: {rep.modules} modules "
                   f"({', '.join(f'{k} {v}' for k, v in rep.algos.items())})"
                   + (f", {len(rep.unmatched)} unmatched" if rep.unmatched else ""))
    for n in r.notes:
        click.echo(f"note: {n}")
    if r.stats:
        click.echo(f"wrote {r.plan.out} ({r.stats.bytes_written:,d} bytes, "
                   f"{sum(1 for i in r.plan.items if i.action.startswith('merge'))} tensors changed, "
                   f"{r.stats.seconds:.1f} s)")


@click.command("extract-lora")
@click.argument("tuned", type=click.Path())
@click.argument("base", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--rank", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rank of linear and 1x1 conv modules, and of kxk convs unless --conv-rank "
                   "is given (maximum rank with --dynamic).")
@click.option("--conv-rank", type=click.IntRange(min=0), default=None,
              help="Rank of kxk (3x3) conv modules (default: --rank; 0 leaves them out, "
                   "reported as left out). Maximum rank with --dynamic.")
@click.option("--dynamic", default=None, help="Per-module rank: sv_ratio=X, sv_fro=X or "
              "sv_cumulative=X (kohya resize rules).")
@click.option("--clamp-quantile", type=float, default=None, help="Clamp factors to this "
              "quantile of their magnitudes (kohya uses 0.99).")
@click.option("--min-diff", type=float, default=1e-5, show_default=True,
              help="Skip modules whose relative change ‖ΔW‖/‖W‖ is below this.")
@click.option("--format", "fmt", type=RegistryChoice("lora-format"), default="kohya",
              show_default=True, help="LoRA output format.")
@click.option("--dtype", type=RegistryChoice("cast"), default="fp16", show_default=True,
              help="dtype of the LoRA tensors.")
@click.option("--components", default=None, help="Only these components, e.g. 'unet'.")
@click.option("--svd", type=click.Choice(["auto", "lowrank", "full"]), default="auto",
              show_default=True, help="auto: randomized SVD (16 extra directions, 2 power "
              "iterations) where the rank is small against the module, else full SVD.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@dry_run_option
@output_options
def extract_lora_cmd(tuned, base, output, rank, conv_rank, dynamic, clamp_quantile, min_diff, fmt,
                     dtype, components, svd, overwrite, dry_run, quiet, as_json):
    """Extract a LoRA from TUNED − BASE by SVD (fp32).

    TUNED and BASE may be in any layout or encoding (fp8, NF4, GGUF, ... are decoded).
    Everything the LoRA cannot carry is reported with its share of ‖ΔW‖ (unchanged
    modules, convs left out, VAE, norms and biases), and the total error counts it.

    \b
    Examples:
      convkit extract-lora sdxl_lightning_1step_unet.safetensors sd_xl_base_1.0.safetensors -o lightning-1step-lora.safetensors --rank 64 --conv-rank 32
      convkit extract-lora finetune.safetensors base.safetensors -o lora.safetensors --rank 128 --dynamic sv_fro=0.9
    """
    from ..lora.extract import extract_lora

    comps = None
    if components:
        from .. import archs
        from ..sources import open_source
        with open_source(base) as s:
            det = archs.detect(s)
            comps = archs.select_components(det.arch, components, det.component_keys)
    r = extract_lora(tuned, base, output, rank=rank, conv_rank=conv_rank, dynamic=dynamic,
                     clamp_quantile=clamp_quantile, min_diff=min_diff, fmt=fmt, dtype=dtype,
                     components=comps, svd=svd, overwrite=overwrite, dry_run=dry_run,
                     progress=progress(quiet, as_json))
    if as_json:
        d = r.to_dict()
        if dry_run and r.plan is not None:
            d["plan"] = r.plan.to_dict()
        click.echo(json.dumps(d, indent=2))
        return
    if quiet:
        return
    for line in r.summary_lines():
        click.echo(line)


@click.command("convert-lora")
@click.argument("input", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--format", "fmt", type=RegistryChoice("lora-format"), required=True,
              help="LoRA output format.")
@click.option("--arch", default=None, help="Architecture (default: guessed from the names).")
@click.option("--base", default=None, type=click.Path(), help="Take module names and sizes from "
              "this model instead of the released full-size one.")
@click.option("--dtype", type=RegistryChoice("cast"), default=None,
              help="dtype of the output tensors (default: as stored).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@dry_run_option
@output_options
def convert_lora_cmd(input, output, fmt, arch, base, dtype, overwrite, dry_run, quiet, as_json):
    """Rewrite a LoRA in another format (kohya, comfy, peft); lossless or refused.

    \b
    Examples:
      convkit convert-lora lora-peft.safetensors lora-kohya.safetensors --format kohya
      convkit convert-lora lora.safetensors lora-comfy.safetensors --format comfy --arch sdxl
    """
    from ..lora.convert import convert_lora

    r = convert_lora(input, output, fmt, arch=arch, base=base, dtype=dtype, overwrite=overwrite,
                     dry_run=dry_run, progress=progress(quiet, as_json))
    if emit_plan_or_json(r, as_json=as_json, dry_run=dry_run, quiet=quiet, limit=40):
        return
    if not quiet:
        click.echo(f"wrote {r.output} ({r.format}, {r.arch}, {r.modules} modules)")
        for n in r.notes:
            click.echo(f"note: {n}")
