"""LoRA tooling: merge into a checkpoint, extract from a fine-tune, convert between formats.

Library API (the CLI in :mod:`convkit.cli.lora_cmds` is a thin layer over these)::

    from convkit.lora import merge_lora, extract_lora, convert_lora, read_lora
    merge_lora("base.safetensors", ["lightning.safetensors:1.0"], "out.safetensors", dtype="fp16")
    extract_lora("tuned.safetensors", "base.safetensors", "lora.safetensors", rank=64)
    convert_lora("lora.safetensors", "lora-peft.safetensors", "peft")
"""
from __future__ import annotations

from .convert import ConvertLoraResult, convert_lora
from .extract import ExtractResult, extract_lora
from .formats import Adapter, LoraFile, read_lora
from .merge import LoraSpec, MergeResult, UnmatchedLoraError, merge_lora
from .table import ModuleTable, table_for_arch, table_for_source

__all__ = ["merge_lora", "extract_lora", "convert_lora", "read_lora", "LoraSpec", "MergeResult",
           "ExtractResult", "ConvertLoraResult", "UnmatchedLoraError", "Adapter", "LoraFile",
           "ModuleTable", "table_for_arch", "table_for_source"]
