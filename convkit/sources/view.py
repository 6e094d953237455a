"""The logical-weights view: any file or folder convkit reads, as logical float tensors.

Every command reads its inputs through :class:`WeightsView` (``convkit.sources.open_source``).
The view looks at the stored tensors (names, dtypes, shapes; small auxiliary tensors are read
up front where their values decide the layout) and gives each logical tensor a
:class:`~convkit.sources.encodings.Decoder`:

* plain fp32/fp16/bf16 (and integer) tensors: the stored bytes are the values;
* fp8 ``F8_E4M3``/``F8_E5M2`` without a scale: the fp8 numbers, as float32;
* ComfyUI scaled fp8: ``scaled_fp8`` marker + ``<layer>.scale_weight`` (ComfyUI
  ``scaled_fp8_ops``, Forge), or ``<layer>.weight_scale`` + ``<layer>.comfy_quant`` (ComfyUI
  ``MixedPrecisionOps``; also ``int8_tensorwise``), with or without activation scales
  (``scale_input`` / ``input_scale``);
* bitsandbytes NF4/FP4 as Forge and diffusers store it (quant state tensors beside the weight);
* GGUF tensors of any GGML block type, in the ComfyUI-GGUF and stable-diffusion.cpp layouts;
* quanto / torchao / bitsandbytes-8-bit diffusers model folders (:mod:`convkit.sources.hf_quant`).

Storage auxiliaries (scales, absmax, quant maps and states, markers, ``comfy_quant``,
activation scales) are consumed here: they are not keys of the view, so no command can copy
them into an output by accident. ``view.raw`` is the stored form (for ``inspect``).

Problems (a scale missing or of the wrong shape, a 4-bit weight without its quant state, a
GGML type or ComfyUI format that cannot be decoded) are found when the view is opened and
reported together, each naming file, tensor and fix.
"""
from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from .. import dtypes
from ..errors import InputFormatError, raise_all
from .base import TensorInfo, TensorSource
from .encodings import (BNB4, FP8, Aux, Decoder, GGMLBlocks, ScaledFP8, ScaledInt8)

FP8_TYPES = ("F8_E4M3", "F8_E5M2")
COMFY_FP8 = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
_HINT_REEXPORT = "the file is incomplete or was written by a broken tool; export it again"


class Found:
    """What the encoding detectors claim: decoders by logical key, stored keys they hide, and
    problems. Detectors run in order on one Found; a key already claimed is left alone."""

    def __init__(self):
        self.decoders: dict[str, Decoder] = {}
        self.hidden: set[str] = set()
        self.problems: list = []
        self.notes: list[str] = []


def _small_json(src: TensorSource, key: str, what: str, problems: list) -> dict | None:
    """A small uint8 tensor holding JSON (quant states, comfy_quant), parsed defensively."""
    from .jsonsafe import loads

    info = src.info(key)
    if info.dtype != "U8" or info.nbytes > 1 << 20:
        problems.append(InputFormatError(f"{what} must be a small uint8 tensor, found "
                                         f"{info.dtype}{list(info.shape)}", path=src.path,
                                         key=key, hint=_HINT_REEXPORT))
        return None
    raw = bytes(src.load(key).reshape(-1).numpy().tobytes())
    try:
        d = loads(raw.rstrip(b" \0"), what=what)
    except ValueError as e:
        problems.append(InputFormatError(str(e), path=src.path, key=key, hint=_HINT_REEXPORT))
        return None
    if not isinstance(d, dict):
        problems.append(InputFormatError(f"{what} is not a JSON object", path=src.path, key=key,
                                         hint=_HINT_REEXPORT))
        return None
    return d


# ----------------------------------------------------------------------------- detectors


def detect_gguf(src: TensorSource, found: Found) -> None:
    """GGUF: every tensor carries its GGML type; block types are decoded, floats are plain."""
    if src.format != "gguf":
        return
    from ..kernels.dequant import ggml_decodable

    for info in src.infos():
        q = info.storage or info.dtype
        if q in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"):
            continue
        if not ggml_decodable(q):
            found.problems.append(InputFormatError(
                f"GGML type {q} cannot be dequantized by convkit", path=src.path, key=info.name,
                hint="convert this file with a tool that reads that type, or use a Q8_0/F16 "
                     "release"))
            continue
        found.decoders[info.name] = GGMLBlocks(info.name, tuple(info.shape), q)


BNB_STATE = ".quant_state.bitsandbytes__"
BNB_AUX = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def detect_bnb4(src: TensorSource, found: Found) -> None:
    """bitsandbytes 4-bit (Forge / diffusers): weight + absmax + quant_map + packed state."""
    keys = src.keys()
    states = {k.split(BNB_STATE)[0]: k for k in keys if BNB_STATE in k}
    for w, sk in states.items():
        aux = tuple(w + s for s in BNB_AUX if w + s in src) + (sk,)
        found.hidden.update(aux)
        if w not in src:
            found.problems.append(InputFormatError("4-bit quant state without its weight",
                                                   path=src.path, key=sk, hint=_HINT_REEXPORT))
            continue
        st = _small_json(src, sk, "bitsandbytes quant state", found.problems)
        if st is None:
            continue
        qt = sk.split(BNB_STATE)[1]
        shape, bs = st.get("shape"), st.get("blocksize", 64)
        info = src.info(w)
        bad = None
        if qt not in ("nf4", "fp4") or st.get("quant_type", qt) != qt:
            bad = f"unknown 4-bit type '{qt}'"
        elif (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
              or not isinstance(bs, int) or bs <= 0):
            bad = "quant state has no valid shape/blocksize"
        elif info.dtype != "U8" or info.nbytes != (math.prod(shape) + 1) // 2:
            bad = (f"packed weight is {info.dtype}{list(info.shape)}, the quant state says "
                   f"{shape} ({(math.prod(shape) + 1) // 2} bytes)")
        elif w + ".absmax" not in src or w + ".quant_map" not in src:
            bad = "absmax or quant_map missing"
        else:
            nblocks = -(-math.prod(shape) // bs)
            am = src.info(w + ".absmax")
            if math.prod(am.shape) != nblocks:
                bad = f"absmax has {math.prod(am.shape)} values, {nblocks} blocks expected"
            elif am.dtype == "U8" and not ("nested_blocksize" in st and w + ".nested_absmax" in src
                                           and w + ".nested_quant_map" in src):
                bad = "double-quantized absmax without its nested state"
            elif math.prod(src.info(w + ".quant_map").shape) != 16:
                bad = "quant_map must hold 16 values"
        if bad:
            found.problems.append(InputFormatError(bad, path=src.path, key=w, hint=_HINT_REEXPORT))
            continue
        found.decoders[w] = BNB4(w, tuple(shape), "U8", aux, quant_type=qt, blocksize=bs,
                                 state=st)
    # a packed weight whose state is gone: its absmax/quant_map are still there
    for k in keys:
        if k.endswith(".absmax") and k[: -len(".absmax")] in src and k[: -len(".absmax")] \
                not in states and src.info(k[: -len(".absmax")]).dtype == "U8" \
                and (k[: -len(".absmax")] + ".quant_map") in src:
            found.problems.append(InputFormatError(
                "4-bit weight without its quant state (quant_state.bitsandbytes__nf4/fp4)",
                path=src.path, key=k[: -len(".absmax")], hint=_HINT_REEXPORT))


def _scale_shape_ok(scale: TensorInfo, weight: TensorInfo) -> tuple[bool, bool]:
    """(valid, per_row) for a scale beside an fp8/int8 weight: one value, or one per row."""
    n = math.prod(scale.shape)
    if n == 1:
        return True, False
    rows = weight.shape[0] if weight.shape else 0
    if n == rows and len(scale.shape) <= len(weight.shape) and (
            len(scale.shape) == 1 or all(d == 1 for d in scale.shape[1:])):
        return True, True
    return False, False


def detect_scaled(src: TensorSource, found: Found) -> None:
    """ComfyUI scaled fp8 in both forms, and ComfyUI int8_tensorwise."""
    keys = src.keys()
    markers = [k for k in keys if k.endswith("scaled_fp8") and src.info(k).dtype in FP8_TYPES]
    found.hidden.update(markers)
    found.hidden.update(k for k in keys if k.endswith((".scale_input", ".input_scale",
                                                       ".weight_scale_2")))
    comfy = {}
    for k in keys:
        if k.endswith(".comfy_quant"):
            found.hidden.add(k)
            cfg = _small_json(src, k, "comfy_quant", found.problems)
            if cfg is not None:
                comfy[k[: -len(".comfy_quant")] + ".weight"] = (cfg, k)
    scales = {}
    for k in keys:
        for suffix in (".scale_weight", ".weight_scale"):
            if k.endswith(suffix):
                scales[k[: -len(suffix)] + ".weight"] = (k, suffix)
    for w, (cfg, ck) in comfy.items():
        fmt = cfg.get("format")
        if w not in src:
            found.problems.append(InputFormatError("comfy_quant without its weight", path=src.path,
                                                   key=ck, hint=_HINT_REEXPORT))
            continue
        if fmt not in COMFY_FP8 and fmt != "int8_tensorwise":
            found.problems.append(InputFormatError(
                f"ComfyUI quantization format '{fmt}' cannot be dequantized by convkit",
                path=src.path, key=w, hint="load it in ComfyUI, or use an fp8/fp16 release"))
            continue
        if w not in scales:
            found.problems.append(InputFormatError(f"{fmt} weight without its weight_scale",
                                                   path=src.path, key=w, hint=_HINT_REEXPORT))
    for w, (sk, suffix) in scales.items():
        found.hidden.add(sk)
        if w not in src:
            found.problems.append(InputFormatError(f"{suffix[1:]} without its weight",
                                                   path=src.path, key=sk, hint=_HINT_REEXPORT))
            continue
        winfo, sinfo = src.info(w), src.info(sk)
        ok, per_row = _scale_shape_ok(sinfo, winfo)
        if not ok or not dtypes.is_float(sinfo.dtype):
            found.problems.append(InputFormatError(
                f"scale {sinfo.dtype}{list(sinfo.shape)} does not fit weight "
                f"{winfo.dtype}{list(winfo.shape)} (one value, or one per output row)",
                path=src.path, key=sk, hint=_HINT_REEXPORT))
            continue
        cfg = comfy.get(w, (None, None))[0]
        if winfo.dtype in FP8_TYPES:
            if cfg is not None and COMFY_FP8.get(cfg.get("format")) not in (None, winfo.dtype):
                found.problems.append(InputFormatError(
                    f"comfy_quant says {cfg.get('format')}, the weight is {winfo.dtype}",
                    path=src.path, key=w, hint=_HINT_REEXPORT))
                continue
            form = "scale_weight" if suffix == ".scale_weight" else "comfy_quant"
            found.decoders[w] = ScaledFP8(w, tuple(winfo.shape), winfo.dtype, (sk,),
                                          scale_key=sk, form=form, per_row=per_row)
        elif winfo.dtype == "I8" and cfg is not None and cfg.get("format") == "int8_tensorwise":
            if per_row:
                found.problems.append(InputFormatError("int8_tensorwise needs one scale",
                                                       path=src.path, key=sk,
                                                       hint=_HINT_REEXPORT))
                continue
            found.decoders[w] = ScaledInt8(w, tuple(winfo.shape), "I8", (sk,), scale_key=sk)
        elif winfo.dtype in ("F32", "F16", "BF16"):
            continue    # a float weight with a scale beside it: nothing to decode (scale hidden)
        else:
            found.problems.append(InputFormatError(
                f"{suffix[1:]} beside a {winfo.dtype} weight that is not fp8", path=src.path,
                key=sk, hint=_HINT_REEXPORT))
    # scale_weight form: every fp8 weight under a marker's prefix must have its scale
    for m in markers:
        prefix = m[: -len("scaled_fp8")]
        for k in keys:
            if (k.startswith(prefix) and k.endswith(".weight") and k not in scales
                    and src.info(k).dtype in FP8_TYPES):
                found.problems.append(InputFormatError(
                    "fp8 weight without its scale_weight in a scaled-fp8 file (ComfyUI would "
                    "load it unscaled)", path=src.path, key=k, hint=_HINT_REEXPORT))


def detect_plain_fp8(src: TensorSource, found: Found) -> None:
    for info in src.infos():
        if info.dtype in FP8_TYPES and info.name not in found.decoders \
                and info.name not in found.hidden:
            found.decoders[info.name] = FP8(info.name, tuple(info.shape), info.dtype)


def _hf_detectors():
    try:
        from .hf_quant import DETECTORS
    except ImportError:     # pragma: no cover - optional module
        return ()
    return DETECTORS


def detectors():
    """In order: the first detector to claim a key decides its decoder."""
    return (detect_gguf, detect_bnb4, *_hf_detectors(), detect_scaled, detect_plain_fp8)


# ----------------------------------------------------------------------------- the view


class WeightsView(TensorSource):
    """Logical tensors of ``raw`` (a stored-form source): see the module docstring."""

    AUX_CACHE = 4

    def __init__(self, raw: TensorSource):
        super().__init__(path=raw.path, format=raw.format, metadata=dict(raw.metadata))
        self.raw = raw
        self.decoders: dict[str, Decoder] = {}
        self.hidden: set[str] = set()
        self.notes: list[str] = []
        found = Found()         # shared: a detector sees what earlier ones claimed
        for det in detectors():
            det(raw, found)
        self.decoders, self.hidden, self.notes = found.decoders, found.hidden, found.notes
        raise_all(found.problems)
        # a logical tensor may be stored under another name (quanto ``X.weight._data``,
        # torchao ``X._weight_qdata`` -> ``X.weight``): it is listed where its main tensor is
        by_main = {d.main: k for k, d in self.decoders.items() if k != d.main}
        for info in raw.infos():
            k = by_main.get(info.name, info.name)
            if k == info.name and k in self.hidden and k not in self.decoders:
                continue
            dec = self.decoders.get(k)
            if dec is None:
                dec = self.decoders[k] = Decoder(k, tuple(info.shape), info.dtype)
            nbytes = raw.info(dec.main).nbytes + sum(raw.info(a).nbytes for a in dec.aux
                                                      if a in raw)
            self._infos[k] = TensorInfo(k, dec.dtype, tuple(dec.shape), nbytes,
                                        storage=dec.label if dec.label != dec.dtype else "")
        self.decoders = {k: d for k, d in self.decoders.items() if k in self._infos}
        self._aux_cache: OrderedDict[str, Aux] = OrderedDict()
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        # folder-level facts (components, model_index, configs, lone_component, architecture
        # of a GGUF) are the stored source's: delegate them
        if name.startswith("_") or name == "raw":
            raise AttributeError(name)
        return getattr(self.raw, name)

    # -- what is stored ----------------------------------------------------------------------
    def decoder(self, key: str) -> Decoder:
        return self.decoders[key]

    @property
    def quantized(self) -> bool:
        return any(d.lossy for d in self.decoders.values())

    def encodings(self) -> Counter:
        """{storage label: tensor count} over the logical tensors, e.g. {'Q8_0': 700, 'F32': 300}."""
        return Counter(d.label for d in self.decoders.values())

    def describe_encoding(self) -> str | None:
        """One phrase for notes and metadata: None for plain float files."""
        by_title: dict[str, Counter] = {}
        for d in self.decoders.values():
            if d.lossy:
                by_title.setdefault(d.title, Counter())[d.label] += 1
        if not by_title:
            return None
        return " + ".join(f"{t} ({', '.join(f'{k} ×{n}' for k, n in c.most_common(4))})"
                          for t, c in by_title.items())

    # -- reading -----------------------------------------------------------------------------
    def aux(self, key: str) -> Aux:
        """The prepared auxiliary tensors of ``key`` (small; a few are cached)."""
        dec = self.decoders[key]
        if not dec.aux:
            return {}
        with self._lock:
            got = self._aux_cache.get(key)
            if got is not None:
                self._aux_cache.move_to_end(key)
                return got
        got = dec.prepare({a: self.raw.load(a) for a in dec.aux if a in self.raw})
        with self._lock:
            self._aux_cache[key] = got
            while len(self._aux_cache) > self.AUX_CACHE:
                self._aux_cache.popitem(last=False)
        return got

    def _stored(self, dec: Decoder) -> torch.Tensor:
        """The whole stored main tensor as bytes."""
        info = self.raw.info(dec.main)
        if self.raw.supports_ranges:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
            self.raw.read_range(dec.main, 0, buf)
            return buf
        return self.raw.load(dec.main).contiguous().reshape(-1).view(torch.uint8)

    def stored_form(self, name: str) -> tuple[torch.Tensor, Decoder, Aux]:
        """``name`` as stored (the values of a plain tensor; the bytes of an encoded one), its
        decoder and prepared aux: ``decode_stored`` gives the logical value. For holding a
        weight in its encoding and decoding it where it is used (``convkit verify``)."""
        dec = self.decoders[name]
        if dec.direct:
            return self.raw.load(dec.main).reshape(dec.shape), dec, {}
        return self._stored(dec), dec, self.aux(name)

    @staticmethod
    def decode_stored(stored: torch.Tensor, dec: Decoder, aux: Aux) -> torch.Tensor:
        return stored if dec.direct else dec.decode_whole(stored, aux)

    def _load(self, name: str) -> torch.Tensor:
        dec = self.decoders[name]
        if dec.direct:
            return self.raw.load(dec.main).reshape(dec.shape)
        return dec.decode_whole(self._stored(dec), self.aux(name))

    @property
    def supports_ranges(self) -> bool:
        return self.raw.supports_ranges

    def chunkable(self, key: str) -> bool:
        """True when ranges of ``key`` can be read and decoded (:meth:`read_logical`)."""
        return self.raw.supports_ranges and self.decoders[key].granule > 0

    def granule(self, key: str) -> int:
        return self.decoders[key].granule

    def is_direct(self, key: str) -> bool:
        return self.decoders[key].direct

    def read_range(self, name: str, start: int, out: torch.Tensor) -> None:
        """Stored bytes of a plain tensor (only where stored bytes are the values)."""
        if not self.decoders[name].direct:
            raise ValueError(f"'{name}' is stored as {self.decoders[name].label}; "
                             "use read_logical")
        self.raw.read_range(self.decoders[name].main, start, out)

    def read_logical(self, name: str, start: int, count: int, out: torch.Tensor,
                     scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Logical elements ``start:start+count`` (``start`` a multiple of the granule) into
        ``out`` (1-D, the view's dtype for ``name``); ``scratch`` (uint8) holds the stored
        bytes when decoding. Returns ``out``."""
        dec = self.decoders[name]
        if dec.direct:
            isz = out.element_size()
            self.raw.read_range(dec.main, start * isz, out.view(torch.uint8))
            return out
        off, n = dec.stored_span(start, count)
        if scratch is None or scratch.numel() < n:
            scratch = torch.empty(n, dtype=torch.uint8)
        raw = scratch[:n]
        self.raw.read_range(dec.main, off, raw)
        dec.decode(raw, start, count, out, self.aux(name))
        return out

    def stored_span(self, name: str, start: int, count: int) -> int:
        """Bytes of stored data behind a logical range (for buffer sizing)."""
        return self.decoders[name].stored_span(start, count)[1]

    def files(self) -> list[Path]:
        return self.raw.files()

    def close(self) -> None:
        self.raw.close()

    def plain_metadata(self) -> dict[str, str]:
        """The metadata without storage records (:func:`plain_metadata`), nor the per-tensor
        records some formats keep under the stored tensors' names (torchao)."""
        stored = set(self.raw.keys())
        return {k: v for k, v in plain_metadata(self.metadata).items() if k not in stored}


def plain_metadata(meta: dict[str, str]) -> dict[str, str]:
    """``meta`` without the keys that describe how tensors were stored (formats/storage.toml):
    what an output carries over from its source when its own storage is different."""
    from ..data import load_toml

    rules = load_toml("storage.toml")["metadata"]
    keys, prefixes = set(rules["keys"]), tuple(rules["prefixes"])
    return {k: v for k, v in meta.items() if k not in keys and not k.startswith(prefixes)}


__all__ = ["WeightsView", "plain_metadata", "detectors", "Found"]
