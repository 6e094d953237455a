"""Stream a quantize plan: load one tensor, quantize, measure the error, write; then reopen.

Errors are measured on the exact representation that is written (the dequantized fp8 / NF4 /
GGUF blocks against the source tensor). After the atomic rename the output is reopened with the
format's own reader and every tensor's name, type, shape and a CRC of its bytes is checked
against what was measured, so the report describes the file on disk.

Pipeline (docs/quantize.md, "How it runs"): a reader thread reads tensor n+1 into a reusable
buffer (``stream.read_ahead``), tensor n is checked, quantized and measured in chunks on the
worker pool (``fastops``), its CRC runs on the pool too, and a writer thread writes tensor n-1;
each buffer goes back to its pool when the writer (and the CRC) are done with it.
"""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import dtypes, registry
from ..casts import CastContext
from ..errors import Interrupted, OutputError, TensorValueError
from ..progress import Progress
from ..writer import OutSpec, SafetensorsWriter
from . import fp8, nf4
from .gguf_out import GGUFStreamWriter
from .plan import QItem, QPlan
from . import fastops as fo
from .report import REPORT_KEY, REPORT_WIDTH, ErrorReport, TensorError
from .stream import BufferPool, crc_ranges, read_ahead

#: reusable read-ahead buffers (whole tensors; the largest SDXL one is 253 MB in fp32)
IN_BUFFERS = 3
#: reusable output buffers (one being filled, the rest queued for / in the writer thread)
OUT_BUFFERS = 4


@dataclass
class QStats:
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    tensors_written: int = 0
    verified: int = 0
    verify_seconds: float = 0.0
    crcs: dict[str, int] = field(default_factory=dict)


def _refuse_nonfinite(plan: QPlan, it: QItem, bad: int) -> None:
    if bad:
        raise TensorValueError(f"{bad} NaN/Inf values; refusing to quantize",
                               path=str(plan.source.path), key=it.key,
                               hint="repair or replace this weight in the source")


def _check_finite(plan: QPlan, it: QItem, t: torch.Tensor) -> None:
    if it.in_model and t.is_floating_point() and t.numel():
        _refuse_nonfinite(plan, it, scan(t)[0])


def scan(t: torch.Tensor, limit: float = float("inf")) -> tuple[int, int, float]:
    """(non-finite count, count of |v| > limit, max finite |v|) of a float tensor, in chunks."""
    x = t.reshape(-1)
    if not x.is_contiguous():
        x = x.contiguous()
    lim = np.float32(limit)

    def work(a, b):
        xc = x[a:b] if x.dtype == torch.float32 else x[a:b].float()
        return fo.check_kernel(xc.numpy(), lim)

    res = fo.parallel_chunks(work, fo.split(x.numel(), fo.CHUNK_VALUES))
    return (sum(r[0] for r in res), sum(r[1] for r in res),
            float(max((r[2] for r in res), default=0.0)))


def _error(name: str, qtype: str, sums: "fo.ErrSums") -> TensorError:
    return TensorError(name, qtype, sums.n, sums.rel_rmse(), float(sums.mx))


def _measure_small(name: str, qtype: str, src: torch.Tensor, deq: torch.Tensor) -> TensorError:
    s = src.reshape(-1).float().contiguous().numpy()
    d = deq.reshape(-1).float().contiguous().numpy()
    sums = fo.ErrSums()
    sums.add(fo.err_kernel(s, d), s.size)
    return _error(name, qtype, sums)


class _ReportingWriter(SafetensorsWriter):
    """SafetensorsWriter whose reserved metadata value is filled in before the commit."""

    def __init__(self, path, specs, metadata):
        super().__init__(path, specs, metadata)
        needle = (json.dumps(REPORT_KEY) + ":" + json.dumps("~" * REPORT_WIDTH)).encode()
        at = self._header.find(needle)
        self._fill_at = at + len(needle) - REPORT_WIDTH - 1 if at >= 0 else None
        self._fill = None

    def fill(self, report: ErrorReport) -> None:
        for width in (REPORT_WIDTH, REPORT_WIDTH * 2 // 3, REPORT_WIDTH // 2, REPORT_WIDTH // 4):
            esc = json.dumps(report.summary_text(width))[1:-1]
            if len(esc) <= REPORT_WIDTH:
                break
        self._fill = esc.ljust(REPORT_WIDTH).encode("ascii")

    def commit(self):
        if self._fill is not None and self._fill_at is not None:
            try:
                self._stop_thread()
                self._raise_if_failed()
                pos = self._f.tell()
                self._f.seek(self._fill_at)
                self._f.write(self._fill)
                self._f.seek(pos)
            except BaseException:
                self.abort()
                raise
        return super().commit()


def execute(plan: QPlan, *, progress: Progress | None = None, verify: bool = True
            ) -> tuple[QStats, ErrorReport]:
    progress = progress or Progress(enabled=False)
    stats = QStats()
    report = ErrorReport(plan.target.name)
    t0 = time.perf_counter()
    try:
        with progress.bar(total=plan.in_bytes, desc=plan.out.name) as bar:
            if plan.fmt == "gguf":
                _run_gguf(plan, stats, report, bar)
            else:
                _run_safetensors(plan, stats, report, bar)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; no output was written", path=plan.out) from None
    stats.seconds = time.perf_counter() - t0
    stats.bytes_written = plan.out.stat().st_size
    if verify:
        t1 = time.perf_counter()
        stats.verified = verify_output(plan, stats.crcs)
        stats.verify_seconds = time.perf_counter() - t1
    return stats, report


# ----------------------------------------------------------------------------- safetensors


def _produce_st(plan: QPlan, it: QItem, t: torch.Tensor | None, report: ErrorReport,
                outpool: BufferPool) -> dict:
    """{output name: (tensor, release or None)} for one item."""
    if it.method == "marker":
        return {it.name: (fp8.marker(it.qtype), None)}
    if it.method == "copy":
        _check_finite(plan, it, t)
        return {it.name: (t, None)}
    if it.method == "cast":
        _check_finite(plan, it, t)
        cast = registry.get("cast", it.qtype)
        ctx = CastContext(on_overflow="clamp", path=str(plan.source.path))
        out = cast(it.key, t, ctx)
        report.clamped.update(ctx.overflows)
        return {it.name: (out, None)}
    if it.method in ("fp8", "fp8-scaled"):
        buf = outpool.acquire(t.numel())
        try:
            w8, scale, over, bad, sums = fp8.quantize_measured(t, it.qtype, it.method != "fp8",
                                                               out=buf)
            _refuse_nonfinite(plan, it, bad)
        except BaseException:
            outpool.release(buf)
            raise
        if over:
            report.clamped[it.name] = over
        if it.method == "fp8":
            report.add(_error(it.name, it.qtype, sums))
            return {it.name: (w8, outpool.releaser(buf))}
        report.add(_error(it.name, it.qtype + "*s", sums))
        outs = {it.name: (w8, outpool.releaser(buf)), it.outs[1].key: (scale, None)}
        if len(it.outs) > 2:
            outs[it.outs[2].key] = (fp8.comfy_quant_blob(it.qtype), None)
        return outs
    if it.method == "bnb4":
        buf = outpool.acquire((t.numel() + 1) // 2)
        try:
            outs, sums = nf4.quantize_measured(it.name, t, it.qtype,
                                               plan.options.get("double_quant", False),
                                               packed_out=buf)
            _refuse_nonfinite(plan, it, sums.bad)
        except BaseException:
            outpool.release(buf)
            raise
        report.add(_error(it.name, it.qtype, sums))
        res = {k: (v, None) for k, v in outs.items()}
        res[it.name] = (outs[it.name], outpool.releaser(buf))
        return res
    raise AssertionError(it.method)


#: tensors at least this large get their CRC on the worker pool, overlapping the next tensor
ASYNC_CRC_BYTES = 1 << 20


class _Latch:
    """Calls ``release`` on the ``n``-th call (the writer thread and the CRC both need the
    buffer; whichever finishes last hands it back)."""

    def __init__(self, release, n: int = 2):
        import threading

        self._release, self._n, self._lock = release, n, threading.Lock()

    def __call__(self, *_):
        with self._lock:
            self._n -= 1
            last = self._n == 0
        if last and self._release is not None:
            self._release()


def _crc_async(data: np.ndarray, release, crcs: dict, key: str):
    """CRC of ``data`` into ``crcs[key]`` (a Future for large tensors); returns the release
    to hand to the writer (delayed until the CRC is done too)."""
    mv = memoryview(np.ascontiguousarray(data)).cast("B")
    if len(mv) < ASYNC_CRC_BYTES:
        crcs[key] = zlib.crc32(mv)
        return release
    latch = _Latch(release)
    fut = fo.submit(zlib.crc32, mv)
    fut.add_done_callback(latch)
    crcs[key] = fut
    return latch


def _resolve_crcs(crcs: dict) -> None:
    for k, v in crcs.items():
        if not isinstance(v, int):
            crcs[k] = v.result()


def _resolve_crcs_quietly(crcs: dict) -> None:
    """On the way out (also on errors): wait for pending CRCs so no buffer is still in use."""
    for v in crcs.values():
        if not isinstance(v, int):
            try:
                v.result()
            except Exception:
                pass


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _run_safetensors(plan: QPlan, stats: QStats, report: ErrorReport, bar) -> None:
    specs = [OutSpec(o.key, o.dtype, o.shape) for it in plan.items for o in it.outs]
    inpool, outpool = BufferPool(IN_BUFFERS), BufferPool(OUT_BUFFERS)
    keys = [it.key if it.method != "marker" else None for it in plan.items]
    try:
        with _ReportingWriter(plan.out, specs, plan.metadata) as w:
            for it, (_, t, release_in) in zip(plan.items, read_ahead(plan.source, keys, inpool)):
                outs = _produce_st(plan, it, t, report, outpool)
                for o in it.outs:
                    x, release = outs.pop(o.key)
                    if dtypes.from_torch(x.dtype) != o.dtype or tuple(x.shape) != tuple(o.shape):
                        raise OutputError(f"got {dtypes.from_torch(x.dtype)}{list(x.shape)}, "
                                          f"planned {o.dtype}{list(o.shape)}", path=plan.out,
                                          key=o.key)
                    if x is t:          # a copy: the read buffer goes to the writer
                        release, release_in = release_in, None
                    if x.numel() == 0:
                        w.write(o.key, x)
                        stats.crcs[o.key] = 0
                        if release is not None:
                            release()
                    else:
                        data = _bytes_of(x)
                        release = _crc_async(data.numpy(), release, stats.crcs, o.key)
                        w.write_part(o.key, data, release=release)
                    stats.tensors_written += 1
                del t, outs
                if release_in is not None:
                    release_in()
                stats.bytes_read += it.src_bytes
                bar.update(it.src_bytes)
            _resolve_crcs(stats.crcs)
            w.fill(report)
    finally:
        _resolve_crcs_quietly(stats.crcs)
        inpool.close()
        outpool.close()


# ----------------------------------------------------------------------------- GGUF


def _produce_gguf(plan: QPlan, it: QItem, t: torch.Tensor, report: ErrorReport,
                  outpool: BufferPool):
    """(bytes as a numpy array, release or None) for one item."""
    from .. import kernels

    stored = it.outs[0].shape
    q = it.qtype
    if q in ("F32", "F16", "BF16"):
        _check_finite(plan, it, t)
        x = t.reshape(stored)
        if q == "F16" and x.is_floating_point() and x.dtype != torch.float16:
            m = 65504.0
            over = scan(x, m)[1]
            if over:
                report.clamped[it.name] = over
                x = x.clamp(-m, m)
        y = x.to(dtypes.to_torch(q))
        if q != it.src_dtype:
            report.add(_measure_small(it.name, q, t, y))
        return y.contiguous().reshape(-1).view(torch.uint8).numpy(), None
    if not t.is_floating_point():
        return t.reshape(stored).contiguous().numpy(), None
    ncol = stored[-1]
    x = t.reshape(-1, ncol)
    if not x.is_contiguous():
        x = x.contiguous()
    rows = x.shape[0]
    nbytes = it.outs[0].nbytes
    buf = outpool.acquire(nbytes)
    try:
        out = buf[:nbytes].numpy().reshape(rows, -1)
        f32 = x.dtype == torch.float32
        kind = fo.DEQ_KIND.get(q)
        bs, ts = kernels.block_info(q)

        def work(a, b):
            xs = x[a:b] if f32 else x[a:b].float()
            xn = xs.numpy()
            bad = fo.check_kernel(xn.reshape(-1), np.float32(np.inf))[0]
            if bad:
                return bad, None
            kernels.quantize(xn, q, out=out[a:b])
            if kind is not None:    # fused decode + error sums, no dequantized temporary
                return 0, fo.deq_err_kernel(kind, out[a:b].reshape(-1, ts), xn.reshape(-1, bs))
            deq = kernels.dequantize(out[a:b], q, ncol)
            return 0, fo.err_kernel(xn.reshape(-1), deq.reshape(-1))

        parts = fo.split(rows, max(1, fo.CHUNK_VALUES // ncol))
        res = fo.parallel_chunks(work, parts)
        _refuse_nonfinite(plan, it, sum(r[0] for r in res))
    except BaseException:
        outpool.release(buf)
        raise
    sums = fo.ErrSums()
    for (a, b), r in zip(parts, res):
        sums.add(r[1], (b - a) * ncol)
    report.add(_error(it.name, q, sums))
    return out, outpool.releaser(buf)


def _run_gguf(plan: QPlan, stats: QStats, report: ErrorReport, bar) -> None:
    tensors = [(o.key, o.dtype, o.shape) for it in plan.items for o in it.outs]
    inpool, outpool = BufferPool(IN_BUFFERS), BufferPool(OUT_BUFFERS)
    try:
        with GGUFStreamWriter(plan.out, plan.gguf_kvs, tensors,
                              reserve=(REPORT_KEY, REPORT_WIDTH)) as w:
            for it, (_, t, release_in) in zip(plan.items, read_ahead(
                    plan.source, [it.key for it in plan.items], inpool)):
                data, release = _produce_gguf(plan, it, t, report, outpool)
                if release is None:     # the bytes may still be a view of the read buffer
                    data = np.array(data, copy=True)
                del t
                release_in()
                release = _crc_async(data, release, stats.crcs, it.name)
                w.write_async(it.name, data, release)
                del data
                stats.tensors_written += 1
                stats.bytes_read += it.src_bytes
                bar.update(it.src_bytes)
            _resolve_crcs(stats.crcs)
            w.fill_reserved(report.summary_text(REPORT_WIDTH))
    finally:
        _resolve_crcs_quietly(stats.crcs)
        inpool.close()
        outpool.close()


# ----------------------------------------------------------------------------- verification


def verify_output(plan: QPlan, crcs: dict[str, int]) -> int:
    """Reopen the written file with its format's reader; compare names, types, shapes, bytes."""
    problems = []
    if plan.fmt == "gguf":
        import gguf

        r = gguf.GGUFReader(plan.out)
        got = {t.name: t for t in r.tensors}
        ranges = {t.name: (int(t.data_offset), int(t.n_bytes)) for t in r.tensors}
        names = [it.outs[0].key for it in plan.items if it.outs[0].key in ranges]
        # pread, not the reader's memmap: RSS stays small
        file_crcs = dict(zip(names, crc_ranges(plan.out, [ranges[k] for k in names])))
        del r
        for it in plan.items:
            o = it.outs[0]
            t = got.get(o.key)
            if t is None:
                problems.append(f"missing {o.key}")
                continue
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if t.tensor_type.name != o.dtype or shape != tuple(o.shape):
                problems.append(f"{o.key}: {t.tensor_type.name}{list(shape)}, planned "
                                f"{o.dtype}{list(o.shape)}")
            elif file_crcs[o.key] != crcs[o.key]:
                problems.append(f"{o.key}: bytes differ from what was measured")
        n = len(got)
        if n != len(plan.items):
            problems.append(f"{n} tensors in the file, {len(plan.items)} planned")
    else:
        from ..sources.safetensors_file import SafetensorsFile

        n = 0
        with SafetensorsFile(plan.out) as f:   # header parsed and validated by the reader
            keys = set(f.keys())
            planned = [o for it in plan.items for o in it.outs]
            if keys != {o.key for o in planned}:
                problems.append(f"key set differs ({len(keys)} in file, {len(planned)} planned)")
            todo = []
            for o in planned:
                if o.key not in keys:
                    continue
                info = f.info(o.key)
                n += 1
                if info.dtype != o.dtype or tuple(info.shape) != tuple(o.shape):
                    problems.append(f"{o.key}: {info.dtype}{list(info.shape)}, "
                                    f"planned {o.dtype}{list(o.shape)}")
                else:
                    todo.append((o.key, f._data_start + f._offsets[o.key], info.nbytes))
        # bytes through two reusable buffers (no fresh allocation per tensor): low RSS
        got = crc_ranges(plan.out, [(a, b) for _, a, b in todo])
        for (k, _, _), c in zip(todo, got):
            if c != crcs[k]:
                problems.append(f"{k}: bytes differ from what was measured")
    if problems:
        raise OutputError("verification of the written file failed: " + "; ".join(problems[:5]),
                          path=plan.out)
    return n
