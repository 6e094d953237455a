"""Output sinks: one file each, with the same verbs for every format.

The whole layout of an output file is known from the plan (names, dtypes, shapes, metadata),
so a sink writes the header, gives the temp file its final size, and then accepts the bytes of
any tensor at their place (:meth:`PositionalFile.write_at`) from any worker thread, in any
order. :meth:`commit` checks that every byte was written, fsyncs and renames the temp file
into place; :meth:`abort` removes it. Temp files live beside the target
(``.NAME.convkit-PID-XXXXXXXX.tmp``; ones left by a killed run are removed by the next run
into that folder) and get the mode a plain ``open()`` gives under the user's umask.

Sinks are registered by name (``safetensors``, ``gguf``) in :mod:`convkit.registry`.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ..errors import OutputError, UsageError
from ..writer import (OutSpec, _os_error, build_header, check_output, cleanup_stale,  # noqa: F401
                      create_temp, discard_fd, temp_path_for)
from .plan import Out, OutFile

__all__ = ["PositionalFile", "SafetensorsSink", "GGUFSink", "check_output", "open_sink"]


class PositionalFile:
    """A temp file of known size, filled by positional writes, renamed into place at commit."""

    def __init__(self, path: Path, header: bytes, size: int, spans: dict[str, tuple[int, int]],
                 reserve: tuple[int, int] | None = None):
        self.path = Path(path)
        self.tmp = temp_path_for(self.path)
        self.header, self.size, self.spans = header, size, spans   # key -> (offset, nbytes)
        self.reserve = reserve                                       # (offset, width)
        self.written: dict[str, int] = {k: 0 for k in spans}
        self._lock = threading.Lock()
        self._fd: int | None = None

    def open(self) -> "PositionalFile":
        cleanup_stale(self.path.parent)
        try:
            self._fd = create_temp(self.tmp)
            self._pwrite(memoryview(self.header), 0)
            os.ftruncate(self._fd, self.size)
        except OSError as e:
            self.abort()
            raise _os_error(e, self.path) from None
        except BaseException:
            self.abort()
            raise
        return self

    def _pwrite(self, mv: memoryview, pos: int) -> None:
        done, n = 0, len(mv)
        while done < n:
            done += os.pwrite(self._fd, mv[done:], pos + done)

    def write_at(self, key: str, start: int, data) -> int:
        """Write ``data`` (uint8 tensor or numpy array, any shape, contiguous) as bytes
        ``start:`` of tensor ``key``; returns the absolute file offset."""
        off, nbytes = self.spans[key]
        if isinstance(data, torch.Tensor):
            data = data.numpy()
        mv = memoryview(data).cast("B") if data.size else memoryview(b"")
        n = len(mv)
        if start < 0 or start + n > nbytes:
            raise UsageError(f"bytes {start}:{start + n} outside the planned {nbytes}",
                             path=self.path, key=key)
        try:
            self._pwrite(mv, off + start)
        except OSError as e:
            raise _os_error(e, self.path) from None
        with self._lock:
            self.written[key] += n
        return off + start

    def fill(self, make) -> None:
        """Fill the reserved metadata value with ``make(width)`` (a string of at most ``width``
        bytes; padded with spaces)."""
        if self.reserve is None:
            return
        at, width = self.reserve
        raw = make(width).encode("utf-8")[:width]
        self._pwrite(memoryview(raw + b" " * (width - len(raw))), at)

    def commit(self) -> Path:
        try:
            missing = [k for k, (_, n) in self.spans.items() if self.written[k] != n]
            if missing:
                k = missing[0]
                raise OutputError(f"internal error: tensor '{k}' got {self.written[k]} of "
                                  f"{self.spans[k][1]} bytes ({len(missing)} tensors incomplete)",
                                  path=self.path)
            try:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
                os.replace(self.tmp, self.path)
            except OSError as e:
                raise _os_error(e, self.path) from None
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Remove the temp file; never raises over the error being handled."""
        fd, self._fd = self._fd, None
        discard_fd(fd, self.tmp)


class SafetensorsSink(PositionalFile):
    """A safetensors file: JSON header (8-byte aligned), then the tensors in plan order."""

    def __init__(self, path: Path, outs: list[Out], spec: OutFile):
        meta = dict(spec.metadata)
        placeholder = "~" * RESERVE_WIDTH
        if spec.reserve:
            meta[spec.reserve] = placeholder
        header = build_header([OutSpec(o.key, o.dtype, o.shape) for o in outs], meta)
        spans, off = {}, len(header)
        for o in outs:
            spans[o.key] = (off, o.nbytes)
            off += o.nbytes
        reserve = None
        if spec.reserve:
            import json

            needle = (json.dumps(spec.reserve) + ":" + json.dumps(placeholder)).encode()
            at = header.find(needle)
            reserve = (at + len(needle) - RESERVE_WIDTH - 1, RESERVE_WIDTH)
        super().__init__(path, header, off, spans, reserve)

    def fill(self, make) -> None:
        import json

        if self.reserve is None:
            return
        width = self.reserve[1]
        # the value sits inside a JSON string: escaped, it must still fit the width
        for w in (width, width * 2 // 3, width // 2, width // 4):
            esc = json.dumps(make(w), ensure_ascii=True)[1:-1]
            if len(esc) <= width:
                break
        else:
            esc = ""
        super().fill(lambda _: esc)


class GGUFSink(PositionalFile):
    """A GGUF v3 file: key/values (``spec.kvs`` then ``spec.metadata`` as strings), tensor
    infos, then the tensors aligned to 32 bytes."""

    def __init__(self, path: Path, outs: list[Out], spec: OutFile):
        from gguf.constants import GGUFValueType

        from ..quantize.gguf_out import gguf_header

        kvs = list(spec.kvs)
        taken = {kv[0] for kv in kvs}
        kvs += [(k, GGUFValueType.STRING, str(v)) for k, v in spec.metadata.items()
                if k not in taken and k != spec.reserve]
        header, reserve_at, offsets, size = gguf_header(
            kvs, [(o.key, o.dtype, o.shape) for o in outs],
            (spec.reserve, RESERVE_WIDTH) if spec.reserve else None)
        spans = {o.key: (len(header) + rel, o.nbytes) for o, rel in zip(outs, offsets)}
        super().__init__(path, header, size, spans,
                         (reserve_at, RESERVE_WIDTH) if reserve_at is not None else None)


#: width of a reserved metadata value (the quantization error report)
RESERVE_WIDTH = 2048

def _register() -> None:
    from .. import registry

    registry.add("sink", "safetensors", SafetensorsSink,
                 help="safetensors file (ComfyUI, Forge, A1111, diffusers single file)")
    registry.add("sink", "gguf", GGUFSink,
                 help="GGUF v3 file (ComfyUI-GGUF, stable-diffusion.cpp, llama.cpp)")


_register()


def open_sink(path: Path, outs: list[Out], spec: OutFile) -> PositionalFile:
    from .. import registry

    cls = registry.get("sink", spec.sink)
    return cls(path, outs, spec).open()
