"""The ops of the quantization targets: values -> stored bytes, with the error measured on the
exact representation written, in the same pass (no second read of the data).

Element-wise and block-wise ops (plain fp8, 4-bit single quant, GGML blocks, kept floats) run on
chunks of a tensor; the chunk's error sums are kept by chunk position and added in order when
the tensor is finished, so the report (and the file it is written into) does not depend on how
many workers ran or in which order chunks finished. Scaled fp8 (one scale from the whole
tensor's absmax) and double-quantized 4-bit (statistics of all blocks) work on whole tensors.

Kernels run single-threaded here: the engine runs one worker per core.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import torch

from .. import dtypes
from ..casts import CastContext, cast_into
from ..engine.ops import Op, as_bytes
from ..errors import TensorValueError
from . import fastops as fo
from . import fp8, nf4
from .report import ErrorReport, TensorError


def _sq(x: torch.Tensor) -> float:
    """Sum of squares of a float32 vector: float32 dot products of 16K-value blocks (BLAS,
    vectorised) added in float64 - 15x faster than a float64 pass, and within 1e-8 of it."""
    return sum(float(torch.dot(c, c)) for c in x.reshape(-1).split(1 << 14))


def err_sums(deq: torch.Tensor, x: torch.Tensor) -> tuple[float, float, float]:
    """(sum (deq - x)^2, sum x^2, max |deq - x|) of two float32 vectors; ``deq`` (a scratch
    buffer: the decoded stored values) is overwritten with the difference. Vectorised torch
    passes; the same blocks in the same order every time, so sums do not depend on scheduling."""
    d = deq.reshape(-1)
    d.sub_(x.reshape(-1))
    if not d.numel():
        return 0.0, 0.0, 0.0
    lo, hi = torch.aminmax(d)
    return _sq(d), _sq(x), max(-float(lo), float(hi))


def finite_range(x: torch.Tensor) -> tuple[bool, float]:
    """(all finite, max |x|) of a float32 vector in one reduction."""
    if not x.numel():
        return True, 0.0
    lo, hi = torch.aminmax(x)
    lo, hi = float(lo), float(hi)
    return math.isfinite(lo) and math.isfinite(hi), max(-lo, hi)


def _f32(x: torch.Tensor, worker=None) -> np.ndarray:
    """``x`` as a flat float32 array; converted into the worker's reusable buffer when it has
    one (a fresh float32 copy of a whole tensor is an mmap of its own in a worker thread, whose
    page faults cost more system time than reading the file: bench/sd3.py)."""
    x = x.reshape(-1)
    if x.dtype != torch.float32:
        if worker is not None:
            return worker.tensor("f32", "F32", x.numel()).copy_(x).numpy()
        x = x.float()
    return x.contiguous().numpy()


class Measured(Op):
    """Base: per-item error sums kept by chunk start, summed in order at :meth:`finish`."""

    def __init__(self, report: ErrorReport, path: str | None = None):
        self.report, self.path = report, path
        self._lock = threading.Lock()
        self._parts: dict[int, dict[int, tuple]] = {}
        self._order: dict[int, int] = {}

    def order(self, item, index: int) -> None:
        self._order[id(item)] = index

    def keep(self, item, start: int, sums, n: int) -> None:
        with self._lock:
            self._parts.setdefault(id(item), {})[start] = (sums, n)

    def refuse(self, item, bad: int) -> None:
        if bad:
            raise TensorValueError(f"{bad} NaN/Inf values; refusing to quantize", path=self.path,
                                   key=item.key, hint="repair or replace this weight in the source")

    def label(self, item) -> str:
        return item.qtype

    def finish(self, item) -> None:
        with self._lock:
            parts = self._parts.pop(id(item), {})
        if not parts:
            return
        sums = fo.ErrSums()
        for start in sorted(parts):
            s, n = parts[start]
            sums.add(s, n)
        self.report.add(TensorError(item.name, self.label(item), sums.n, sums.rel_rmse(),
                                    float(sums.mx)), order=self._order.get(id(item), 0))


class FP8Op(Measured):
    """Plain fp8: clamp to the finite range (counted), cast; error of the fp8 values."""

    name = "fp8"

    def __init__(self, qtype: str, report, path=None):
        super().__init__(report, path)
        self.qtype = qtype
        self._lut = fp8._lut(qtype)
        self._max = np.float32(fp8.fmax(qtype))

    def run(self, item, worker, start, count, xs):
        xn = _f32(xs[0], worker)
        xt = torch.from_numpy(xn)
        o = item.outs[0]
        out = worker.buffer("out0", xn.size)
        w8 = out.view(dtypes.to_torch(self.qtype))
        ok, amax = finite_range(xt)
        if not ok:
            self.refuse(item, fo.check_kernel(xn, np.float32(np.inf))[0])
        m = float(self._max)
        if amax > m:            # rare: clamp to the finite range (counted), then cast
            self.report.add_clamped(item.name, fo.check_kernel(xn, self._max)[1])
            w8.copy_(xt.clamp(-m, m))
        else:
            w8.copy_(xt)        # torch's cast: the bytes of w.to(float8)
        # the stored values' error (code -> lut, as fp8_decode decodes them) in one fused pass
        self.keep(item, start, fo.err_lut_kernel(xn, out.numpy(), self._lut, np.float32(1.0)),
                  xn.size)
        return [(o, start if count is not None else 0, out)]


class ScaledFP8Op(Measured):
    """Scaled fp8 (whole tensor): scale = absmax / fp8 max; weight, scale and, in the
    comfy_quant form, the per-layer JSON blob."""

    name = "fp8-scaled"

    def __init__(self, qtype: str, report, path=None):
        super().__init__(report, path)
        self.qtype = qtype
        self._lut = fp8._lut(qtype)

    def granule(self, item):
        return 0

    def label(self, item):
        return item.qtype + "*s"

    def run(self, item, worker, start, count, xs):
        xt = torch.from_numpy(_f32(xs[0], worker))
        n = xt.numel()
        ok, amax = finite_range(xt)
        if not ok:
            self.refuse(item, fo.check_kernel(xt.numpy(), np.float32(np.inf))[0])
        m = fp8.fmax(self.qtype)
        # the scale and the scaled cast exactly as fp8.scaled() computes them (same bytes),
        # with the worker's buffers instead of fresh tensors
        scale = torch.tensor(amax / m if amax > 0 else 1.0, dtype=torch.float32)
        tmp = worker.tensor("scaled", "F32", n)
        torch.div(xt, scale, out=tmp)
        tmp.clamp_(-m, m)
        out = worker.buffer("out0", n)
        out.view(dtypes.to_torch(self.qtype)).copy_(tmp)
        # the error of the stored values (code -> lut * scale, as fp8_decode decodes them) in
        # one fused pass instead of decode + four vectorised ones
        self.keep(item, 0, fo.err_lut_kernel(xt.numpy(), out.numpy(), self._lut,
                                             np.float32(scale.item())), n)
        writes = [(item.outs[0], 0, out), (item.outs[1], 0, as_bytes(scale))]
        if len(item.outs) > 2:
            writes.append((item.outs[2], 0, as_bytes(fp8.comfy_quant_blob(self.qtype))))
        return writes


class BNB4Op(Measured):
    """bitsandbytes 4-bit, byte-identical to ``quantize_4bit`` (blocksize 64). Single quant
    works on chunks of whole blocks (the packed bytes and absmax of a chunk have fixed places);
    double quant needs every block's absmax first and works on the whole tensor."""

    name = "bnb4"

    def __init__(self, quant_type: str, double: bool, report, path=None):
        super().__init__(report, path)
        self.quant_type, self.double = quant_type, double

    def granule(self, item):
        return 0 if self.double else 2 * nf4.BLOCKSIZE

    def _consts(self, item) -> list:
        """quant_map and the packed quant state (single quant: fixed contents)."""
        code = nf4._bounds(self.quant_type)[2]
        js = nf4.state_json(self.quant_type, item.extra["dtype"], item.shape, False, None)
        state = item.outs[-1]
        js = js + b" " * (state.shape[0] - len(js))
        return [(item.outs[2], 0, as_bytes(torch.from_numpy(code.copy()))),
                (state, 0, torch.frombuffer(bytearray(js), dtype=torch.uint8))]

    def run(self, item, worker, start, count, xs):
        if self.double:
            outs, sums = nf4.quantize_measured(item.name, xs[0], self.quant_type, True, nthreads=1,
                                               packed_out=worker.buffer("out0",
                                                                        (xs[0].numel() + 1) // 2))
            self.refuse(item, sums.bad)
            self.keep(item, 0, (sums.sd, sums.ss, sums.mx), sums.n)
            return [(o, 0, as_bytes(outs[o.key])) for o in item.outs]
        n_total = math.prod(item.shape)
        xn = _f32(xs[0], worker)
        m = xn.size
        bounds, order, code = nf4._bounds(self.quant_type)
        packed = worker.buffer("out0", (m + 1) // 2)
        nblocks = -(-m // nf4.BLOCKSIZE)
        absmax = worker.tensor("out1", "F32", nblocks)
        # the kernel's tail rule needs the elements left in the whole tensor from here
        res = fo.bnb4_kernel(xn, 0, m, n_total - start, bounds, order,
                             self.quant_type != "nf4", packed.numpy(), absmax.numpy(),
                             nf4._lut(self.quant_type), code, True)
        self.refuse(item, res[0])
        self.keep(item, start, res[1:], m)
        writes = [(item.outs[0], start // 2, packed),
                  (item.outs[1], start // nf4.BLOCKSIZE * 4, absmax.view(torch.uint8))]
        if start == 0:
            writes += self._consts(item)
        return writes

    def label(self, item):
        return self.quant_type


class GGUFBlocksOp(Measured):
    """GGML block types: rows of the stored shape quantized by convkit.kernels (byte-identical
    to ggml), the error measured by decoding the blocks just written."""

    name = "gguf"

    def granule(self, item):
        return item.outs[0].shape[-1]     # whole stored rows

    def run(self, item, worker, start, count, xs):
        from .. import kernels
        from ..kernels.dequant import ggml_decode

        o = item.outs[0]
        q = o.dtype
        ncol = o.shape[-1]
        xn = _f32(xs[0], worker).reshape(-1, ncol)
        bs, ts = kernels.block_info(q)
        nbytes = xn.size // bs * ts
        out = worker.buffer("out0", nbytes).numpy().reshape(xn.shape[0], -1)
        kernels.quantize(xn, q, out=out)
        xt = torch.from_numpy(xn.reshape(-1))
        if not finite_range(xt)[0]:
            self.refuse(item, fo.check_kernel(xn.reshape(-1), np.float32(np.inf))[0])
        deq = worker.tensor("deq", "F32", xn.size)
        ggml_decode(q, out.reshape(-1), deq.numpy())     # the blocks just written, as ggml reads them
        sums = err_sums(deq, xt)
        self.keep(item, start, sums, xn.size)
        return [(o, (start // bs * ts) if count is not None else 0, out.reshape(-1))]


class GGUFFloatOp(Measured):
    """A tensor kept as F32/F16/BF16 in a GGUF file: cast (F16 clamped to its range, counted),
    error measured when the type changes; integers copied. The cast is torch's; the check
    (non-finite, overflow) and the error sums are one numba pass over the chunk and its cast
    codes, so keeping a tensor as F16 costs about what ``convert --dtype fp16`` does."""

    name = "gguf-float"

    def run(self, item, worker, start, count, xs):
        o = item.outs[0]
        x = xs[0].reshape(-1)
        off = start * dtypes.itemsize(o.dtype) if count is not None else 0
        if not x.is_floating_point():
            return [(o, off, as_bytes(x))]
        tdt = dtypes.to_torch(o.dtype)
        if x.dtype == tdt:
            xn = _f32(x) if x.dtype != torch.float32 else x.numpy()
            self.refuse(item, fo.check_kernel(xn, np.float32(np.inf))[0])
            return [(o, off, as_bytes(x))]
        xs32 = x if x.dtype == torch.float32 else x.float()
        out = worker.tensor("out0", o.dtype, x.numel())
        out.copy_(xs32)
        if o.dtype == "F32":
            self.refuse(item, fo.check_kernel(xs32.numpy(), np.float32(np.inf))[0])
            self.keep(item, start, (0.0, float(xs32.double().pow(2).sum()), 0.0), x.numel())
            return [(o, off, out.view(torch.uint8))]
        ok, amax = finite_range(xs32)
        if not ok:
            self.refuse(item, fo.check_kernel(xs32.numpy(), np.float32(np.inf))[0])
        if o.dtype == "F16" and amax > 65504.0:   # rare: clamp to the fp16 range (counted)
            over = fo.check_kernel(xs32.numpy(), np.float32(65504.0))[1]
            out.copy_(xs32.clamp(-65504.0, 65504.0))
            self.report.add_clamped(item.name, over)
        deq = worker.tensor("deq", "F32", x.numel())
        deq.copy_(out)          # torch decodes fp16/bf16 codes exactly
        sd, ss, mx = err_sums(deq, xs32)
        self.keep(item, start, (sd, ss, mx), x.numel())
        return [(o, off, out.view(torch.uint8))]

    def describe(self, item):
        return "cast" if item.src_dtype != item.dtype else "copy"


class RestOp(Op):
    """Tensors a target does not quantize: copied, or cast to ``--rest-dtype`` (clamped and
    counted); a float value that is not finite inside the diffusion model is refused."""

    name = "copy"

    def __init__(self, report: ErrorReport, path=None):
        self.report, self.path = report, path
        self.ctx = CastContext(on_overflow="clamp", path=path)

    def run(self, item, worker, start, count, xs):
        o = item.outs[0]
        x = xs[0].reshape(-1)
        off = start * dtypes.itemsize(o.dtype) if count is not None else 0
        if item.extra.get("in_model") and x.is_floating_point() and x.numel():
            bad = fo.check_kernel(_f32(x), np.float32(np.inf))[0]
            if bad:
                raise TensorValueError(f"{bad} NaN/Inf values; refusing to quantize",
                                       path=self.path, key=item.key,
                                       hint="repair or replace this weight in the source")
        tdt = dtypes.to_torch(o.dtype)
        if x.dtype == tdt:
            return [(o, off, as_bytes(x))]
        out = worker.tensor("out0", o.dtype, x.numel())
        before = self.ctx.overflows.get(item.name, 0)
        cast_into(item.name, x, out, self.ctx)
        over = self.ctx.overflows.get(item.name, 0) - before
        if over:
            self.report.add_clamped(item.name, over)
        return [(o, off, out.view(torch.uint8))]

    def describe(self, item):
        if item.src_dtype == item.dtype:
            return "decode" if item.storage else "copy"
        return "decode+cast" if item.storage else "cast"
