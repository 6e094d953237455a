"""safetensors files: the header is parsed and validated here, tensors are read one at a time.

We parse the header ourselves (rather than trusting the reader library's first error) so that a
damaged file gets one precise line: truncated, oversized header, overlapping or out-of-range
offsets, unknown dtype, shape/size mismatch.
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import torch

from .. import dtypes
from ..errors import InputFormatError, raise_all
from .base import TensorInfo, TensorSource
from .jsonsafe import loads

MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
_HINT_DAMAGED = "the file is damaged or incomplete; download or export it again"


def read_header(path: Path) -> tuple[dict, int, int]:
    """Return (header dict, data start offset, file size), validating the framing."""
    size = path.stat().st_size
    if size < 8:
        raise InputFormatError(f"file is {size} bytes, too short for a safetensors header",
                               path=path, hint=_HINT_DAMAGED)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise InputFormatError(f"header length {n} bytes exceeds the {MAX_HEADER}-byte limit; "
                                   "this is not a safetensors file or it is corrupt",
                                   path=path, hint=_HINT_DAMAGED)
        if 8 + n > size:
            raise InputFormatError(f"truncated: header needs {n} bytes but only {size - 8} follow",
                                   path=path, hint=_HINT_DAMAGED)
        raw = f.read(n)
    try:
        # duplicate names are refused: two parsers could disagree on which entry counts
        header = loads(raw, "header")
    except ValueError as e:
        raise InputFormatError(f"corrupt header ({e})", path=path, hint=_HINT_DAMAGED) from None
    if not isinstance(header, dict):
        raise InputFormatError("corrupt header (not a JSON object)", path=path, hint=_HINT_DAMAGED)
    return header, 8 + n, size


def parse_entries(path: Path, header: dict, data_size: int) -> tuple[dict[str, TensorInfo],
                                                                     dict[str, int], dict[str, str]]:
    """Validate every header entry; report all problems together."""
    problems: list[InputFormatError] = []
    meta = header.get("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        problems.append(InputFormatError("__metadata__ must map strings to strings", path=path))
        meta = {}
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]
        except (TypeError, KeyError, ValueError):
            problems.append(InputFormatError("header entry lacks dtype/shape/data_offsets",
                                             path=path, key=name, hint=_HINT_DAMAGED))
            continue
        if not dtypes.is_known(dt):
            problems.append(InputFormatError(f"unsupported dtype {dt!r}", path=path, key=name))
            continue
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not all(isinstance(o, int) for o in (begin, end))):
            problems.append(InputFormatError("malformed shape or offsets", path=path, key=name,
                                             hint=_HINT_DAMAGED))
            continue
        expect = math.prod(shape) * dtypes.itemsize(dt)
        if begin < 0 or end < begin or end - begin != expect:
            problems.append(InputFormatError(
                f"offsets [{begin}, {end}) hold {end - begin} bytes but {dt}{shape} needs {expect}",
                path=path, key=name, hint=_HINT_DAMAGED))
            continue
        if end > data_size:
            problems.append(InputFormatError(
                f"truncated: data ends at byte {end} of the data section but the file has only "
                f"{data_size} data bytes", path=path, key=name, hint=_HINT_DAMAGED))
            continue
        infos[name] = TensorInfo(name, dt, tuple(shape), end - begin)
        offsets[name] = begin
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1:
            problems.append(InputFormatError(
                f"offsets overlap with '{n0}' ([{b0}, {e0}) and [{b1}, {e1}))",
                path=path, key=n1, hint=_HINT_DAMAGED))
    raise_all(problems)
    return infos, offsets, {str(k): v for k, v in meta.items()}


class SafetensorsFile(TensorSource):
    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        header, data_start, size = read_header(path)
        infos, offsets, meta = parse_entries(path, header, size - data_start)
        super().__init__(path=path, format="safetensors", metadata=meta, _infos=infos)
        self._data_start = data_start
        self._offsets = offsets
        self._fd = os.open(path, os.O_RDONLY)

    def _load(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            read_exact(self._fd, buf, self._data_start + self._offsets[name], self.path, name)
        return buf.view(dtypes.to_torch(info.dtype)).reshape(info.shape)

    supports_ranges = True

    def read_range(self, name: str, start: int, out: torch.Tensor) -> None:
        info = self._infos[name]
        if start < 0 or start + out.numel() > info.nbytes:
            raise ValueError(f"range [{start}, {start + out.numel()}) outside '{name}'")
        if out.numel():
            read_exact(self._fd, out, self._data_start + self._offsets[name] + start, self.path,
                       name)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


_CHUNK = 1 << 30


def read_exact(fd: int, buf: torch.Tensor, offset: int, path: Path, name: str) -> None:
    """pread ``buf.numel()`` bytes at ``offset`` into ``buf`` (uint8), in <= 1 GiB calls."""
    view = memoryview(buf.numpy())
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:done + _CHUNK]], offset + done)
        if n <= 0:
            raise InputFormatError(f"file ended after {done} of {total} bytes",
                                   path=path, key=name, hint=_HINT_DAMAGED)
        done += n
