"""GGML block quantizers, byte-identical to ggml's reference ``quantize_row_*_ref``.

gguf-py can quantize the legacy types but not the K-quants; this module does both, vectorised:

    quantize(x, "Q4_K")        # float32 (rows, n) -> uint8 (rows, n // 256 * 144)
    dequantize(data, "Q4_K", n)  # via gguf-py (gguf.quants.dequantize)
    block_info("Q4_K")         # (256, 144)

Supported: Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K, all in numba kernels
(``_kq_numba``: K-quant scale searches vectorised across groups; ``_kq_pack``: per-block tails
and the legacy types) with float32 arithmetic in C order and no FMA: ggml builds
ggml-quants.c (ggml-base) without -march flags, so its reference has no FMA contraction either
(an -march=native -ffp-contract=fast build of ggml-quants.c changes 1-30 % of K-quant blocks).  Output equals what ``ggml_quantize_chunk`` writes
with ``imatrix = NULL`` (goldens in tests/data/ggml_golden, made by tools/make_ggml_goldens.py).
Non-finite inputs (NaN/inf) are not supported (ggml's output for them is not meaningful).
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from . import legacy

QTYPES = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")

# fp32 values processed per step: keeps the per-chunk temporaries (a few x the input) in L2/L3.
CHUNK_VALUES = 1 << 16


def _qtype(qtype) -> GGMLQuantizationType:
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    name = str(qtype).upper()
    try:
        return GGMLQuantizationType[name]
    except KeyError:
        raise ValueError(f"unknown GGML quantization type {qtype!r}; "
                         f"supported: {', '.join(QTYPES)}") from None


def block_info(qtype) -> tuple[int, int]:
    """(block_size, type_size) in values / bytes, from gguf.constants.GGML_QUANT_SIZES."""
    return GGML_QUANT_SIZES[_qtype(qtype)]


def _quantizer(name: str):
    if name in legacy.QUANTIZERS:
        return legacy.QUANTIZERS[name]
    from . import kquants  # imports numba lazily: legacy types never pay the JIT import cost

    return kquants.QUANTIZERS[name]


def quantize(x: np.ndarray, qtype, out: np.ndarray | None = None, nthreads: int = 1) -> np.ndarray:
    """Quantize a float32 2-D array (rows x n, n % block_size == 0) row-wise.

    Returns uint8 of shape (rows, n // block_size * type_size), byte-identical to ggml.
    Other float dtypes are converted to float32 first (as ggml's converter does).
    ``out``: optional C-contiguous uint8 array of that shape (or as many bytes) to fill.
    ``nthreads`` > 1 quantizes runs of blocks on that many threads (the numba kernels release
    the GIL); blocks are independent, so the bytes are the same for any thread count.
    """
    t = _qtype(qtype)
    name = t.name
    if name not in QTYPES:
        raise ValueError(f"quantization to {name} is not supported; supported: "
                         f"{', '.join(QTYPES)}")
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize expects a 2-D (rows, n) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"quantize expects floating point input, got {x.dtype}")
    bs, ts = GGML_QUANT_SIZES[t]
    rows, n = x.shape
    if n % bs != 0:
        raise ValueError(f"{name} needs the row length to be a multiple of {bs}, got n={n} "
                         f"(shape {x.shape})")
    nb_row = n // bs
    if out is None:
        out = np.empty((rows, nb_row * ts), dtype=np.uint8)
    else:
        if out.dtype != np.uint8 or not out.flags.c_contiguous or out.size != rows * nb_row * ts:
            raise ValueError(f"out must be C-contiguous uint8 with {rows * nb_row * ts} bytes")
        out = out.reshape(rows, nb_row * ts)
    if rows == 0 or n == 0:
        return out
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(rows * nb_row, bs)
    out_blocks = out.reshape(rows * nb_row, ts)
    fn = _quantizer(name)
    step = max(1, CHUNK_VALUES // bs)
    if nthreads <= 1 and name in legacy.QUANTIZERS:
        step = blocks.shape[0]  # no per-chunk temporaries: one call saves the per-call overhead
    starts = range(0, blocks.shape[0], step)
    if nthreads > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="convkit-kq") as pool:
            list(pool.map(lambda s: fn(blocks[s:s + step], out_blocks[s:s + step]), starts))
    else:
        for s in starts:
            fn(blocks[s:s + step], out_blocks[s:s + step])
    return out


def dequantize(data: np.ndarray, qtype, n: int | None = None) -> np.ndarray:
    """Decode GGML blocks with gguf-py.  ``data`` is uint8 (rows, bytes_per_row) or 1-D;
    returns float32 (rows, n) (``n`` defaults to what the byte count implies)."""
    from gguf.quants import dequantize as _deq

    t = _qtype(qtype)
    bs, ts = GGML_QUANT_SIZES[t]
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim == 1:
        data = data[None, :]
    if data.shape[-1] % ts != 0:
        raise ValueError(f"{t.name} rows must be a multiple of {ts} bytes, got {data.shape[-1]}")
    n_implied = data.shape[-1] // ts * bs
    if n is not None and n != n_implied:
        raise ValueError(f"{t.name}: {data.shape[-1]} bytes per row hold {n_implied} values, "
                         f"not n={n}")
    return np.asarray(_deq(data, t), dtype=np.float32).reshape(data.shape[0], n_implied)
