"""``convkit split`` and ``convkit assemble``."""
from __future__ import annotations

import click

from .common import (
    RegistryChoice,
    dry_run_option,
    emit_plan_or_json,
    output_options,
    progress,
)
from .sampling_opts import sampling_options, stated


def _report(result, quiet, as_json, dry_run):
    if emit_plan_or_json(result, as_json=as_json, dry_run=dry_run, quiet=quiet):
        return
    s = result.stats
    click.echo(f"wrote {result.plan.out} ({len(result.plan.files)} files, "
               f"{s.bytes_written:,d} bytes, {s.tensors} tensors, {s.seconds:.1f} s)")
    for n in result.plan.notes:
        click.echo(f"note: {n}")


@click.command("split")
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(),
              help="New folder for the parts (staged, renamed into place when complete).")
@click.option("--parts", default=None, metavar="unet,clip_l,clip_g,t5,vae,lora",
              help="Parts to write (default: every part the checkpoint has); lora: the "
                   "difference to --base as a LoRA.")
@click.option("--for", "target", type=RegistryChoice("layout-target"), default="comfyui",
              show_default=True, help="The tool the parts are for: its folders, names, prefixes.")
@click.option("--name", default=None, help="File name stem (default: the checkpoint's).")
@click.option("--dtype", "dtype", multiple=True, metavar="[PART=]DTYPE",
              help="Float type, for all parts or one (PART= unet, clip_l, clip_g, t5, vae, or "
                   "te for the text encoders); repeatable. Default: each tensor keeps its "
                   "dtype (a quantized input is decoded).")
@click.option("--to", "to", multiple=True, metavar="[unet=]TARGET",
              help="Quantize the diffusion model as `convkit quantize --to` does (gguf:Q8_0, "
                   "fp8-e4m3fn, fp8-scaled, nf4, ...), in its folder with the target in its "
                   "name.")
@click.option("--base", default=None, type=click.Path(),
              help="--parts lora: the model the LoRA applies to (the LoRA is CHECKPOINT - BASE).")
@click.option("--rank", default=64, show_default=True, type=int, help="--parts lora: LoRA rank.")
@click.option("--lora-format", type=RegistryChoice("lora-format"), default=None,
              help="--parts lora: LoRA names (default: what the target tool reads best).")
@click.option("--config-from", type=click.Path(file_okay=False), default=None,
              help="--for diffusers: take configs, tokenizers and scheduler from this folder.")
@click.option("--on-overflow", type=click.Choice(["clamp", "inf", "error"]), default="clamp",
              show_default=True)
@dry_run_option
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@sampling_options
@output_options
def split_cmd(checkpoint, output, parts, target, name, dtype, to, base, rank, lora_format,
              config_from, on_overflow, dry_run, overwrite, prediction, sampler, quiet, as_json):
    """Split CHECKPOINT into its parts, each where and how the target tool loads it, with a
    manifest.json (what came from where, sizes, sha256).

    \b
    Examples:
      convkit split juggernautXL.safetensors -o comfy-models --for comfyui
      convkit split flux1-dev.safetensors -o parts --parts clip_l,t5,vae --dtype te=fp16
      convkit split flux1-dev.safetensors -o comfy --to unet=gguf:Q8_0 --dtype te=fp16
      convkit split sd_xl_base_1.0.safetensors -o forge --for forge --dtype fp16
      convkit split model.safetensors -o ./model-diffusers --for diffusers --dry-run
      convkit split lightning_unet.safetensors -o out --parts lora --base sdxl.safetensors --rank 64
    """
    from ..layouts.split import LoraPart, split

    part_list = [p.strip() for p in parts.split(",") if p.strip()] if parts else None
    lora = LoraPart(base, rank, lora_format) if base else None
    with stated(prediction, sampler):
        result = split(checkpoint, output, target, parts=part_list, name=name, dtype=dtype,
                       to=to, lora=lora, on_overflow=on_overflow, config_from=config_from,
                       overwrite=overwrite, dry_run=dry_run, progress=progress(quiet, as_json))
    _report(result, quiet, as_json, dry_run)


@click.command("assemble")
@click.option("--unet", multiple=True, type=click.Path(), metavar="FILE",
              help="The diffusion model (UNet or Flux transformer): any layout or encoding.")
@click.option("--clip-l", "clip_l", multiple=True, type=click.Path(), metavar="FILE",
              help="CLIP-L text encoder: a part file or a checkpoint that has one.")
@click.option("--clip-g", "clip_g", multiple=True, type=click.Path(), metavar="FILE",
              help="OpenCLIP bigG text encoder (SDXL, refiner).")
@click.option("--t5", multiple=True, type=click.Path(), metavar="FILE",
              help="T5-XXL text encoder (Flux).")
@click.option("--vae", multiple=True, type=click.Path(), metavar="FILE", help="VAE.")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Output file (a folder with --layout diffusers).")
@click.option("--layout", default=None, metavar="LAYOUT",
              help="single-file (default: the full checkpoint Forge/ComfyUI/A1111 load), "
                   "diffusers, or another layout of the architecture.")
@click.option("--for", "target", type=RegistryChoice("layout-target"), default=None,
              help="Shorthand for the tool: diffusers -> --layout diffusers, the others -> "
                   "single-file (the full checkpoint each of them loads).")
@click.option("--dtype", type=RegistryChoice("cast"), default=None,
              help="Output float type; default: each tensor keeps its (decoded) dtype.")
@click.option("--config-from", type=click.Path(file_okay=False), default=None,
              help="A diffusers folder whose configs the parts must fit (and, for --layout "
                   "diffusers, whose tokenizers and scheduler are copied).")
@click.option("--on-overflow", type=click.Choice(["clamp", "inf", "error"]), default="clamp",
              show_default=True)
@dry_run_option
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@sampling_options
@output_options
def assemble_cmd(unet, clip_l, clip_g, t5, vae, output, layout, target, dtype, config_from,
                 on_overflow, dry_run, overwrite, prediction, sampler, quiet, as_json):
    """Assemble one model from parts: a diffusion model plus text encoders and VAE, each a
    part file or taken from a checkpoint, in any layout or encoding. Architecture and sizes
    are checked across all parts before anything is written.

    \b
    Examples:
      convkit assemble --unet sdxl_lightning_4step_unet.safetensors \\
          --clip-l juggernautXL.safetensors --clip-g juggernautXL.safetensors \\
          --vae sdxl_vae.safetensors -o jugg-lightning.safetensors --for forge
      convkit assemble --unet flux1-dev-Q8_0.gguf --clip-l clip_l.safetensors \\
          --t5 t5xxl_fp16.safetensors --vae ae.safetensors -o flux-dev --layout diffusers
    """
    from ..layouts.assemble import assemble

    if target and layout:
        raise click.UsageError("give --layout or --for, not both")
    if target:
        from ..layouts.targets import get

        layout = "diffusers" if get(target).diffusers_folder else "single-file"
    with stated(prediction, sampler):
        result = assemble({"unet": unet, "clip_l": clip_l, "clip_g": clip_g, "t5": t5,
                           "vae": vae}, output, layout=layout, dtype=dtype,
                          on_overflow=on_overflow, config_from=config_from, overwrite=overwrite,
                          dry_run=dry_run, progress=progress(quiet, as_json))
    _report(result, quiet, as_json, dry_run)
