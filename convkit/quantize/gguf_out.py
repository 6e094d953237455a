"""GGUF (v3) layout: key/value encoding, tensor infos, data offsets.

:func:`gguf_header` computes the whole header from the plan (key/values and tensor infos);
the engine's ``GGUFSink`` (:mod:`convkit.engine.sinks`) writes it and then each tensor's bytes
at its offset, aligned to ``general.alignment`` (32). One string value (the error report) is
reserved at a fixed width and filled in once the data is written, so the summary of the
measured errors lives in the file's own metadata.
"""
from __future__ import annotations

import math
import struct

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import UsageError

ALIGN = 32
MAGIC = b"GGUF"
VERSION = 3
MAX_NAME = 127
_FLOAT_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "I16": 2, "I32": 4,
                   "I64": 8}


def ggml_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def tensor_nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    if qtype in _FLOAT_ITEMSIZE:
        return n * _FLOAT_ITEMSIZE[qtype]
    bs, ts = GGML_QUANT_SIZES[ggml_type(qtype)]
    return n // bs * ts


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


_SCALAR = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


def encode_kv(key: str, vtype: GGUFValueType, value, sub: GGUFValueType | None = None) -> bytes:
    out = _str(key) + struct.pack("<I", int(vtype))
    if vtype == GGUFValueType.STRING:
        return out + _str(value)
    if vtype == GGUFValueType.ARRAY:
        out += struct.pack("<I", int(sub)) + struct.pack("<Q", len(value))
        if sub == GGUFValueType.STRING:
            return out + b"".join(_str(v) for v in value)
        return out + b"".join(struct.pack(_SCALAR[sub], v) for v in value)
    return out + struct.pack(_SCALAR[vtype], value)


def gguf_header(kvs: list[tuple], tensors: list[tuple[str, str, tuple]],
                reserve: tuple[str, int] | None = None):
    """The bytes of a GGUF v3 header for ``kvs`` ([(key, GGUFValueType, value[, subtype])])
    and ``tensors`` ([(name, GGML type, stored numpy-order shape)]), padded to ALIGN.

    Returns (header, offset of the reserved string value or None, data offsets of the tensors
    relative to the data section, total file size). ``reserve`` = (key, width): a string value of
    ``width`` spaces, filled in once the data is written (the error report)."""
    long = [n for n, _, _ in tensors if len(n.encode("utf-8")) > MAX_NAME]
    if long:
        raise UsageError(f"GGUF tensor names are limited to {MAX_NAME} bytes; too long: "
                         + ", ".join(f"'{n}' ({len(n)})" for n in long[:5]))
    blobs = [encode_kv(*kv) for kv in kvs]
    if reserve:
        blobs.append(encode_kv(reserve[0], GGUFValueType.STRING, " " * reserve[1]))
    head = bytearray(MAGIC + struct.pack("<I", VERSION) + struct.pack("<Q", len(tensors))
                     + struct.pack("<Q", len(blobs)))
    reserve_at = None
    for i, blob in enumerate(blobs):
        if reserve and i == len(blobs) - 1:
            reserve_at = len(head) + len(blob) - reserve[1]
        head += blob
    offsets, offset = [], 0
    for name, qtype, shape in tensors:
        dims = list(reversed(shape)) or [1]
        head += _str(name) + struct.pack("<I", len(dims))
        head += b"".join(struct.pack("<Q", d) for d in dims)
        head += struct.pack("<I", int(ggml_type(qtype))) + struct.pack("<Q", offset)
        offsets.append(offset)
        size = tensor_nbytes(qtype, shape)
        offset += size + (-size % ALIGN)
    head += b"\0" * (-len(head) % ALIGN)
    return bytes(head), reserve_at, offsets, len(head) + offset
