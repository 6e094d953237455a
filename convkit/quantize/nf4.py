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

import json
import math
import warnings

import torch

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
_OFFSET_PLACEHOLDER = -1.2345678901234567e-300  # as long as any float repr json writes


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


def quantize(key: str, t: torch.Tensor, quant_type: str, double: bool) -> tuple[dict, torch.Tensor]:
    """({output name: tensor}, dequantized float32 weight) for one weight."""
    F = _bnb_functional()
    shape = tuple(t.shape)
    dtype = torch_dtype_name(t.dtype)
    flat = t.reshape(1, -1)
    packed, qs = F.quantize_4bit(flat, blocksize=BLOCKSIZE, quant_type=quant_type,
                                 compress_statistics=double)
    deq = F.dequantize_4bit(packed, qs).float().reshape(shape)
    out = {key: packed.reshape(-1, 1)}
    out[f"{key}.absmax"] = qs.absmax
    out[f"{key}.quant_map"] = qs.code.float()
    offset = None
    if double:
        out[f"{key}.nested_absmax"] = qs.state2.absmax.float()
        out[f"{key}.nested_quant_map"] = qs.state2.code.float()
        offset = float(qs.offset)
    planned = out_specs(key, shape, dtype, quant_type, double)[-1][2][0]
    js = state_json(quant_type, dtype, shape, double, offset)
    js = js + b" " * (planned - len(js))   # json.loads ignores trailing spaces
    out[f"{key}.quant_state.bitsandbytes__{quant_type}"] = torch.tensor(list(js), dtype=torch.uint8)
    return out, deq


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
