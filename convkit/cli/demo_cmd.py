"""``convkit demo``."""
from __future__ import annotations

import json

import click

from .common import output_options


@click.command()
@click.option("--out", "out_dir", default="convkit-demo", show_default=True,
              type=click.Path(), help="Folder for the demo's files.")
@click.option("--arch", default=None,
              help="Instead of the trained demo model: the conversion mechanics on a tiny "
                   "random model of this architecture (sdxl, sd15, flux_dev, ...).")
@output_options
def demo(out_dir, arch, quiet, as_json):
    """Run the main job on the built-in demo model, verified by rendering.

    The demo model is a tiny SDXL-architecture pipeline trained for convkit
    (coloured shapes on coloured backgrounds), with a "custom" fine-tune and a
    4-step "lightning" distillation. The demo extracts the Lightning LoRA, merges
    it into the custom model, converts and quantizes the merge (fp32, fp8, NF4,
    GGUF Q8_0 and Q4_K) and verifies every file by rendering it; it prints the
    contact sheets' paths. Re-running replaces the demo's own files in --out.

    \b
    Examples:
      convkit demo
      convkit demo --out /tmp/demo --json
      convkit demo --arch flux_dev      # mechanics only, random weights, no renders
    """
    if arch is None:
        from ..demo_scenario import run_scenario

        report = run_scenario(out_dir, echo=None if (quiet or as_json) else click.echo)
    else:
        from ..demo import run_demo

        report = run_demo(out_dir, arch=arch, echo=None if (quiet or as_json) else click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
