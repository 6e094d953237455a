"""``convkit demo``."""
from __future__ import annotations

import json

import click

from .common import output_options


@click.command()
@click.option("--out", "out_dir", default="convkit-demo", show_default=True,
              type=click.Path(), help="Folder for the demo's files.")
@click.option("--arch", default="sdxl", show_default=True, help="Tiny model to build.")
@output_options
def demo(out_dir, arch, quiet, as_json):
    """Build a tiny real-layout model and run the main job on it, end to end.

    Builds a tiny SDXL (real diffusers classes, fixed seed), saves it as an SGM
    single file in fp32, inspects it, converts it to fp16 and back, and checks
    every tensor of every output by reopening it. Re-running replaces the
    demo's own files in the --out folder.

    \b
    Examples:
      convkit demo
      convkit demo --arch flux_dev --out /tmp/demo --json
    """
    from ..demo import run_demo

    report = run_demo(out_dir, arch=arch,
                      echo=None if (quiet or as_json) else click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2))
