"""Read-ahead into reusable buffers, and pipelined CRCs of a written file.

Whole-tensor work (quantizers need whole rows / whole tensors) cannot use the fixed-size
chunk rings of :mod:`convkit.chunked`, but it can reuse its idea: fresh multi-MB allocations
per tensor cost page faults comparable to the quantization itself. :class:`BufferPool` hands
out uint8 buffers that go back to the pool once the writer thread has written them (or the
consumer is done with them); :func:`read_ahead` fills them from a reader thread, so reading
tensor *n+1* overlaps quantizing tensor *n* and writing tensor *n-1*.
"""
from __future__ import annotations

import os
import queue
import threading
import zlib

import torch

from .. import dtypes

_MB = 1 << 20


class BufferPool:
    """At most ``max_buffers`` reusable uint8 buffers (grown to the largest size asked for)."""

    def __init__(self, max_buffers: int):
        self.max = max_buffers
        self._free: list[torch.Tensor] = []
        self._count = 0
        self._cv = threading.Condition()
        self.closed = False

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` (waits while all buffers are in use)."""
        with self._cv:
            while True:
                if self.closed:
                    raise RuntimeError("buffer pool closed")
                fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
                if fits:   # the smallest that fits (by index: tensors have no identity ==)
                    return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
                if self._count < self.max:
                    self._count += 1
                    return torch.empty(-(-max(nbytes, 1) // _MB) * _MB, dtype=torch.uint8)
                if self._free:      # all free ones too small: replace the largest
                    self._free.pop(max(range(len(self._free)),
                                       key=lambda i: self._free[i].numel()))
                    return torch.empty(-(-max(nbytes, 1) // _MB) * _MB, dtype=torch.uint8)
                self._cv.wait(0.2)

    def release(self, buf: torch.Tensor) -> None:
        with self._cv:
            self._free.append(buf)
            self._cv.notify_all()

    def releaser(self, buf: torch.Tensor):
        return lambda: self.release(buf)

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._free.clear()
            self._cv.notify_all()


_END = object()


def _direct(source, info) -> bool:
    """True when the stored bytes of a tensor are its values (no dequantization on load)."""
    return (getattr(source, "supports_ranges", False) and info.storage in (None, "", info.dtype)
            and info.nbytes == dtypes.itemsize(info.dtype) * _numel(info.shape))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def read_ahead(source, keys: list, pool: BufferPool, depth: int = 1):
    """Yield ``(key, tensor, release)`` for every key (None keys yield (None, None, noop)).

    Tensors whose bytes can be read as stored go into pool buffers (``release()`` hands the
    buffer back: call it when the tensor and every view of it are no longer needed, e.g. from
    the writer thread); others come from ``source.load`` (``release`` is a no-op). A reader
    thread stays up to ``depth`` tensors ahead.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def noop():
        pass

    def run():
        try:
            for k in keys:
                if stop.is_set():
                    return
                if k is None:
                    item = (None, None, noop)
                else:
                    info = source.info(k)
                    if _direct(source, info):
                        buf = pool.acquire(info.nbytes)
                        view = buf[: info.nbytes]
                        source.read_range(k, 0, view)
                        t = view.view(dtypes.to_torch(info.dtype)).reshape(info.shape)
                        item = (k, t, pool.releaser(buf))
                    else:
                        item = (k, source.load(k), noop)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
            q.put(_END)
        except BaseException as e:   # handed to the consumer
            q.put(e)

    th = threading.Thread(target=run, name="convkit-quant-reader", daemon=True)
    th.start()
    try:
        while True:
            try:
                got = q.get(timeout=0.2)
            except queue.Empty:
                if not th.is_alive() and q.empty():
                    raise RuntimeError("tensor reader stopped unexpectedly") from None
                continue
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        while True:     # unblock a reader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                break
        th.join(timeout=5)


def crc_ranges(path, ranges: list[tuple[int, int]], block: int = 16 * _MB) -> list[int]:
    """CRC32 of each (offset, size) range of ``path``: a reader thread fills two reusable
    buffers while the calling thread checksums (zlib releases the GIL), so RSS stays small."""
    fd = os.open(path, os.O_RDONLY)
    bufs = [bytearray(block), bytearray(block)]
    free: queue.Queue = queue.Queue()
    for b in bufs:
        free.put(b)
    full: queue.Queue = queue.Queue()
    stop = threading.Event()

    def run():
        try:
            for i, (off, size) in enumerate(ranges):
                pos = 0
                while pos < size:
                    n = min(block, size - pos)
                    b = free.get()
                    if stop.is_set():
                        return
                    mv = memoryview(b)[:n]
                    got = 0
                    while got < n:
                        r = os.preadv(fd, [mv[got:]], off + pos + got)
                        if r <= 0:
                            raise OSError(f"{path}: file ended early")
                        got += r
                    full.put((i, b, n))
                    pos += n
            full.put(None)
        except BaseException as e:
            full.put(e)

    th = threading.Thread(target=run, name="convkit-verify-reader", daemon=True)
    th.start()
    crcs = [0] * len(ranges)
    try:
        while True:
            got = full.get()
            if got is None:
                break
            if isinstance(got, BaseException):
                raise got
            i, b, n = got
            crcs[i] = zlib.crc32(memoryview(b)[:n], crcs[i])
            free.put(b)
    finally:
        stop.set()
        free.put(bufs[0])
        th.join()
        os.close(fd)
    return crcs
