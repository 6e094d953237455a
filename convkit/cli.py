"""The ``convkit`` command line: thin Click commands over the library API.

Errors are turned into one line and an exit code in exactly one place (:class:`ConvkitGroup`);
set ``CONVKIT_DEBUG=1`` to see the traceback instead.
"""
from __future__ import annotations

import json
import os
import signal
import sys

from .runtime import prefer_io_friendly_threads

prefer_io_friendly_threads()  # before anything imports torch

import click  # noqa: E402

from . import __version__  # noqa: E402
from .errors import ConvkitError  # noqa: E402
from .progress import Progress  # noqa: E402


def _emit_error(msg: str) -> None:
    click.echo(f"convkit: error: {msg}", err=True)


class ConvkitGroup(click.Group):
    def invoke(self, ctx):
        debug = os.environ.get("CONVKIT_DEBUG") == "1"
        # SIGTERM behaves like Ctrl-C: every writer cleans up its temp files.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return super().invoke(ctx)
        except ConvkitError as e:
            if debug:
                raise
            _emit_error(str(e))
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            _emit_error("interrupted; no output was written")
            sys.exit(130)
        except MemoryError:
            if debug:
                raise
            _emit_error("out of memory; please report this with the command you ran")
            sys.exit(8)


def _quiet_third_party_logs() -> None:
    """Import-time chatter of optional backends (bitsandbytes, transformers) is not ours to show."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def output_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print a JSON result on stdout.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress and no summary.")(f)
    return f


def emit_plan_or_json(result, *, as_json: bool, dry_run: bool, quiet: bool = False,
                      limit: int | None = None) -> bool:
    """Print a command's --json result or its --dry-run plan; True if nothing more to print."""
    if as_json:
        d = result.to_dict()
        if dry_run:
            d["plan"] = result.plan.to_dict()
        click.echo(json.dumps(d, indent=2))
        return True
    if dry_run and not quiet:
        click.echo(result.plan.format(limit=limit) if limit else result.plan.format())
    return dry_run or quiet


def _progress(quiet: bool, as_json: bool) -> Progress:
    return Progress(enabled=not (quiet or as_json) and sys.stderr.isatty())


@click.group(cls=ConvkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convkit")
def main():
    """Convert, quantize and verify diffusion checkpoints (SD1.5, SDXL, Flux).

    \b
    Examples:
      convkit inspect model.safetensors
      convkit convert model.safetensors model-fp16.safetensors --dtype fp16
      convkit demo
    """
    _quiet_third_party_logs()


@main.command()
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
    from .inspection import format_report, inspect as do_inspect

    report = do_inspect(path, scan=scan, variant=variant, progress=_progress(quiet, as_json))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        click.echo(format_report(report))


@main.command()
@click.argument("input", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--dtype", default="fp16", show_default=True,
              help="Target float type: fp16, bf16 or fp32.")
@click.option("--components", default=None,
              help="Write only these components, e.g. 'unet' or 'unet,te,vae' "
                   "(te = all text encoders; te1, te2 one of them).")
@click.option("--on-overflow", type=click.Choice(["clamp", "inf", "error"]), default="clamp",
              show_default=True, help="Values beyond the fp16 range: clamp to ±65504 "
                                      "(and report), keep as inf, or refuse.")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--no-detect", is_flag=True, help="Do not require a known architecture.")
@click.option("--variant", default=None, help="diffusers weight variant to read (e.g. fp16).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="diffusers folders: largest weight file before sharding.")
@output_options
def convert(input, output, dtype, components, on_overflow, dry_run, overwrite, no_detect,
            variant, max_shard_size, quiet, as_json):
    """Convert float precision, streaming one tensor at a time.

    A single file gives a single file; a diffusers folder gives a diffusers folder.
    fp16 -> fp32 -> fp16 round-trips bit-exactly.

    \b
    Examples:
      convkit convert sd_xl_base_1.0.safetensors sdxl-fp16.safetensors --dtype fp16
      convkit convert model.safetensors unet-bf16.safetensors --dtype bf16 --components unet
      convkit convert ./diffusers-model ./diffusers-model-fp16 --dtype fp16 --dry-run
    """
    from .convert import convert as do_convert

    result = do_convert(input, output, dtype, components=components, overwrite=overwrite,
                        dry_run=dry_run, on_overflow=on_overflow, detect=not no_detect,
                        variant=variant, max_shard_bytes=parse_size(max_shard_size),
                        progress=_progress(quiet, as_json))
    if emit_plan_or_json(result, as_json=as_json, dry_run=dry_run, quiet=quiet):
        return
    s = result.stats
    click.echo(f"wrote {result.plan.out} ({s.bytes_written:,d} bytes, {s.tensors} tensors, "
               f"{s.seconds:.1f} s)")
    for n in result.plan.notes:
        click.echo(f"note: {n}")
    for name, count in sorted(result.overflows.items(), key=lambda kv: -kv[1])[:20]:
        click.echo(f"overflow: {name}: {count} values")


@main.command()
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
    from .demo import run_demo

    report = run_demo(out_dir, arch=arch,
                      echo=None if (quiet or as_json) else click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2))


def parse_size(text: str) -> int:
    from .errors import UsageError

    t = text.strip().upper().replace("IB", "B")
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1}
    for u, m in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * m)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise UsageError(f"cannot read size '{text}' (e.g. 5GB, 500MB)") from None


# Commands that live beside their library code register themselves on ``main`` when imported.
# (one import line per command module; keep the list sorted)
# --- command modules ---
from .lora import cli as _lora_cli  # noqa: E402,F401
from .quantize import cli as _quantize_cli  # noqa: E402,F401
# --- end command modules ---

if __name__ == "__main__":  # pragma: no cover
    main()
