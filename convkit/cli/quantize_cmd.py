"""``convkit quantize IN OUT --to TARGET``."""
from __future__ import annotations


import click

from .common import RegistryChoice, dry_run_option, emit_plan_or_json, output_options, progress
from .sampling_opts import sampling_options, stated


def _normalise(name: str) -> str:
    from ..quantize.targets import normalise

    return normalise(name)



@click.command("quantize")
@click.argument("input", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--to", "target", required=True, type=RegistryChoice("quantize", _normalise),
              help="fp8-e4m3fn, fp8-e5m2, fp8-scaled, nf4, fp4, gguf:F16|BF16|Q8_0|Q5_1|Q5_0|"
                   "Q4_1|Q4_0|Q6_K|Q5_K|Q4_K|Q3_K|Q2_K or a mix gguf:Q5_K_M|Q5_K_S|Q4_K_M|"
                   "Q4_K_S|Q3_K_M|Q3_K_S; or, as a diffusers model folder (OUTPUT is a "
                   "folder), quanto:int8|int4|fp8 or torchao:int8wo (torchao:int4wo needs a "
                   "CUDA GPU and is refused).")
@click.option("--layout", type=click.Choice(["comfy", "sdcpp"]), default="comfy",
              show_default=True, help="GGUF: ComfyUI-GGUF (rows of 256, orig_shape metadata) or "
                                      "stable-diffusion.cpp (LDM names, no rearrangement; for "
                                      "SD1/SDXL one file with the text encoders and VAE, F16).")
@click.option("--type-rule", "type_rules", multiple=True, metavar="REGEX=TYPE",
              help="GGUF: give tensors whose name matches REGEX this type (first match wins; "
                   "repeatable).")
@click.option("--scaled-format", type=click.Choice(["scale_weight", "comfy_quant"]),
              default="scale_weight", show_default=True,
              help="fp8-scaled: 'scaled_fp8' marker + scale_weight (ComfyUI and Forge), or "
                   "weight_scale + per-layer comfy_quant (newer ComfyUI only: Forge ignores "
                   "weight_scale and loads such files with unscaled weights).")
@click.option("--double-quant", is_flag=True,
              help="nf4/fp4: quantize the absmax statistics too (smaller; v1 layout).")
@click.option("--rest-dtype", default="source", show_default=True,
              help="fp8/nf4: float type of everything not quantized (source, fp16, bf16, fp32); "
                   "with --extras also the extra files.")
@click.option("--extras", "extras_dir", type=click.Path(), default=None,
              help="GGUF: also write the other components (text encoders, VAE), each to its "
                   "own file in this folder.")
@click.option("--extras-format", type=click.Choice(["safetensors", "gguf"]),
              default="safetensors", show_default=True,
              help="--extras files: safetensors (prefix removed), or gguf: each component in "
                   "the GGUF form its loader takes under --layout (comfy: T5 for ComfyUI-GGUF's "
                   "CLIP loaders; sdcpp, Flux: --t5xxl/--clip_l/--vae); components with no "
                   "GGUF loader stay safetensors, with a note.")
@click.option("--extras-type", default="auto", show_default=True,
              help="--extras-format gguf: GGUF type of the extra files (F16, BF16, Q8_0, ..., "
                   "Q2_K); auto = Q8_0 for T5, F16 for CLIP and VAE.")
@click.option("--report", "report_path", type=click.Path(), default=None,
              help="Write the per-tensor error report (JSON) here.")
@click.option("--no-verify", is_flag=True, help="Skip reopening the output to check it.")
@dry_run_option
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--variant", default=None, help="diffusers weight variant to read (e.g. fp16).")
@sampling_options
@output_options
def quantize_cmd(input, output, target, layout, type_rules, scaled_format, double_quant,
                 rest_dtype, extras_dir, extras_format, extras_type, report_path, no_verify,
                 dry_run, overwrite, variant, prediction, sampler, quiet, as_json):
    """Quantize the diffusion model: FP8, NF4/FP4 (Forge) or GGUF (ComfyUI-GGUF, sd.cpp).

    Every output is reopened and checked; the error of every quantized tensor (relative RMSE
    of the dequantized weight against the source) is measured and summarised, also in the
    output's own metadata (convkit.quant_report).

    \b
    Examples:
      convkit quantize flux1-dev.safetensors flux1-dev-Q4_K_S.gguf --to gguf:Q4_K_S
      convkit quantize sdxl.safetensors sdxl-Q8_0.gguf --to gguf:Q8_0 --layout sdcpp
      convkit quantize flux1-dev.safetensors flux-fp8.safetensors --to fp8-scaled
      convkit quantize sdxl.safetensors sdxl-nf4.safetensors --to nf4 --rest-dtype bf16
      convkit quantize sdxl.safetensors x.gguf --to gguf:Q4_K_M --type-rule 'attn2\\.to_k=Q8_0'
    """
    from ..quantize import quantize as do_quantize

    with stated(prediction, sampler):
        result = do_quantize(input, output, target, layout=layout, type_rules=type_rules,
                             scaled_format=scaled_format, double_quant=double_quant,
                             rest_dtype=rest_dtype, extras_dir=extras_dir,
                             extras_format=extras_format,
                             extras_type=None if extras_type == "auto" else extras_type,
                             report_path=report_path,
                             overwrite=overwrite, dry_run=dry_run, verify=not no_verify,
                             variant=variant, progress=progress(quiet, as_json))
    if emit_plan_or_json(result, as_json=as_json, dry_run=dry_run, quiet=quiet):
        return
    s = result.stats
    click.echo(f"wrote {result.plan.out} ({s.bytes_written:,d} bytes, {len(result.plan.items)} "
               f"tensors, {s.seconds:.1f} s; reopened and checked {s.verified} tensors)")
    click.echo(result.report.format(10))
    for i in result.plan.fallbacks[:20]:
        click.echo(f"fallback: {i.name}: {i.wanted} -> {i.qtype}")
    if len(result.plan.fallbacks) > 20:
        click.echo(f"fallback: ... {len(result.plan.fallbacks) - 20} more (see --dry-run)")
    for n in result.plan.notes:
        click.echo(f"note: {n}")
    for p in result.extras or []:
        rep = (result.extras_reports or {}).get(p)
        err = ""
        if rep is not None:
            s = rep.summary(0)
            err = (f" ({s['quantized_tensors']} tensors measured: rel RMSE {s['rel_rmse']:.4g}, "
                   f"worst {s['max_rel_rmse']:.4g})")
        click.echo(f"wrote {p}{err}")
