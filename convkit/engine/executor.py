"""The one executor: runs any :class:`~convkit.engine.plan.Plan`.

Work is cut into tasks: a chunk of elements of one item (when its op and every source can work
on ranges: casts, copies, LoRA rows, fp8, 4-bit and GGML blocks, and every input encoding the
view decodes by ranges) or a whole item. ``workers`` threads (one per core) each take the next
task and do it start to end: read the sources' range through the logical-weights view into the
worker's own reusable buffers (decoding quantized inputs on the way), run the op, and write the
resulting bytes at their place in the output (:mod:`convkit.engine.sinks`). Nothing waits for
order and nothing is handed between threads; memory is a few chunk buffers per worker, plus one
whole tensor per worker for whole-tensor items.

The numeric kernels therefore run single-threaded inside a worker (each worker thread sets
torch's per-thread intra-op count to 1): N workers keep N cores busy without oversubscribing
them, reading overlaps computing across workers, and results do not depend on the number of
workers.

After the data: reserved metadata values are filled (the quantization error report), every file
is fsync'd and renamed into place, folder outputs are renamed as a whole; then, with
``plan.verify``, every file is reopened and its names, types, shapes and the CRC of every
written range are compared with what was written. Any error, Ctrl-C or SIGTERM removes every
temp file: nothing partial is ever left under a final name.
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
import threading
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dtypes
from ..errors import Interrupted, OutputError
from ..progress import Progress
from ..writer import FolderStage
from .plan import Item, Plan
from .sinks import open_sink

CHUNK_BYTES = 8 << 20       # logical bytes per chunk task (fits L2/L3 with its output)
MAX_WORKERS = 4


def default_workers() -> int:
    env = os.environ.get("CONVKIT_THREADS")
    if env:
        return max(1, int(env))
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_WORKERS, n or 1))


@dataclass
class RunStats:
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    tensors: int = 0
    verified: int = 0
    verify_seconds: float = 0.0


class Worker:
    """Per-thread reusable buffers (grown on demand, never shrunk)."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, nbytes: int) -> torch.Tensor:
        b = self._bufs.get(name)
        if b is None or b.numel() < nbytes:
            b = self._bufs[name] = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
        return b[:nbytes]

    def tensor(self, name: str, dtype: str, count: int) -> torch.Tensor:
        return self.buffer(name, count * dtypes.itemsize(dtype)).view(dtypes.to_torch(dtype))


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def chunk_elems(plan: Plan, it: Item) -> int:
    """Elements per chunk task of ``it``, or 0 to do it whole."""
    if not it.srcs:
        return 0
    g = it.op.granule(it)
    if not g:
        return 0
    for s in it.srcs:
        v = plan.inputs[s.input]
        if not v.chunkable(s.key):
            return 0
        g = _lcm(g, v.granule(s.key))
    n = math.prod(it.shape)
    step = max(g, CHUNK_BYTES // 4 // g * g)       # budgeted as float32 (decoded values)
    if step >= n:
        return n
    # equal chunks, no small tail: BLAS picks other kernels (other rounding) for a few rows
    pieces = -(-n // step)
    per = -(-n // pieces)
    return -(-per // g) * g


def _tasks(plan: Plan) -> list[tuple[int, int, int | None]]:
    tasks = []
    for i, it in enumerate(plan.items):
        n = math.prod(it.shape) if it.srcs else 0
        step = chunk_elems(plan, it) if n else 0
        if not step:
            tasks.append((i, 0, None))
        else:
            tasks.extend((i, a, min(step, n - a)) for a in range(0, n, step))
    return tasks


def execute(plan: Plan, *, progress: Progress | None = None, overwrite: bool = False,
            workers: int | None = None) -> RunStats:
    """Run ``plan``; see the module docstring. Returns timing and byte counts."""
    progress = progress or Progress(enabled=False)
    stats = RunStats()
    workers = workers or default_workers()
    tasks = _tasks(plan)
    left = {}                                   # item index -> elements not done yet
    for i, start, count in tasks:
        if count is not None:
            left[i] = left.get(i, 0) + count
    crcs: dict[str, list] = {fid: [] for fid in plan.files}
    t0 = time.perf_counter()
    try:
        with ExitStack() as stack, progress.bar(total=max(plan.in_bytes, 1),
                                                desc=plan.out.name) as bar:
            stages = {fid: stack.enter_context(FolderStage(fo.path, overwrite=overwrite))
                      for fid, fo in plan.folders.items()}
            for fid, fo in plan.folders.items():
                _fill_folder(fo, stages[fid])
            sinks = {}
            for fid, f in plan.files.items():
                path = (stages[f.folder] / f.path.relative_to(plan.folders[f.folder].path)
                        if f.folder is not None else f.path)
                path.parent.mkdir(parents=True, exist_ok=True)
                sinks[fid] = open_sink(path, plan.outs_of(fid), f)
                stack.callback(sinks[fid].abort)     # a no-op after commit
            _run(plan, tasks, left, sinks, crcs if plan.verify else None, workers, bar, stats)
            for fid, f in plan.files.items():
                if getattr(f, "fill", None) is not None:
                    sinks[fid].fill(f.fill)
                sinks[fid].commit()
            for fid, fo in plan.folders.items():
                for make in fo.late_files:
                    _write_files(stages[fid], make(stages[fid]))
        # (leaving the stack renamed the staged folders into place)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; no output was written", path=plan.out) from None
    stats.seconds = time.perf_counter() - t0
    stats.tensors = len(plan.items)
    stats.bytes_read = plan.in_bytes
    stats.bytes_written = sum(p.stat().st_size for p in _written_files(plan))
    if plan.verify:
        t1 = time.perf_counter()
        stats.verified = verify(plan, crcs)
        stats.verify_seconds = time.perf_counter() - t1
    return stats


def _written_files(plan: Plan) -> list[Path]:
    out = [f.path for f in plan.files.values()]
    for fo in plan.folders.values():
        out += [fo.path / rel for rel in list(fo.extra_files) + list(fo.copies)]
    return [p for p in out if p.exists()]


def _fill_folder(fo, stage: Path) -> None:
    for rel, src in fo.copies.items():
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    _write_files(stage, fo.extra_files)


def _write_files(stage: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)


def _read(plan: Plan, it: Item, start: int, count: int | None, w: Worker) -> list[torch.Tensor]:
    """The item's source values: the range start:start+count (1-D), or whole tensors."""
    xs = []
    for j, s in enumerate(it.srcs):
        v = plan.inputs[s.input]
        if count is None:
            info = v.info(s.key)
            n = math.prod(info.shape)
            if n and v.chunkable(s.key):
                # the whole range into this worker's reusable buffer: no fresh allocation (and
                # page faults) per tensor
                out = w.tensor(f"in{j}", info.dtype, n)
                scratch = None if v.is_direct(s.key) else w.buffer(f"raw{j}",
                                                                   v.stored_span(s.key, 0, n))
                xs.append(v.read_logical(s.key, 0, n, out, scratch).view(info.shape))
            else:
                xs.append(v.load(s.key))
            continue
        dt = v.info(s.key).dtype
        out = w.tensor(f"in{j}", dt, count)
        scratch = None if v.is_direct(s.key) else w.buffer(f"raw{j}",
                                                           v.stored_span(s.key, start, count))
        xs.append(v.read_logical(s.key, start, count, out, scratch))
    return xs


def _run(plan: Plan, tasks, left, sinks, crcs, workers: int, bar, stats) -> None:
    order = itertools.count()
    stop = threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()
    items = plan.items

    def do(k: int, w: Worker) -> None:
        i, start, count = tasks[k]
        it = items[i]
        xs = _read(plan, it, start, count, w)
        writes = it.op.run(it, w, start, count, xs)
        del xs
        for out, off, data in writes:
            at = sinks[out.file].write_at(out.key, off, data)
            if crcs is not None:
                n = data.numel() if isinstance(data, torch.Tensor) else data.size
                arr = data.numpy() if isinstance(data, torch.Tensor) else data
                c = zlib.crc32(memoryview(arr).cast("B")) if n else 0
                with lock:
                    crcs[out.file].append((at, n, c))
        finished = count is None
        with lock:
            if count is not None:
                left[i] -= count
                finished = left[i] == 0
            done_bytes = (it.src_bytes if count is None
                          else it.src_bytes * count // max(1, math.prod(it.shape)))
            bar.update(done_bytes)
        if finished:
            it.op.finish(it)

    n_workers = min(workers, max(1, len(tasks)))
    began = [threading.Event() for _ in range(n_workers)]
    ended = [threading.Event() for _ in range(n_workers)]

    def work(n: int) -> None:
        began[n].set()
        # torch's intra-op thread count is per thread (OpenMP): a new thread starts with one
        # per core. Kernels run single-threaded in a worker (the workers are the parallelism),
        # which also keeps results independent of the worker count (BLAS/LAPACK round
        # differently on different thread counts).
        w = None
        try:
            torch.set_num_threads(1)
            w = Worker()
            while not stop.is_set():
                k = next(order)
                if k >= len(tasks):
                    return
                do(k, w)
        except BaseException as e:  # the first one is raised in the caller
            errors.append(e)
            stop.set()
        finally:
            # free the buffers (torch releases the GIL while it does) before saying "ended":
            # after that the caller may shut the interpreter down
            w = None
            ended[n].set()

    pool = [threading.Thread(target=work, args=(n,), name=f"convkit-worker-{n}", daemon=True)
            for n in range(n_workers)]
    launched = 0
    try:
        for t in pool:
            t.start()
            launched += 1
        for e in ended:
            while not e.wait(0.1):
                pass
    except BaseException:  # Ctrl-C in the caller: stop the workers before unwinding
        stop.set()
        # Wait on our own events, not Thread.join: on Python 3.11 a join interrupted by
        # Ctrl-C can mark a running thread as stopped (bpo-45274's fix releases the lock the
        # thread still holds), and a worker left running into interpreter shutdown aborts
        # the process inside torch ("terminate called without an active exception").
        for n in range(n_workers):
            if n < launched or (n == launched and began[n].wait(2.0)):
                ended[n].wait()
        for t in pool[:launched]:
            t.join()            # what is left of the thread: returning from work()
        raise
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------- verification


def verify(plan: Plan, crcs: dict[str, list]) -> int:
    """Reopen every written file with convkit's readers: names, types and shapes as planned,
    and the CRC of every written range as computed when it was written. Returns tensors
    checked."""
    from ..sources.files import open_file
    from .crc import crc_ranges

    problems, n = [], 0
    for fid, f in plan.files.items():
        outs = plan.outs_of(fid)
        with open_file(f.path) as src:
            got = {i.name: i for i in src.infos()}
            if set(got) != {o.key for o in outs}:
                problems.append(f"{f.path.name}: {len(got)} tensors in the file, {len(outs)} "
                                "planned")
            for o in outs:
                i = got.get(o.key)
                if i is None:
                    continue
                n += 1
                stored = (getattr(src, "stored_shape", None) or (lambda k: i.shape))(o.key)
                if (i.storage or i.dtype) != o.dtype or tuple(stored) != tuple(o.shape):
                    problems.append(f"{o.key}: {i.storage or i.dtype}{list(stored)}, planned "
                                    f"{o.dtype}{list(o.shape)}")
        ranges = crcs.get(fid, [])
        for (at, size, c), got_c in zip(ranges, crc_ranges(f.path, [(a, s) for a, s, _ in ranges])):
            if got_c != c:
                problems.append(f"{f.path.name}: bytes at {at} differ from what was written")
                break
    if problems:
        raise OutputError("verification of the written output failed: " + "; ".join(problems[:5]),
                          path=plan.out)
    return n


__all__ = ["execute", "RunStats", "Worker", "default_workers", "verify", "CHUNK_BYTES"]
