"""GGUF files (v2, v3; little-endian): the header is parsed and validated here, tensors are read
with pread and block types decoded by :mod:`convkit.kernels.dequant`.

The header is read with ordinary buffered reads (the file is never memory-mapped): every count
and length is checked against the bytes left in the file before anything is read or allocated,
so a damaged file gives one precise line (``InputFormatError``), never a traceback or a huge
allocation. Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic, version
u32, tensor count u64, key/value count u64, the key/values, the tensor infos (name, n_dims u32,
dims u64 innermost first, GGML type u32, offset u64), padding to ``general.alignment``, data.

Logical shapes follow numpy order (GGUF dims reversed). ComfyUI-GGUF's
``comfy.gguf.orig_shape.<name>`` (an int array) restores shapes that were rearranged into rows;
:meth:`GGUFFile.stored_shape` keeps the shape as stored.
"""
from __future__ import annotations

import itertools
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .. import dtypes
from ..errors import InputFormatError, raise_all
from .base import TensorInfo, TensorSource
from .safetensors_file import read_exact

ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
_PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
          "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}
_HINT_DAMAGED = "the file is damaged or not a GGUF file; download or export it again"

DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4         # levels of arrays in arrays (gguf-py writes them; ggml reads none)
MAX_STRING = 64 << 20       # one string (real ones: names, chat templates, tokens)
MAX_ARRAY = 1 << 24         # values in one array (real ones: vocabularies of ~10^5..10^6)

# GGUF value types: id -> (name, struct format, numpy dtype); 8 = string, 9 = array
_SCALARS = {0: ("uint8", "<B", "<u1"), 1: ("int8", "<b", "<i1"), 2: ("uint16", "<H", "<u2"),
            3: ("int16", "<h", "<i2"), 4: ("uint32", "<I", "<u4"), 5: ("int32", "<i", "<i4"),
            6: ("float32", "<f", "<f4"), 7: ("bool", "<B", "<u1"), 10: ("uint64", "<Q", "<u8"),
            11: ("int64", "<q", "<i8"), 12: ("float64", "<d", "<f8")}
_INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def _shown(s: str, limit: int = 120) -> str:
    """A key or tensor name as it can go into a one-line message (damaged files hold any
    bytes): control characters escaped, long names cut."""
    if not s.isprintable():
        s = s.encode("unicode_escape").decode("ascii")
    return s if len(s) <= limit else s[:limit] + "..."


class _Fatal(Exception):
    """A framing error: nothing after it can be trusted (carried to the one raise site)."""


class _HeaderReader:
    """Sequential little-endian reads of the header, each checked against the file size."""

    def __init__(self, f, size: int):
        self.f, self.size, self.pos = f, size, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise _Fatal(f"truncated: {what} at byte {self.pos} needs {n} bytes but the file "
                         f"has {self.left} left")
        b = self.f.read(n)
        if len(b) != n:  # the file shrank under us
            raise _Fatal(f"truncated: {what} at byte {self.pos}")
        self.pos += n
        return b

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > MAX_STRING or n > self.left:
            raise _Fatal(f"{what} at byte {self.pos - 8} claims {n} bytes"
                         + (f" (limit {MAX_STRING})" if n <= self.left else
                            f" but the file has {self.left} left"))
        return self.take(n, what).decode("utf-8", "replace")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype == _STRING:
            return self.string(what)
        if vtype in _SCALARS:
            _, fmt, _ = _SCALARS[vtype]
            v = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]
            return bool(v) if vtype == 7 else v
        if vtype != _ARRAY:
            raise _Fatal(f"{what} has unknown value type {vtype}")
        sub = self.u32(f"element type of {what}")
        count = self.u64(f"length of {what}")
        if sub == _ARRAY and depth + 2 > MAX_ARRAY_DEPTH:  # this array is level depth + 1
            raise _Fatal(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
        if sub in _SCALARS:
            item = struct.calcsize(_SCALARS[sub][1])
        elif sub in (_STRING, _ARRAY):
            item = 8 if sub == _STRING else 12  # the smallest encoding of one element
        else:
            raise _Fatal(f"{what} has unknown element type {sub}")
        if count > MAX_ARRAY or count * item > self.left:
            raise _Fatal(f"{what} claims {count} elements"
                         + (f" (limit {MAX_ARRAY})" if count * item <= self.left else
                            f" but the file has {self.left} bytes left"))
        if sub in _SCALARS:
            arr = np.frombuffer(self.take(count * item, what), dtype=_SCALARS[sub][2])
            return arr.astype(bool).tolist() if sub == 7 else arr.tolist()
        return [self.value(sub, what, depth + 1) for _ in range(count)]


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def _type_name(vtype: int) -> str:
    return {_STRING: "string", _ARRAY: "array"}.get(vtype) or _SCALARS[vtype][0]


class GGUFFile(TensorSource):
    supports_ranges = True

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        super().__init__(path=path, format="gguf")
        self.fields: dict[str, object] = {}
        self.field_types: dict[str, str] = {}     # key -> GGUF value type name
        self._offsets: dict[str, int] = {}
        self._stored: dict[str, tuple[int, ...]] = {}
        self._fd = None
        try:
            with open(path, "rb", buffering=1 << 16) as f:
                size = os.fstat(f.fileno()).st_size
                self._parse(_HeaderReader(f, size))
        except _Fatal as e:
            raise InputFormatError(str(e), path=path, hint=_HINT_DAMAGED) from None
        except MemoryError:
            raise InputFormatError("header too large to read", path=path,
                                   hint=_HINT_DAMAGED) from None
        except OSError as e:
            raise InputFormatError(f"cannot read ({e.strerror or e})", path=path) from None
        self._fd = os.open(path, os.O_RDONLY)

    # ------------------------------------------------------------------ header
    def _parse(self, r: _HeaderReader) -> None:
        path = self.path
        magic = r.take(4, "magic")
        if magic != b"GGUF":
            raise _Fatal(f"not a GGUF file (magic {magic!r})")
        version = r.u32("version")
        if version not in (2, 3):
            if version in (2 << 24, 3 << 24):
                raise InputFormatError("big-endian GGUF is not supported", path=path,
                                       hint="convert it to a little-endian GGUF")
            raise InputFormatError(f"unsupported GGUF version {version} (convkit reads 2 and 3)",
                                   path=path, hint="re-export it with a current GGUF tool"
                                   if version == 1 else _HINT_DAMAGED)
        n_tensors = r.u64("tensor count")
        n_kv = r.u64("key/value count")
        # the smallest key/value is 13 bytes (empty key, type, one byte); a tensor info 24
        if n_kv * 13 + n_tensors * 24 > r.left:
            raise _Fatal(f"truncated or damaged: the header claims {n_tensors} tensors and {n_kv} "
                         f"key/values, more than the {r.left} bytes left in the file can hold")
        problems: list[InputFormatError] = []
        for i in range(n_kv):
            key = r.string(f"key {i}")
            vtype = r.u32(f"value type of '{_shown(key)}'")
            value = r.value(vtype, f"value of '{_shown(key)}'")
            if key in self.fields:
                problems.append(InputFormatError(f"key '{_shown(key)}' appears twice", path=path,
                                                 hint=_HINT_DAMAGED))
            self.fields[key] = value
            self.field_types[key] = _type_name(vtype)
            self.metadata[key] = value if isinstance(value, str) else repr(value)

        align = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in self.fields and (
                self.field_types["general.alignment"] != "uint32" or align <= 0
                or align & (align - 1)):
            raise _Fatal(f"general.alignment must be a uint32 power of two, found "
                         f"{self.field_types['general.alignment']} {align!r}")

        raw_infos = []
        for i in range(n_tensors):
            name = r.string(f"name of tensor {i}")
            what = f"tensor '{_shown(name)}'"
            n_dims = r.u32(f"n_dims of {what}")
            if n_dims > MAX_DIMS:  # 0 is a scalar (gguf-py writes 0-d arrays so)
                raise _Fatal(f"{what} has {n_dims} dimensions (GGUF allows up to {MAX_DIMS})")
            dims = struct.unpack(f"<{n_dims}Q", r.take(8 * n_dims, f"dims of {what}"))
            tid = r.u32(f"type of {what}")
            offset = r.u64(f"offset of {what}")
            raw_infos.append((name, dims, tid, offset))
        data_start = -(-r.pos // align) * align
        data_size = r.size - data_start

        spans = []
        for name, dims, tid, offset in raw_infos:
            bad = self._add_tensor(name, dims, tid, offset, align, data_size)
            if bad:
                problems.append(InputFormatError(bad, path=path, key=_shown(name),
                                                 hint=_HINT_DAMAGED))
            else:
                spans.append((offset, offset + self._infos[name].nbytes, name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in itertools.pairwise(spans):
            if b1 < e0:
                problems.append(InputFormatError(
                    f"data [{b1}, {e1}) overlaps '{_shown(n0)}' [{b0}, {e0})", path=path,
                    key=_shown(n1),
                    hint=_HINT_DAMAGED))
        self._data_start = data_start
        problems += self._apply_orig_shapes()
        raise_all(problems)

    def _add_tensor(self, name, dims, tid, offset, align, data_size) -> str | None:
        """Record one tensor info; return what is wrong with it instead, if anything."""
        if name in self._infos:
            return "tensor name appears twice"
        try:
            qtype = GGMLQuantizationType(tid)
            bs, ts = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            return (f"unknown GGML type id {tid} (not in gguf-py {_gguf_version()}: damage, or a "
                    "type newer than it)")
        if any(d == 0 or d >= 1 << 63 for d in dims):
            return f"invalid dimensions {list(dims)}"
        n = math.prod(dims)
        if n >= 1 << 63:
            return f"dimensions {list(dims)} hold more than 2**63 values"
        if (dims[0] if dims else 1) % bs:
            return (f"{qtype.name} row of {dims[0]} values is not a whole number of {bs}-value "
                    "blocks")
        nbytes = n // bs * ts
        if offset % align:
            return f"data offset {offset} is not a multiple of the alignment {align}"
        if offset + nbytes > data_size:
            return (f"truncated: data [{offset}, {offset + nbytes}) runs past the "
                    f"{max(data_size, 0)} bytes of the data section")
        shape = tuple(int(d) for d in reversed(dims))
        dt = _PLAIN.get(qtype.name, "F32")
        self._infos[name] = TensorInfo(name, dt, shape, nbytes, storage=qtype.name)
        self._offsets[name] = offset
        self._stored[name] = shape
        return None

    def _apply_orig_shapes(self) -> list[InputFormatError]:
        problems = []
        for key, value in self.fields.items():
            if not key.startswith(ORIG_SHAPE_PREFIX):
                continue
            name = key[len(ORIG_SHAPE_PREFIX):]
            info = self._infos.get(name)
            if info is None:
                continue  # describes no tensor of this file; nothing to restore
            ok = (isinstance(value, list) and value
                  and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
            if not ok or math.prod(value) != info.numel:
                problems.append(InputFormatError(
                    f"{_shown(key)} is {repr(value)[:80]}, not positive integers whose product "
                    f"is the tensor's {info.numel} values", path=self.path, key=_shown(name),
                    hint=_HINT_DAMAGED))
                continue
            self._infos[name] = TensorInfo(name, info.dtype, tuple(value), info.nbytes,
                                           storage=info.storage)
        return problems

    # ------------------------------------------------------------------ access
    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def stored_shape(self, name: str) -> tuple[int, ...]:
        """The shape as stored in the file (numpy order, before comfy's orig_shape)."""
        return self._stored[name]

    def read_range(self, name: str, start: int, out) -> None:
        info = self._infos[name]
        n = out.numel() if isinstance(out, torch.Tensor) else out.size
        if start < 0 or start + n > info.nbytes:
            raise ValueError(f"range [{start}, {start + n}) outside '{name}'")
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        if n:
            buf = out if isinstance(out, torch.Tensor) else torch.from_numpy(out)
            read_exact(self._fd, buf, self._data_start + self._offsets[name] + start, self.path,
                       name)

    def _load(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.storage in _PLAIN:
            self.read_range(name, 0, raw)
            return raw.view(dtypes.to_torch(info.dtype)).reshape(info.shape)
        from ..kernels.dequant import ggml_decodable, ggml_decode

        if not ggml_decodable(info.storage):
            raise InputFormatError(f"GGML type {info.storage} cannot be dequantized by convkit",
                                   path=self.path, key=name,
                                   hint=f"convert it with a tool that supports {info.storage}, "
                                        "or re-download in Q8_0/F16")
        self.read_range(name, 0, raw)
        out = np.empty(info.numel, dtype=np.float32)
        ggml_decode(info.storage, raw.numpy(), out)
        return torch.from_numpy(out).reshape(info.shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
