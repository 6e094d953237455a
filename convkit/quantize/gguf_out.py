"""Streaming, atomic GGUF (v3) writer.

The header (key/values and tensor infos) is known from the plan and written first; tensor data
then follows one tensor at a time, each aligned to ``general.alignment`` (32). One string value
(the error report) is reserved at a fixed width and filled in just before the file is renamed
into place, so the summary of the measured errors lives in the file's own metadata.
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import UsageError
from ..writer import WriterThread, _os_error, discard, temp_path_for

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


class GGUFStreamWriter:
    """``kvs``: [(key, GGUFValueType, value[, array subtype])]; ``tensors``: [(name, qtype,
    stored numpy-order shape)]. ``reserve``: (key, width) of a string value filled in later."""

    def __init__(self, path: str | os.PathLike, kvs: list[tuple], tensors: list[tuple[str, str, tuple]],
                 reserve: tuple[str, int] | None = None):
        self.path = Path(path)
        self.tmp = temp_path_for(self.path)
        self.tensors = tensors
        long = [n for n, _, _ in tensors if len(n.encode("utf-8")) > MAX_NAME]
        if long:
            raise UsageError(f"GGUF tensor names are limited to {MAX_NAME} bytes; too long: "
                             + ", ".join(f"'{n}' ({len(n)})" for n in long[:5]))
        head = bytearray()
        kv_blobs = []
        self._reserve_at = None
        self._reserve_width = 0
        for kv in kvs:
            kv_blobs.append(encode_kv(*kv))
        if reserve:
            key, width = reserve
            kv_blobs.append(encode_kv(key, GGUFValueType.STRING, " " * width))
        head += MAGIC + struct.pack("<I", VERSION) + struct.pack("<Q", len(tensors))
        head += struct.pack("<Q", len(kv_blobs))
        for i, blob in enumerate(kv_blobs):
            if reserve and i == len(kv_blobs) - 1:
                self._reserve_at = len(head) + len(blob) - reserve[1]
                self._reserve_width = reserve[1]
            head += blob
        offset = 0
        self._sizes = []
        for name, qtype, shape in tensors:
            dims = list(reversed(shape)) or [1]
            head += _str(name) + struct.pack("<I", len(dims))
            head += b"".join(struct.pack("<Q", d) for d in dims)
            head += struct.pack("<I", int(ggml_type(qtype))) + struct.pack("<Q", offset)
            size = tensor_nbytes(qtype, shape)
            self._sizes.append(size)
            offset += size + (-size % ALIGN)
        head += b"\0" * (-len(head) % ALIGN)
        self._header = bytes(head)
        self.total_bytes = len(head) + offset
        self._next = 0
        self._f = None
        self._thread: WriterThread | None = None

    def __enter__(self):
        try:
            self._f = open(self.tmp, "xb")
            self._f.write(self._header)
        except OSError as e:
            self._cleanup()
            raise _os_error(e, self.path) from None
        return self

    # -- background writing (write_async) -------------------------------------------------
    def _write_padded(self, buf) -> None:
        self._f.write(buf)
        if len(buf) % ALIGN:
            self._f.write(b"\0" * (-len(buf) % ALIGN))

    def _raise_if_failed(self) -> None:
        if self._thread is not None:
            self._thread.check()

    def _stop_thread(self) -> None:
        t, self._thread = self._thread, None
        if t is not None:
            t.stop()
            t.check()  # a failure of the finished thread surfaces here

    def write_async(self, name: str, data: np.ndarray, release=None) -> None:
        """Like :meth:`write`, but a writer thread writes ``data``; ``release()`` is called
        (from that thread) once the bytes are written, so the caller can reuse the buffer."""
        buf = self._check(name, data)
        if self._thread is None:
            self._thread = WriterThread(self._write_padded, self.path, 2,
                                        "convkit-gguf-writer").start()
        self._thread.put(buf, release)
        self._next += 1

    def _check(self, name: str, data) -> memoryview:
        if self._next >= len(self.tensors) or self.tensors[self._next][0] != name:
            raise UsageError(f"GGUF tensor '{name}' written out of order", path=self.path)
        size = self._sizes[self._next]
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        if len(buf) != size:
            raise UsageError(f"GGUF tensor '{name}': got {len(buf)} bytes, planned {size}",
                             path=self.path)
        return buf

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self._cleanup()

    def write(self, name: str, data: np.ndarray) -> None:
        self._stop_thread()     # keep the order with earlier write_async calls
        self._raise_if_failed()
        buf = self._check(name, data)
        size = len(buf)
        try:
            self._f.write(buf)
            if size % ALIGN:
                self._f.write(b"\0" * (-size % ALIGN))
        except OSError as e:
            raise _os_error(e, self.path) from None
        self._next += 1

    def fill_reserved(self, text: str) -> None:
        self._stop_thread()
        self._raise_if_failed()
        raw = text.encode("utf-8")[: self._reserve_width]
        raw += b" " * (self._reserve_width - len(raw))
        pos = self._f.tell()
        self._f.seek(self._reserve_at)
        self._f.write(raw)
        self._f.seek(pos)

    def commit(self) -> Path:
        try:
            self._stop_thread()
            self._raise_if_failed()
            if self._next != len(self.tensors):
                raise UsageError(f"only {self._next} of {len(self.tensors)} tensors were written",
                                 path=self.path)
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._cleanup()
            raise _os_error(e, self.path) from None
        except BaseException:
            self._cleanup()
            raise
        return self.path

    def _cleanup(self):
        try:
            self._stop_thread()
        except Exception:
            pass
        discard(self._f, self.tmp)
        self._f = None
