"""``convkit inspect``."""
from __future__ import annotations

import json

import click

from .common import output_options, progress


@click.command()
@click.argument("path", type=click.Path())
@click.option("--scan", is_flag=True, help="Also read every tensor and count NaN/Inf values.")
@click.option("--variant", default=None, help="diffusers weight variant to read (e.g. fp16).")
@output_options
def inspect(path, scan, variant, quiet, as_json):
    """Show architecture, layout, components, dtypes, sizes and anything odd.

    \b
    Examples:
      convkit inspect sd_xl_base_1.0.safetensors
      convkit inspect ./my-diffusers-model --json
      convkit inspect model.safetensors --scan
    """
    from ..inspection import format_report, inspect as do_inspect

    report = do_inspect(path, scan=scan, variant=variant, progress=progress(quiet, as_json))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        click.echo(format_report(report))
