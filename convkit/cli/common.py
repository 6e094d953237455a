"""What every command shares: the group that turns errors into one line and an exit code,
output options (--json, --quiet), --dry-run printing, progress, registry-backed choices."""
from __future__ import annotations

import json
import os
import signal
import sys

import click

from ..errors import ConvkitError
from ..progress import Progress
from ..runtime import quiet_third_party_logs  # noqa: F401  (re-exported)
from ..units import parse_size  # noqa: F401  (re-exported for the commands)


def emit_error(msg: str) -> None:
    click.echo(f"convkit: error: {msg}", err=True)


class ConvkitGroup(click.Group):
    """The one place where convkit errors become ``convkit: error: ...`` and an exit code
    (``CONVKIT_DEBUG=1`` shows the traceback instead)."""

    def invoke(self, ctx):
        debug = os.environ.get("CONVKIT_DEBUG") == "1"
        # SIGTERM behaves like Ctrl-C: every writer cleans up its temp files.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return super().invoke(ctx)
        except ConvkitError as e:
            if debug:
                raise
            emit_error(str(e))
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            emit_error("interrupted; no output was written")
            sys.exit(130)
        except MemoryError:
            if debug:
                raise
            emit_error("out of memory; please report this with the command you ran")
            sys.exit(8)


class RegistryChoice(click.ParamType):
    """A name of a registry kind: the help lists the registered names, an unknown name fails
    with the nearest one suggested (exit 2), and the value stays as typed (the library looks
    it up again)."""

    def __init__(self, kind: str, normalise=None):
        self.kind, self.normalise = kind, normalise
        self.name = kind

    def get_metavar(self, param, ctx=None):
        from .. import registry

        names = registry.canonical(self.kind)
        return "[" + "|".join(names) + "]" if len(names) <= 8 else "NAME"

    def convert(self, value, param, ctx):
        from .. import registry

        v = self.normalise(value) if self.normalise else value
        # an unknown name raises UnknownNameError (exit 2, nearest name suggested), reported
        # as one line by ConvkitGroup like every other convkit error
        registry.get(self.kind, v)
        return value


def output_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print a JSON result on stdout.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress and no summary.")(f)
    return f


def dry_run_option(f):
    return click.option("--dry-run", is_flag=True,
                        help="Check everything and print the plan; write nothing.")(f)


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


def progress(quiet: bool, as_json: bool) -> Progress:
    return Progress(enabled=not (quiet or as_json) and sys.stderr.isatty())
