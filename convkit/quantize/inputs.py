"""Already-quantized inputs: a view that presents their weights dequantized (float32).

GGUF (any block type; convkit's GGUF source already dequantizes), bitsandbytes NF4/FP4 in the
Forge layout, ComfyUI scaled fp8 (``scaled_fp8`` marker + ``scale_weight``, or ``comfy_quant`` +
``weight_scale``) and plain fp8. The quantization steps are dropped from the key list; what the
caller sees is one logical float tensor per weight.
"""
from __future__ import annotations

import torch

from ..sources.base import TensorInfo, TensorSource
from . import nf4

_FP8 = ("F8_E4M3", "F8_E5M2")


class DequantizedView(TensorSource):
    def __init__(self, inner: TensorSource, kind: str, groups: dict[str, list[str]],
                 scales: dict[str, str]):
        super().__init__(path=inner.path, format=inner.format, metadata=dict(inner.metadata))
        self.inner = inner
        self.kind = kind
        self._groups = groups      # bnb weight key -> its state keys
        self._scales = scales      # fp8 weight key -> scale key
        hidden = {k for ks in groups.values() for k in ks} | set(scales.values())
        hidden |= {k for k in inner.keys() if k.endswith(("scaled_fp8", ".scale_input",
                                                           ".input_scale", ".comfy_quant"))}
        for k in inner.keys():
            if k in hidden:
                continue
            info = inner.info(k)
            if k in groups:
                shape = tuple(nf4.dequantize_shape(inner, k, groups[k]))
                info = TensorInfo(k, "F32", shape, sum(inner.info(x).nbytes for x in groups[k])
                                  + info.nbytes, storage="bnb4")
            elif info.dtype in _FP8:
                info = TensorInfo(k, "F32", info.shape, info.nbytes, storage=info.dtype)
            self._infos[k] = info

    def _load(self, name: str) -> torch.Tensor:
        if name in self._groups:
            tensors = {k: self.inner.load(k) for k in [name] + self._groups[name]}
            return nf4.dequantize(name, tensors)
        t = self.inner.load(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = t.float()
            if name in self._scales:
                t = t * self.inner.load(self._scales[name]).float()
        return t

    def files(self):
        return self.inner.files()

    def close(self):
        self.inner.close()


def dequantized(src: TensorSource) -> tuple[TensorSource, str | None]:
    """(source to read, note) - the note says what was dequantized, None for plain inputs."""
    if src.format == "gguf":
        kinds = sorted({i.storage for i in src.infos() if i.storage not in ("F32", "F16", "BF16")})
        if kinds:
            return src, (f"input is GGUF ({', '.join(kinds)}): its weights are dequantized to "
                         "float32 first, so this quantization adds to the error already in it")
        return src, None
    keys = set(src.keys())
    groups: dict[str, list[str]] = {}
    for k in keys:
        if nf4.is_bnb_state_key(k):
            w = k.split(".quant_state.bitsandbytes__")[0]
            groups[w] = sorted(x for x in keys if x.startswith(w + ".") and x != w)
    scales = {}
    for k in keys:
        for suffix, wsuffix in ((".scale_weight", ".weight"), (".weight_scale", ".weight")):
            if k.endswith(suffix):
                w = k[: -len(suffix)] + wsuffix
                if w in keys and src.info(w).dtype in _FP8:
                    scales[w] = k
    fp8 = [k for k in keys if src.info(k).dtype in _FP8 and k not in scales
           and not k.endswith("scaled_fp8")]
    if not (groups or scales or fp8):
        return src, None
    what = []
    if groups:
        qt = "NF4/FP4"
        what.append(f"{len(groups)} bitsandbytes 4-bit ({qt}) weights")
    if scales:
        what.append(f"{len(scales)} scaled fp8 weights")
    if fp8:
        what.append(f"{len(fp8)} fp8 tensors")
    kind = "bnb4" if groups else "fp8"
    note = (f"input is already quantized ({', '.join(what)}): dequantized to float32 first, so "
            "this quantization adds to the error already in it")
    return DequantizedView(src, kind, groups, scales), note
