"""``convkit run RECIPE``."""
from __future__ import annotations

import json
import sys

import click

from .common import dry_run_option, output_options, parse_size


@click.command("run")
@click.argument("recipe")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: the recipe's [recipe] output, in the current folder).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override the recipe: an input's path (model=PATH or inputs.model=PATH), a "
                   "variable (stem=NAME), or an option (artifacts.q4.to=gguf:Q4_K_M). Repeatable.")
@click.option("--only", multiple=True, metavar="ARTIFACT",
              help="Build only this artifact (and what it reads, when that is not up to date). "
                   "Repeatable.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Artifacts built at once, in local worker processes (within --memory).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="local: this machine; ray: each artifact a Ray task with "
                                      "its memory and CPUs declared (pip install 'convkit[ray]'; "
                                      "paths must be on storage every node sees).")
@click.option("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, "
                                                  "else a local Ray).")
@click.option("--memory", "memory", default=None, metavar="SIZE",
              help="--jobs: memory the running artifacts may declare together (default: 80% of "
                   "the available memory).")
@dry_run_option
@output_options
def run_cmd(recipe, output, sets, only, jobs, executor, ray_address, memory, dry_run, quiet,
            as_json):
    """Run a recipe: build its artifacts (skipping those already built from the same inputs and
    options), verify them, and print a table of what was done.

    RECIPE is a .toml file or the name of a shipped recipe: lightning-merge, flux-lowvram,
    extract-lora, comfyui-split (each runs on the built-in demo model as it is; --set swaps in
    real files).

    Exit codes: 0 every artifact built or up to date and every gate passed; 10 a verify gate
    failed; otherwise the first failure's code (2 bad recipe or usage, 3 unreadable input).

    \b
    Examples:
      convkit run lightning-merge
      convkit run lightning-merge --set model=juggernautXL.safetensors \\
          --set lora=sdxl_lightning_4step_lora.safetensors -o jugg-lightning
      convkit run flux-lowvram --set model=flux1-dev.safetensors --jobs 2
      convkit run my-release.toml --only q4ks --dry-run
    """
    from ..recipes import load, run

    r = load(recipe, list(sets))
    show = not (quiet or as_json) and sys.stderr.isatty()
    echo = None if (quiet or as_json or show) else (lambda s: click.echo(s, err=True))
    try:
        result = run(r, output, only=list(only), jobs=jobs, executor=executor,
                     ray_address=ray_address, dry_run=dry_run, show_progress=show,
                     memory_budget=parse_size(memory) if memory else None, echo=echo)
    except KeyboardInterrupt:
        from ..errors import Interrupted

        # unlike one command, a run has kept whatever it completed
        raise Interrupted("interrupted; the artifacts completed so far are kept and recorded, "
                          "the one in progress was not written: run the same command to "
                          "finish") from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        if dry_run:
            click.echo(f"recipe {r.name}: output {result.out}/ (dry run: nothing written)")
        click.echo(result.format())
        if not dry_run:
            n = sum(row.status == "built" for row in result.rows)
            click.echo(f"{n} built, {sum(row.status == 'up to date' for row in result.rows)} up "
                       f"to date in {result.seconds:.1f} s; record: {result.out}/"
                       "convkit-run.json")
    if not dry_run and not result.ok:
        from ..recipes import RunFailed

        raise RunFailed(result.failure_message(), exit_code=result.exit_code)
