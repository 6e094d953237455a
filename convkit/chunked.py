"""Chunked streaming for elementwise transforms (dtype casts, plain copies).

Whole-tensor streaming allocates a fresh buffer per tensor for reading and another for the
result; on large checkpoints the page faults of those allocations cost as much as the
conversion itself. Elementwise work does not need whole tensors, so here a reader thread
fills a small ring of reusable byte buffers, the caller's thread converts each chunk into a
second ring, and the writer thread writes and hands buffers back. Memory is fixed (a few
times CHUNK) and every buffer is touched once, then reused while it is still in cache.
"""
from __future__ import annotations

import itertools
import math
import os
import queue
import threading
from typing import Callable

import torch

from . import dtypes

CHUNK_BYTES = 8 << 20     # source bytes per chunk
RING = 3                  # buffers per ring

#: (item, start, src, out) -> None: convert one chunk (``start``: its first element's index)
ChunkFn = Callable[[object, int, torch.Tensor, torch.Tensor], None]
_END = object()


class _Reader(threading.Thread):
    """Reads every item's bytes, chunk by chunk, into buffers taken from ``free``."""

    def __init__(self, source, items, elems_of, free: queue.Queue, full: queue.Queue,
                 prepare=None):
        super().__init__(name="convkit-chunk-reader", daemon=True)
        self.source, self.items, self.elems_of = source, items, elems_of
        self.prepare = prepare
        self.free, self.full = free, full
        self.stop = threading.Event()

    def _take(self):
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def run(self) -> None:
        try:
            for it in self.items:
                isz = dtypes.itemsize(it.src_dtype)
                n = math.prod(it.shape)
                step = self.elems_of(it)
                if not step:  # whole tensor; the buffer only bounds the read-ahead
                    buf = self._take()
                    if buf is None:
                        return
                    self.full.put((it, 0, None, (buf, self.source.load(it.key))))
                    continue
                for start in range(0, n, step):
                    count = min(step, n - start)
                    buf = self._take()
                    if buf is None:
                        return
                    view = buf[: count * isz]
                    self.source.read_range(it.key, start * isz, view)
                    if self.prepare is not None:  # in-place work that overlaps the caller's
                        self.prepare(it, start, count, view)
                    self.full.put((it, start, count, buf))
            self.full.put(_END)
        except BaseException as e:  # handed to the consumer
            self.full.put(e)


def stream_items(items, source, writer, chunk_fn: ChunkFn, on_progress=None, *,
                 elems_of=None, force=None, transform=None, prepare=None) -> None:
    """Write ``items`` (all elementwise: same element count in and out) through ``writer``.

    Optional per-item policy (casts need none): ``elems_of(item, elems)`` gives the elements per
    chunk (<= ``elems``, e.g. whole rows), or 0 to read the whole tensor and write
    ``transform(item, tensor)``; ``force(item)`` runs ``chunk_fn`` even when the dtype stays;
    ``prepare(item, start, count, raw_bytes)`` runs on the reader thread right after a chunk is
    read and may change those bytes in place (so that work overlaps ``chunk_fn``).
    Chunks of one item reach ``chunk_fn`` in order here (not in :func:`stream_items_parallel`).
    """
    max_isz = max((dtypes.itemsize(i.src_dtype) for i in items), default=1)
    max_osz = max((dtypes.itemsize(i.dtype) for i in items), default=1)
    elems = max(1, CHUNK_BYTES // max_isz)
    step_of = (lambda it: elems) if elems_of is None else (lambda it: elems_of(it, elems))

    in_free: queue.Queue = queue.Queue()
    out_free: queue.Queue = queue.Queue()
    for _ in range(RING):
        in_free.put(torch.empty(elems * max_isz, dtype=torch.uint8))
        out_free.put(torch.empty(elems * max_osz, dtype=torch.uint8))
    full: queue.Queue = queue.Queue()
    reader = _Reader(source, [i for i in items if math.prod(i.shape)], step_of, in_free, full,
                     prepare)
    reader.start()

    def wait(q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                writer.check_alive()
                if q is full and not reader.is_alive() and full.empty():
                    raise RuntimeError("chunk reader stopped unexpectedly")

    try:
        for it in items:
            if not math.prod(it.shape):
                writer.write(it.out_key, torch.empty(it.shape, dtype=dtypes.to_torch(it.dtype)))
                continue
            n = math.prod(it.shape)
            done = 0
            while done < n:
                got = wait(full)
                if isinstance(got, BaseException):
                    raise got
                item, start, count, buf = got
                assert item is it and start == done  # the reader follows the same order
                isz, osz = dtypes.itemsize(it.src_dtype), dtypes.itemsize(it.dtype)
                if count is None:  # whole tensor
                    token, t = buf
                    out = transform(it, t)
                    del t
                    in_free.put(token)
                    writer.write(it.out_key, out)
                    del out
                    done = n
                    if on_progress:
                        on_progress(n * isz)
                    continue
                raw = buf[: count * isz]
                if it.dtype == it.src_dtype and not (force and force(it)):
                    writer.write_part(it.out_key, raw, release=lambda b=buf: in_free.put(b))
                else:
                    ob = wait(out_free)
                    out = ob[: count * osz]
                    chunk_fn(it, start, raw.view(dtypes.to_torch(it.src_dtype)),
                             out.view(dtypes.to_torch(it.dtype)))
                    in_free.put(buf)
                    writer.write_part(it.out_key, out, release=lambda b=ob: out_free.put(b))
                done += count
                if on_progress:
                    on_progress(count * isz)
    finally:
        reader.stop.set()
        reader.join()


#: most worker threads the parallel engine uses (each holds two chunk buffers)
MAX_WORKERS = 4


def default_workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_WORKERS, n or 1))


def stream_items_parallel(items, source, writer, chunk_fn: ChunkFn, on_progress=None, *,
                          elems_of=None, force=None, transform=None, prepare=None,
                          workers: int | None = None) -> None:
    """:func:`stream_items` with every chunk done start to end by one of ``workers`` threads.

    Each worker reads a chunk into its own buffers, converts it (``prepare`` then
    ``chunk_fn``) and writes it at its place in the output (``writer.write_at``: the layout is
    known from the plan), so nothing waits for order and no work is handed between threads.
    Used when the per-chunk work is heavy (merge-lora's matmuls): a reader/converter/writer
    pipeline leaves that work on one thread, or oversubscribes the cores when the kernels are
    multi-threaded, while N workers running single-threaded kernels keep N cores busy. (A
    separate writer thread measured worse on 2 cores, 1.36x vs 1.22x the I/O floor: a third
    runnable thread only takes turns with the workers.) Torch's intra-op threads are set so
    that workers x threads = cores while it runs.
    """
    workers = workers or default_workers()
    max_isz = max((dtypes.itemsize(i.src_dtype) for i in items), default=1)
    max_osz = max((dtypes.itemsize(i.dtype) for i in items), default=1)
    elems = max(1, CHUNK_BYTES // max_isz)
    tasks = []
    for it in items:
        n = math.prod(it.shape)
        if not n:
            continue
        step = elems if elems_of is None else elems_of(it, elems)
        if not step:
            tasks.append((it, 0, None))
        else:
            tasks.extend((it, a, min(step, n - a)) for a in range(0, n, step))
    writer.begin_positional()
    order = itertools.count()
    stop = threading.Event()
    errors: list[BaseException] = []
    progress_lock = threading.Lock()

    def run_task(it, start, count, inb, outb) -> int:
        isz, osz = dtypes.itemsize(it.src_dtype), dtypes.itemsize(it.dtype)
        if count is None:  # whole tensor
            out = transform(it, source.load(it.key))
            if dtypes.from_torch(out.dtype) != it.dtype or tuple(out.shape) != tuple(it.shape):
                raise RuntimeError(f"{it.key}: transform gave {out.dtype}{list(out.shape)}")
            writer.write_at(it.out_key, 0, out.contiguous().view(-1).view(torch.uint8))
            return math.prod(it.shape) * isz
        raw = inb[: count * isz]
        source.read_range(it.key, start * isz, raw)
        if prepare is not None:
            prepare(it, start, count, raw)
        if it.dtype == it.src_dtype and not (force and force(it)):
            writer.write_at(it.out_key, start * isz, raw)
        else:
            out = outb[: count * osz]
            chunk_fn(it, start, raw.view(dtypes.to_torch(it.src_dtype)),
                     out.view(dtypes.to_torch(it.dtype)))
            writer.write_at(it.out_key, start * osz, out)
        return count * isz

    def work() -> None:
        inb = torch.empty(elems * max_isz, dtype=torch.uint8)
        outb = torch.empty(elems * max_osz, dtype=torch.uint8)
        try:
            while not stop.is_set():
                k = next(order)
                if k >= len(tasks):
                    return
                nbytes = run_task(*tasks[k], inb, outb)
                if on_progress:
                    with progress_lock:
                        on_progress(nbytes)
        except BaseException as e:  # the first one is raised in the caller
            errors.append(e)
            stop.set()

    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads_before // workers))
    pool = [threading.Thread(target=work, name=f"convkit-chunk-{i}", daemon=True)
            for i in range(workers)]
    try:
        for t in pool:
            t.start()
        for t in pool:
            while t.is_alive():
                t.join(0.1)
    except BaseException:  # Ctrl-C in the caller: stop the workers before unwinding
        stop.set()
        for t in pool:
            t.join()
        raise
    finally:
        torch.set_num_threads(threads_before)
    if errors:
        raise errors[0]
