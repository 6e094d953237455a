"""bitsandbytes 4-bit (NF4 / FP4, blocksize 64) in the layout Forge loads.

Per quantized ``<layer>.weight``: ``.weight`` (uint8, packed two values per byte, shape
(ceil(n/2), 1)), ``.weight.absmax``, ``.weight.quant_map`` and
``.weight.quant_state.bitsandbytes__nf4`` (uint8 bytes of a JSON dict: quant_type, blocksize,
dtype, shape); with double quant also ``.weight.nested_absmax`` / ``.weight.nested_quant_map``
and absmax stored as uint8. This is what ``QuantState.as_dict(packed=True)`` gives and what
Forge's ``ForgeLoader4Bit`` / bitsandbytes' ``QuantState.from_dict`` read back.

Weights are quantized and dequantized flattened (bitsandbytes 0.50 on CPU dequantizes wrongly
when the last dim is not a multiple of 64; blocks run over the flattened tensor either way).
"""
from __future__ import annotations

import functools
import json
import math
import warnings

import torch

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
_OFFSET_PLACEHOLDER = -1.2345678901234567e-300  # as long as any float repr json writes


@functools.lru_cache(maxsize=None)
def _bnb_functional():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as F
    return F


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def state_json(quant_type: str, dtype: str, shape, double: bool, offset: float | None) -> bytes:
    d = {"quant_type": quant_type, "blocksize": BLOCKSIZE, "dtype": dtype, "shape": list(shape)}
    if double:
        d.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                  "nested_offset": offset})
    return json.dumps(d).encode("utf-8")


def out_specs(key: str, shape, dtype: str, quant_type: str, double: bool) -> list[tuple[str, str, tuple]]:
    """(name, safetensors dtype, shape) of every tensor one quantized weight becomes."""
    n = math.prod(shape)
    nblocks = -(-n // BLOCKSIZE)
    specs = [(key, "U8", ((n + 1) // 2, 1))]
    if double:
        specs += [(f"{key}.absmax", "U8", (nblocks,)),
                  (f"{key}.quant_map", "F32", (16,)),
                  (f"{key}.nested_absmax", "F32", (-(-nblocks // NESTED_BLOCKSIZE),)),
                  (f"{key}.nested_quant_map", "F32", (256,))]
    else:
        specs += [(f"{key}.absmax", "F32", (nblocks,)), (f"{key}.quant_map", "F32", (16,))]
    js = state_json(quant_type, dtype, shape, double, _OFFSET_PLACEHOLDER if double else None)
    specs.append((f"{key}.quant_state.bitsandbytes__{quant_type}", "U8", (len(js),)))
    return specs


@functools.lru_cache(maxsize=None)
def _bounds(quant_type: str):
    """(float32 midpoints, code order as uint8, code) exactly as bitsandbytes' quantizer uses."""
    F = _bnb_functional()
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    code = F.get_4bit_type(quant_type, device=torch.device("cpu"))
    return (bounds.float().numpy().copy(), order.to(torch.uint8).numpy().copy(),
            code.float().numpy().copy())


@functools.lru_cache(maxsize=None)
def _lut(quant_type: str):
    from . import fastops as fo

    return fo.bucket_lut(_bounds(quant_type)[0])


def quantize_measured(key: str, t: torch.Tensor, quant_type: str, double: bool,
                      nthreads: int | None = None, packed_out: torch.Tensor | None = None):
    """({output name: tensor}, ErrSums) for one weight: bitsandbytes' bytes, numba speed.

    Quantizes (and measures the error of the stored representation) in chunks of whole
    blocks on ``nthreads`` threads; byte-identical to ``F.quantize_4bit`` (tests compare).
    ``packed_out``: optional reusable uint8 buffer for the packed weight (>= ceil(n/2) bytes).
    """
    from . import fastops as fo

    F = _bnb_functional()
    shape = tuple(t.shape)
    dtype = torch_dtype_name(t.dtype)
    x = t.reshape(-1)
    if x.dtype != torch.float32:
        x = x.float()
    x = x.contiguous()
    n = x.numel()
    xn = x.numpy()
    bounds, order, code = _bounds(quant_type)
    nblocks = -(-n // BLOCKSIZE)
    if packed_out is not None:
        packed = packed_out[: (n + 1) // 2]
    else:
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(nblocks, dtype=torch.float32)
    pn, an = packed.numpy(), absmax.numpy()
    remap = quant_type != "nf4"
    parts = fo.split(n, fo.CHUNK_VALUES, 128)
    lut = _lut(quant_type)
    # one pass per chunk: check, quantize and (single quant) measure while it is in cache
    res = fo.parallel_chunks(lambda a, b: fo.bnb4_kernel(xn, a, b, n, bounds, order, remap, pn,
                                                         an, lut, code, not double),
                             parts, nthreads)
    sums = fo.ErrSums()
    sums.bad = sum(r[0] for r in res)
    out = {key: packed.reshape(-1, 1), f"{key}.absmax": absmax,
           f"{key}.quant_map": torch.from_numpy(code.copy())}
    offset = None
    if not double:
        for (a, b), r in zip(parts, res):
            sums.add(r[1:], b - a)
    else:
        off = absmax.mean()
        qabs, state2 = F.quantize_blockwise(absmax - off, blocksize=NESTED_BLOCKSIZE)
        out[f"{key}.absmax"] = qabs
        out[f"{key}.nested_absmax"] = state2.absmax.float()
        out[f"{key}.nested_quant_map"] = state2.code.float()
        offset = float(off)
        used = F.dequantize_blockwise(qabs, state2)
        used += off
        un = used.float().contiguous().numpy()
        for (a, b), r in zip(parts, fo.parallel_chunks(
                lambda a, b: fo.bnb4_err_kernel(xn, a, b, pn, un, code), parts, nthreads)):
            sums.add(r, b - a)
    planned = out_specs(key, shape, dtype, quant_type, double)[-1][2][0]
    js = state_json(quant_type, dtype, shape, double, offset)
    js = js + b" " * (planned - len(js))   # json.loads ignores trailing spaces
    out[f"{key}.quant_state.bitsandbytes__{quant_type}"] = torch.frombuffer(
        bytearray(js), dtype=torch.uint8)
    return out, sums


def quantize(key: str, t: torch.Tensor, quant_type: str, double: bool) -> tuple[dict, torch.Tensor]:
    """({output name: tensor}, dequantized float32 weight) for one weight."""
    out, _ = quantize_measured(key, t, quant_type, double)
    return out, dequantize(key, dict(out))


def dequantize(key: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dequantize ``key`` from its stored tensors (as a loader would), flattened then reshaped."""
    F = _bnb_functional()
    qs_dict = {k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")}
    qs = F.QuantState.from_dict(qs_dict, device=torch.device("cpu"))
    shape = tuple(qs.shape)
    qs.shape = torch.Size([1, math.prod(shape)])
    return F.dequantize_4bit(tensors[key].reshape(-1, 1), qs).float().reshape(shape)


def is_bnb_state_key(key: str) -> bool:
    return ".quant_state.bitsandbytes__" in key


def dequantize_shape(src, key: str, state_keys: list[str]) -> list[int]:
    """The logical shape recorded in a stored weight's packed quant state."""
    packed = [k for k in state_keys if is_bnb_state_key(k)][0]
    d = json.loads(bytes(src.load(packed).tolist()).decode("utf-8"))
    return list(d["shape"])
