"""The ``convkit`` command line: thin Click commands over the library API.

Each command lives in its own module and is added to :data:`main` here; errors become one line
and an exit code in one place (:class:`~convkit.cli.common.ConvkitGroup`; ``CONVKIT_DEBUG=1``
shows the traceback). Library packages never import this package.
"""
from __future__ import annotations

from ..runtime import prefer_io_friendly_threads

prefer_io_friendly_threads()  # before anything imports torch

import click  # noqa: E402

from .. import __version__  # noqa: E402
from .common import ConvkitGroup, quiet_third_party_logs  # noqa: E402
from .convert_cmd import convert  # noqa: E402
from .demo_cmd import demo  # noqa: E402
from .inspect_cmd import inspect  # noqa: E402
from .layout_cmds import assemble_cmd, split_cmd  # noqa: E402
from .lora_cmds import convert_lora_cmd, extract_lora_cmd, merge_lora_cmd  # noqa: E402
from .publish_cmd import publish_cmd  # noqa: E402
from .quantize_cmd import quantize_cmd  # noqa: E402
from .run_cmd import run_cmd  # noqa: E402
from .verify_cmd import verify_cmd  # noqa: E402


@click.group(cls=ConvkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convkit")
def main():
    """Convert, quantize and merge diffusion checkpoints (SD1.5, SDXL, Flux).

    Every input - any dtype, fp8 (plain or scaled), NF4/FP4, GGUF, quanto/torchao folders,
    single files or diffusers folders - is read as its logical weights.

    \b
    Examples:
      convkit inspect model.safetensors
      convkit convert model.safetensors model-fp16.safetensors --dtype fp16
      convkit convert model.safetensors ./model-diffusers --layout diffusers
      convkit split model.safetensors -o comfy-models --for comfyui
      convkit quantize model.safetensors model-Q8_0.gguf --to gguf:Q8_0
      convkit verify model-Q8_0.gguf --reference model.safetensors --report report/
      convkit run lightning-merge --set model=custom.safetensors
      convkit publish lightning-merge --repo me/my-model-lightning --dry-run
      convkit demo
    """
    quiet_third_party_logs()


for _cmd in (inspect, convert, split_cmd, assemble_cmd, quantize_cmd, merge_lora_cmd,
             extract_lora_cmd, convert_lora_cmd, verify_cmd, run_cmd, publish_cmd, demo):
    main.add_command(_cmd)

__all__ = ["main"]
