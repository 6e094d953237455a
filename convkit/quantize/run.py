"""Stream a quantize plan: load one tensor, quantize, measure the error, write; then reopen.

Errors are measured on the exact representation that is written (the dequantized fp8 / NF4 /
GGUF blocks against the source tensor). After the atomic rename the output is reopened with the
format's own reader and every tensor's name, type, shape and a CRC of its bytes is checked
against what was measured, so the report describes the file on disk.
"""
from __future__ import annotations

import json
import os
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
from .report import REPORT_KEY, REPORT_WIDTH, ErrorReport, measure


@dataclass
class QStats:
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    tensors_written: int = 0
    verified: int = 0
    verify_seconds: float = 0.0
    crcs: dict[str, int] = field(default_factory=dict)


def _crc(data) -> int:
    if isinstance(data, torch.Tensor):
        data = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy() if data.numel() \
            else np.zeros(0, np.uint8)
    return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B"))


def _crc_at(fd: int, offset: int, size: int) -> int:
    crc = 0
    step = 64 << 20
    for pos in range(offset, offset + size, step):
        crc = zlib.crc32(os.pread(fd, min(step, offset + size - pos), pos), crc)
    return crc


def _check_finite(plan: QPlan, it: QItem, t: torch.Tensor) -> None:
    if it.in_model and t.is_floating_point() and t.numel():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise TensorValueError(f"{bad} NaN/Inf values; refusing to quantize",
                                   path=str(plan.source.path), key=it.key,
                                   hint="repair or replace this weight in the source")


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


def _produce_st(plan: QPlan, it: QItem, report: ErrorReport) -> dict[str, torch.Tensor]:
    if it.method == "marker":
        return {it.name: fp8.marker(it.qtype)}
    t = plan.source.load(it.key)
    _check_finite(plan, it, t)
    if it.method == "copy":
        return {it.name: t}
    if it.method == "cast":
        cast = registry.get("cast", it.qtype)
        ctx = CastContext(on_overflow="clamp", path=str(plan.source.path))
        out = cast(it.key, t, ctx)
        report.clamped.update(ctx.overflows)
        return {it.name: out}
    if it.method == "fp8":
        w8, over = fp8.cast(t, it.qtype)
        if over:
            report.clamped[it.name] = over
        report.add(measure(it.name, it.qtype, t, fp8.dequant(w8)))
        return {it.name: w8}
    if it.method == "fp8-scaled":
        w8, scale = fp8.scaled(t, it.qtype)
        report.add(measure(it.name, it.qtype + "*s", t, fp8.dequant(w8, scale)))
        outs = {it.name: w8, it.outs[1].key: scale}
        if len(it.outs) > 2:
            outs[it.outs[2].key] = fp8.comfy_quant_blob(it.qtype)
        return outs
    if it.method == "bnb4":
        outs, deq = nf4.quantize(it.name, t, it.qtype, plan.options.get("double_quant", False))
        report.add(measure(it.name, it.qtype, t, deq))
        return outs
    raise AssertionError(it.method)


def _run_safetensors(plan: QPlan, stats: QStats, report: ErrorReport, bar) -> None:
    specs = [OutSpec(o.key, o.dtype, o.shape) for it in plan.items for o in it.outs]
    with _ReportingWriter(plan.out, specs, plan.metadata) as w:
        for it in plan.items:
            outs = _produce_st(plan, it, report)
            for o in it.outs:
                t = outs.pop(o.key)
                stats.crcs[o.key] = _crc(t)
                w.write(o.key, t)
                stats.tensors_written += 1
            stats.bytes_read += it.src_bytes
            bar.update(it.src_bytes)
        w.fill(report)


# ----------------------------------------------------------------------------- GGUF


def _produce_gguf(plan: QPlan, it: QItem, report: ErrorReport) -> np.ndarray:
    from .. import kernels

    t = plan.source.load(it.key)
    _check_finite(plan, it, t)
    stored = it.outs[0].shape
    q = it.qtype
    if q in ("F32", "F16", "BF16"):
        x = t.reshape(stored)
        if q == "F16" and x.is_floating_point() and x.dtype != torch.float16:
            m = 65504.0
            over = int((x.abs() > m).sum())
            if over:
                report.clamped[it.name] = over
                x = x.clamp(-m, m)
        y = x.to(dtypes.to_torch(q))
        if q != it.src_dtype:
            report.add(measure(it.name, q, t, y))
        return y.contiguous().reshape(-1).view(torch.uint8).numpy()
    if not t.is_floating_point():
        return t.reshape(stored).contiguous().numpy()
    x = t.float().reshape(-1, stored[-1]).numpy()
    if q == "Q8_0":   # gguf-py's Q8_0 is byte-identical and ~10x faster than kernels' today
        import gguf

        data = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    else:
        data = kernels.quantize(x, q)
    deq = kernels.dequantize(data, q, stored[-1])
    report.add(measure(it.name, q, t, torch.from_numpy(deq)))
    return data


def _run_gguf(plan: QPlan, stats: QStats, report: ErrorReport, bar) -> None:
    tensors = [(o.key, o.dtype, o.shape) for it in plan.items for o in it.outs]
    with GGUFStreamWriter(plan.out, plan.gguf_kvs, tensors,
                          reserve=(REPORT_KEY, REPORT_WIDTH)) as w:
        for it in plan.items:
            data = _produce_gguf(plan, it, report)
            stats.crcs[it.name] = _crc(data)
            w.write(it.name, data)
            del data
            stats.tensors_written += 1
            stats.bytes_read += it.src_bytes
            bar.update(it.src_bytes)
        w.fill_reserved(report.summary_text(REPORT_WIDTH))


# ----------------------------------------------------------------------------- verification


def verify_output(plan: QPlan, crcs: dict[str, int]) -> int:
    """Reopen the written file with its format's reader; compare names, types, shapes, bytes."""
    problems = []
    if plan.fmt == "gguf":
        import gguf

        r = gguf.GGUFReader(plan.out)
        got = {t.name: t for t in r.tensors}
        fd = os.open(plan.out, os.O_RDONLY)   # pread, not the reader's memmap: RSS stays small
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
            elif _crc_at(fd, int(t.data_offset), int(t.n_bytes)) != crcs[o.key]:
                problems.append(f"{o.key}: bytes differ from what was measured")
        os.close(fd)
        n = len(got)
        if n != len(plan.items):
            problems.append(f"{n} tensors in the file, {len(plan.items)} planned")
    else:
        from ..sources.safetensors_file import SafetensorsFile

        n = 0
        with SafetensorsFile(plan.out) as f:   # pread into fresh buffers (no mmap): low RSS
            keys = set(f.keys())
            planned = [o for it in plan.items for o in it.outs]
            if keys != {o.key for o in planned}:
                problems.append(f"key set differs ({len(keys)} in file, {len(planned)} planned)")
            for o in planned:
                if o.key not in keys:
                    continue
                t = f.load(o.key)
                n += 1
                if dtypes.from_torch(t.dtype) != o.dtype or tuple(t.shape) != tuple(o.shape):
                    problems.append(f"{o.key}: {dtypes.from_torch(t.dtype)}{list(t.shape)}, "
                                    f"planned {o.dtype}{list(o.shape)}")
                elif _crc(t) != crcs[o.key]:
                    problems.append(f"{o.key}: bytes differ from what was measured")
    if problems:
        raise OutputError("verification of the written file failed: " + "; ".join(problems[:5]),
                          path=plan.out)
    return n
