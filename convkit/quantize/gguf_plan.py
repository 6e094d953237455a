"""Pieces every GGUF output of a quantize plan shares (main file, sd.cpp bundle, extras)."""
from __future__ import annotations

from gguf.constants import GGUFValueType

from .. import dtypes
from ..engine import Item, Out, Src
from .ops import GGUFBlocksOp, GGUFFloatOp
from .plan import GGUF_QUANT_VERSION
from .rules import gguf_file_type


def gguf_kvs(qtype: str, arch: str | None) -> list[tuple]:
    """The typed GGUF key/values every convkit GGUF starts with."""
    import gguf

    kvs = []
    if arch:
        kvs.append(("general.architecture", GGUFValueType.STRING, arch))
    kvs += [("general.quantization_version", GGUFValueType.UINT32, GGUF_QUANT_VERSION),
            ("general.file_type", GGUFValueType.UINT32,
             int(gguf.LlamaFileType[gguf_file_type(qtype)]))]
    return kvs


def gguf_item(blocks: GGUFBlocksOp, floats: GGUFFloatOp, key: str, name: str, info, dec,
              file: str) -> Item:
    """The item of one tensor of a GGUF output, as the typer decided."""
    op = blocks if dec.qtype not in ("F32", "F16", "BF16") and dtypes.is_float(info.dtype) \
        else floats
    return Item(op, (Src(0, key),), [Out(name, dec.qtype, dec.stored_shape, file)], info.shape,
                info.dtype, info.storage, info.nbytes, reason=dec.reason, wanted=dec.wanted,
                qtype=dec.qtype, extra={"in_model": True, "orig_shape": dec.orig_shape})
