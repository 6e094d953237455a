"""``convkit convert``."""
from __future__ import annotations

import click

from .common import (RegistryChoice, dry_run_option, emit_plan_or_json, output_options,
                     parse_size, progress)
from .sampling_opts import sampling_options, stated


@click.command()
@click.argument("input", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--dtype", type=RegistryChoice("cast"), default="fp16", show_default=True,
              help="Target float type. A quantized input (fp8, scaled fp8, NF4/FP4, GGUF, "
                   "quanto/torchao folders) is dequantized; the output carries none of its "
                   "scales or quant states.")
@click.option("--components", default=None,
              help="Write only these components, e.g. 'unet' or 'unet,te,vae' "
                   "(te = all text encoders; te1, te2 one of them).")
@click.option("--on-overflow", type=click.Choice(["clamp", "inf", "error"]), default="clamp",
              show_default=True, help="Values beyond the fp16 range: clamp to ±65504 "
                                      "(and report), keep as inf, or refuse.")
@dry_run_option
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--no-detect", is_flag=True, help="Do not require a known architecture.")
@click.option("--variant", default=None, help="diffusers weight variant to read (e.g. fp16).")
@click.option("--max-shard-size", default=None,
              help="diffusers folders: largest weight file before sharding "
                   "[default: 5GB; 10GB for a new folder, as save_pretrained].")
@click.option("--layout", default=None, metavar="LAYOUT",
              help="Write another layout of the architecture: single-file (the full "
                   "checkpoint ComfyUI/Forge/A1111 load), diffusers (a pipeline folder with "
                   "model_index.json, configs, scheduler and tokenizers), or one of the "
                   "architecture's own (sgm, sgm-unet, bfl, comfy, diffusers-unet, "
                   "diffusers-transformer; `convkit inspect` lists them). Default: the input's.")
@click.option("--config-from", type=click.Path(file_okay=False), default=None,
              help="A diffusers folder whose component configs, tokenizers and scheduler the "
                   "diffusers output takes (the weights must fit its configs).")
@sampling_options
@output_options
def convert(input, output, dtype, components, on_overflow, dry_run, overwrite, no_detect,
            variant, max_shard_size, layout, config_from, prediction, sampler, quiet, as_json):
    """Convert float precision, streaming one tensor at a time.

    A single file gives a single file and a diffusers folder a diffusers folder, unless
    --layout says otherwise. fp16 -> fp32 -> fp16 and single file -> diffusers -> single file
    round-trip bit-exactly.

    \b
    Examples:
      convkit convert sd_xl_base_1.0.safetensors sdxl-fp16.safetensors --dtype fp16
      convkit convert sd_xl_base_1.0.safetensors ./sdxl-diffusers --layout diffusers
      convkit convert ./sdxl-diffusers sdxl.safetensors --layout single-file --dtype fp16
      convkit convert model.safetensors unet-bf16.safetensors --dtype bf16 --components unet
      convkit convert ./diffusers-model ./diffusers-model-fp16 --dtype fp16 --dry-run
    """
    from ..convert import convert as do_convert

    with stated(prediction, sampler):
        result = do_convert(input, output, dtype, components=components, overwrite=overwrite,
                            dry_run=dry_run, on_overflow=on_overflow, detect=not no_detect,
                            variant=variant, progress=progress(quiet, as_json), layout=layout,
                            config_from=config_from,
                            **({"max_shard_bytes": parse_size(max_shard_size)} if max_shard_size
                               else {}))
    if emit_plan_or_json(result, as_json=as_json, dry_run=dry_run, quiet=quiet):
        return
    s = result.stats
    click.echo(f"wrote {result.plan.out} ({s.bytes_written:,d} bytes, {s.tensors} tensors, "
               f"{s.seconds:.1f} s)")
    for n in result.plan.notes:
        click.echo(f"note: {n}")
    for name, count in sorted(result.overflows.items(), key=lambda kv: -kv[1])[:20]:
        click.echo(f"overflow: {name}: {count} values")
