"""diffusers model folders saved with a ``quantization_config``: optimum-quanto, torchao and
bitsandbytes 8-bit (LLM.int8), as logical float32 weights.

Each detector (``(src, found) -> None``, called by :mod:`convkit.sources.view` in the order of
:data:`DETECTORS`) claims the stored tensors of one library and gives the logical weight
(``<module>.weight``, the name the unquantized model's ``state_dict`` has) a decoder whose values
are the library's own dequantization, as float32:

* **optimum-quanto** (``quant_method: quanto``; diffusers ``QuantoConfig(weights_dtype=...)``,
  transformers ``QuantoConfig(weights=...)``). A frozen ``QLinear`` saves its weight through
  ``QTensor.save_to_state_dict`` (optimum/quanto/tensor/qtensor.py), which flattens the tensor
  subclass into its inner tensors, and ``QModuleMixin._save_to_state_dict``
  (optimum/quanto/nn/qmodule.py) adds the activation scale buffers:

  - int8 / float8 (``WeightQBytesTensor``): ``X.weight._data`` (I8 / F8_E4M3, the weight's
    shape), ``X.weight._scale`` (``[out, 1]``, the model dtype: absmax per output row, axis 0);
  - int4 / int2 (``WeightQBitsTensor``): ``X.weight._data._data`` (U8: the ``PackedTensor``'s
    own ``_data``, rows packed ``8 // bits`` to a byte), ``X.weight._scale`` and
    ``X.weight._shift`` (``[rows, 1]``; rows = out, or out * in / group_size when the weight
    is grouped; QModuleMixin.__init__ picks the group size from in_features);
  - ``X.input_scale``, ``X.output_scale`` (scalars; activation quantization, unused by
    weight-only configs): hidden.

  The parts are handed to quanto's own loaders (``WeightQBytesTensor.load_from_state_dict`` /
  ``WeightQBitsTensor.load_from_state_dict``, as ``QModuleMixin._load_from_state_dict`` calls
  them) and the rebuilt tensor's ``dequantize()`` gives the values. ``optimize()`` is not
  called: it only picks a device kernel layout (TinyGemm / Marlin / AWQ), which for bf16 int4
  re-rounds the shift (``TinyGemmWeightQBitsTensor.weight_qbits_tensor``: "lossy for bfloat16");
  the decoded values are the stored ones. int8/fp8 scales are per row, so ranges of whole rows
  are decoded (granule = row length); packed int4/int2 rows interleave, so those are decoded
  whole.

* **torchao** (``quant_method: torchao``; safetensors as diffusers' ``TorchAoHfQuantizer``
  writes them with torchao's ``flatten_tensor_state_dict``). ``X.weight`` is stored as
  ``X._weight_<part>`` for every part in ``_tensor_data_names`` (Int8Tensor: ``qdata`` I8
  ``[out, in]``, ``scale`` ``[out, 1]`` float32, ``zero_point`` I8 ``[out, 1]``) and the file
  metadata holds ``tensor_names`` (JSON list) and, per tensor name, a JSON object (``_type``,
  ``_data`` attributes such as ``block_size`` and ``dtype``, ``_tensor_data_names``).
  diffusers merges the metadata of every shard (``TorchAoHfQuantizer.set_metadata``); so do we.
  The tensor is rebuilt with torchao's ``unflatten_tensor_state_dict`` and decoded with its own
  ``dequantize()``; per-row block sizes (``[1, in]``, Int8WeightOnlyConfig's default PerRow)
  are decoded by ranges of rows.

* **bitsandbytes 8-bit** (diffusers ``BitsAndBytesConfig(load_in_8bit=True)``):
  ``Linear8bitLt._save_to_state_dict`` (bitsandbytes/nn/modules.py) writes ``X.weight`` (I8,
  row-major), ``X.SCB`` (float32 ``[out]``, absmax per row) and ``X.weight_format`` (U8 scalar,
  0 = "row"; bitsandbytes >= 0.45 refuses any other layout, ``maybe_rearrange_weight``). The
  values are ``int8 * SCB.view(-1, 1) * 7.874015718698502e-3``, the exact expression of
  bitsandbytes' ``int8_vectorwise_dequant`` kernel (bitsandbytes/_ops.py, "default" kernel;
  diffusers' ``dequantize_bnb_weight`` calls it), evaluated the same way here, row ranges at a
  time. (4-bit is :func:`convkit.sources.view.detect_bnb4`.)

optimum-quanto and torchao are imported only when such a folder is opened; a folder whose
library is missing, a method or type that cannot be decoded, a part missing or of the wrong
shape are reported as :class:`~convkit.errors.InputFormatError` naming the folder, the tensor
and the fix.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dtypes
from ..errors import InputFormatError
from .encodings import Float32Decoder
from .jsonsafe import loads

_HINT_REEXPORT = "the folder is incomplete or was written by a broken tool; save it again"
_HINT_UNQUANTIZED = "start from the unquantized model"


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet():
    """Import-time chatter of the libraries (missing CUDA extensions, deprecations, diffusers
    warning that it cannot import torchao while quanto imports it) is not ours to show."""
    from ..quantize.hf_backends import _quiet_imports

    names = ("diffusers", "transformers")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with _quiet_imports():
            yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


def _import(lib: str):
    """The library module, imported quietly; None when it is not installed."""
    try:
        with _quiet():
            if lib == "quanto":
                import optimum.quanto as mod
            else:
                import torchao.prototype.safetensors.safetensors_support as mod
    except ImportError:
        return None
    return mod


@dataclass
class _Component:
    """One component of the source: its key prefix, config.json, weight files."""

    name: str                     # "unet", "" for a lone component folder or a single file
    prefix: str                   # key prefix in the source ("unet/", "")
    where: Path                   # folder (or file) to name in messages
    config: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    keys: list = field(default_factory=list)

    @property
    def qconfig(self) -> dict:
        q = self.config.get("quantization_config")
        return q if isinstance(q, dict) else {}

    @property
    def method(self) -> str | None:
        m = self.qconfig.get("quant_method")
        return str(m) if m is not None else None


def _components(src) -> list[_Component]:
    """Components of a diffusers folder (by their key prefix), or the whole source as one."""
    root = Path(src.path)
    if src.format != "diffusers":
        return [_Component("", "", root, {}, [root], list(src.keys()))]
    configs = getattr(src, "configs", {}) or {}
    files = getattr(src, "components", {}) or {}
    comps = {c: _Component(c, f"{c}/" if c else "", root / c if c else root,
                           configs.get(c) or {}, list(files.get(c, [])), [])
             for c in files}
    for k in src.keys():
        c = k.split("/", 1)[0] if "/" in k and "" not in comps else ""
        if c in comps:
            comps[c].keys.append(k)
    return list(comps.values())


def _err(comp: _Component, msg: str, key: str | None = None,
         hint: str | None = _HINT_REEXPORT) -> InputFormatError:
    return InputFormatError(msg, path=comp.where, key=key, hint=hint)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(int(d), 1)
    return tuple(reversed(stride))


def _row(shape) -> int:
    return math.prod(shape[1:]) if len(shape) >= 1 else 1


# ----------------------------------------------------------------------------- optimum-quanto

#: diffusers' own table (quantizers/quanto/utils.py: _get_weight_type) and transformers'
QUANTO_QTYPES = {"float8": "qfloat8", "int8": "qint8", "int4": "qint4", "int2": "qint2"}
_UNKNOWN_SHAPE = object()
_QUANTO_PART = re.compile(r"^(?P<mod>.+)\.weight\.(?P<part>_data\._data|_data|_scale|_shift)$")


@dataclass
class QuantoWeight(Float32Decoder):
    """A quanto ``WeightQBytesTensor`` (8 bits) or ``WeightQBitsTensor`` (4/2 bits)."""

    qtype: str = "qint8"
    prefix: str = ""                      # stored prefix: "<module>.weight."
    group_size: int | None = None
    stored_shape: tuple[int, ...] = ()

    family = "quanto"

    @property
    def label(self) -> str:
        return f"quanto:{self.qtype}"

    @property
    def bits(self) -> int:
        return 8 if self.qtype.startswith(("qint8", "qfloat8")) else int(self.qtype[4:])

    @property
    def granule(self) -> int:
        # per-row scales: whole rows decode on their own; packed rows interleave
        return _row(self.shape) if self.bits == 8 and self.numel else 0

    def _qbytes(self, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        from optimum.quanto import qtypes
        from optimum.quanto.tensor.weights.qbytes import WeightQBytesTensor

        shape = tuple(data.shape)
        missing: list = []
        q = WeightQBytesTensor.load_from_state_dict(
            {self.prefix + "_data": data, self.prefix + "_scale": scale}, self.prefix,
            qtype=qtypes[self.qtype], axis=0, size=torch.Size(shape),
            stride=_contiguous_stride(shape), activation_qtype=None, missing_keys=missing)
        with torch.no_grad():
            return q.dequantize()

    def decode(self, raw, start, count, out, aux) -> None:
        row = _row(self.shape)
        r0, n = start // row, count // row
        data = raw.view(dtypes.to_torch(self.stored_dtype)).view(n, *self.shape[1:])
        scale = aux[self.prefix + "_scale"][r0:r0 + n]
        out.copy_(self._qbytes(data, scale).reshape(-1))

    def decode_whole(self, stored, aux) -> torch.Tensor:
        if self.bits == 8:
            return super().decode_whole(stored, aux)
        from optimum.quanto import qtypes
        from optimum.quanto.tensor.weights.qbits import WeightQBitsTensor

        data = stored.contiguous().reshape(-1).view(torch.uint8).reshape(self.stored_shape)
        missing: list = []
        q = WeightQBitsTensor.load_from_state_dict(
            {self.prefix + "_data._data": data, self.prefix + "_scale": aux[self.prefix + "_scale"],
             self.prefix + "_shift": aux[self.prefix + "_shift"]}, self.prefix,
            qtype=qtypes[self.qtype], axis=0, group_size=self.group_size,
            size=torch.Size(self.shape), stride=_contiguous_stride(self.shape),
            missing_keys=missing)
        with torch.no_grad():
            return q.dequantize().float().reshape(self.shape)


def _model_shapes(comp: _Component) -> dict[str, tuple[int, ...]] | None:
    """{state_dict key: shape} of the component's model built from its config.json on the meta
    device (nothing allocated), or None when the config names no class we can build."""
    cfg = {k: v for k, v in comp.config.items() if k != "quantization_config"}
    with _quiet():
        try:
            if "_class_name" in cfg:
                import diffusers

                cls = getattr(diffusers, str(cfg["_class_name"]), None)
                if cls is None:
                    return None
                with torch.device("meta"):
                    model = cls.from_config(cfg)
            elif cfg.get("architectures"):
                import transformers

                cls = getattr(transformers, str(cfg["architectures"][0]), None)
                if cls is None:
                    return None
                conf = cls.config_class.from_dict(cfg)
                with torch.device("meta"):
                    model = cls(conf)
            else:
                return None
        except Exception:  # noqa: BLE001 - a config the installed library cannot build
            return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=256)
def _quanto_group_size(qtype_name: str, shape: tuple[int, ...]) -> int | None:
    """The group size quanto's own QModuleMixin.__init__ picks for a Linear of this shape."""
    from optimum.quanto import QLinear, qtypes

    out_f, in_f = shape[0], math.prod(shape[1:])
    with _quiet():
        ql = QLinear(in_f, out_f, bias=False, weights=qtypes[qtype_name], device="meta")
    return ql.weight_group_size


def detect_quanto(src, found) -> None:
    """optimum-quanto weights in diffusers (or transformers) model folders."""
    comps = _components(src)
    lib = None
    for comp in comps:
        mods: dict[str, dict[str, str]] = {}
        for k in comp.keys:
            m = _QUANTO_PART.match(k)
            if m:
                mods.setdefault(m["mod"], {})[m["part"]] = k
        if comp.method != "quanto":
            if mods and src.format in ("diffusers", "safetensors"):
                first = min(mods)
                found.hidden.update(k for parts in mods.values() for k in parts.values())
                found.problems.append(_err(
                    comp, f"{len(mods)} quanto-quantized weights ({first}.weight._data, "
                          "._scale, ...) without a quantization_config saying so in "
                          "config.json (quant_method 'quanto', weights_dtype)",
                    key=first + ".weight",
                    hint="open the diffusers model folder with its config.json, or "
                         + _HINT_UNQUANTIZED))
            continue
        qc = comp.qconfig
        wd = qc.get("weights_dtype", qc.get("weights"))
        qname = QUANTO_QTYPES.get(str(wd))
        for parts in mods.values():
            found.hidden.update(parts.values())
        for mod in mods:
            found.hidden.update(x for x in (mod + ".input_scale", mod + ".output_scale")
                                if x in src)
        if qname is None:
            found.problems.append(_err(
                comp, f"quanto weights_dtype {wd!r} cannot be decoded by convkit (known: "
                      f"{', '.join(QUANTO_QTYPES)})", hint=_HINT_UNQUANTIZED))
            continue
        if not mods:
            continue
        if lib is None:
            lib = _import("quanto") or False
        if not lib:
            found.problems.append(_err(
                comp, f"this folder is quantized with optimum-quanto ({wd}), which is not "
                      "installed", hint="pip install optimum-quanto  (or: pip install "
                                        "'convkit[quanto]')"))
            continue
        qtype = lib.qtypes[qname]
        shapes: dict | None = {} if qtype.bits == 8 else None
        unknown: list[str] = []
        for mod, parts in mods.items():
            logical = mod + ".weight"
            if logical in src:
                found.problems.append(_err(comp, "stored both as a float tensor and as quanto "
                                                 "parts (._data/._scale)", key=logical))
                continue
            if qtype.bits != 8 and shapes is None:
                shapes = _model_shapes(comp) or {}
            dec = _quanto_decoder(src, comp, mod, parts, qtype, shapes, found.problems)
            if dec is _UNKNOWN_SHAPE:
                unknown.append(logical)
            elif dec is not None:
                found.decoders.setdefault(logical, dec)
        if unknown:     # one cause: said once
            found.problems.append(_err(
                comp, f"cannot tell the shape of {len(unknown)} {qname} weight(s) (packed "
                      "4/2-bit data does not show it; the component's config.json names no "
                      "model class convkit can build, and the module has no bias)",
                key=unknown[0], hint="keep the component's config.json beside its weights"))


def _quanto_decoder(src, comp, mod, parts, qtype, shapes, problems) -> QuantoWeight | None:
    logical = mod + ".weight"
    prefix = logical + "."
    eight = qtype.bits == 8
    need = ("_data", "_scale") if eight else ("_data._data", "_scale", "_shift")
    missing = [p for p in need if p not in parts]
    if missing:
        problems.append(_err(comp, f"quanto {qtype.name} weight without its "
                                   f"{', '.join('weight.' + p for p in missing)}", key=logical))
        return None
    data, scale = src.info(parts[need[0]]), src.info(parts["_scale"])
    if not dtypes.is_float(scale.dtype) or scale.dtype.startswith("F8"):
        problems.append(_err(comp, f"scale is {scale.dtype}, a float16/bfloat16/float32 tensor "
                                   "is expected", key=parts["_scale"]))
        return None
    if eight:
        want = dtypes.from_torch(qtype.dtype)
        if data.dtype != want:
            problems.append(_err(comp, f"{qtype.name} data is {data.dtype}, {want} expected",
                                 key=parts["_data"]))
            return None
        shape = tuple(data.shape)
        # axis 0, keepdim: one scale per output row (optimum/quanto/tensor/optimizers)
        if len(shape) < 1 or tuple(scale.shape) != (shape[0],) + (1,) * (len(shape) - 1):
            problems.append(_err(comp, f"scale {list(scale.shape)} does not fit weight "
                                       f"{list(shape)} (one per output row: "
                                       f"{[shape[0] if shape else 0] + [1] * (len(shape) - 1)})",
                                 key=parts["_scale"]))
            return None
        aux = tuple(parts[p] for p in ("_scale",))
        return QuantoWeight(parts["_data"], shape, data.dtype, aux, qtype=qtype.name,
                            prefix=prefix, stored_shape=shape)
    shift = src.info(parts["_shift"])
    if data.dtype != "U8" or len(data.shape) != 2:
        problems.append(_err(comp, f"packed {qtype.name} data is {data.dtype}{list(data.shape)}"
                                   ", a 2-D uint8 tensor is expected", key=parts["_data._data"]))
        return None
    shape = shapes.get(logical[len(comp.prefix):]) if shapes else None
    bias = mod + ".bias"
    if shape is None and bias in src and len(src.info(bias).shape) == 1 and src.info(bias).shape[0]:
        out_f = src.info(bias).shape[0]
        numel = scale.shape[0] * data.shape[1] if scale.shape else 0
        if numel % out_f == 0:
            shape = (out_f, numel // out_f)
    if shape is None:
        return _UNKNOWN_SHAPE
    if len(shape) != 2:
        problems.append(_err(comp, f"quanto {qtype.name} weights are Linear weights (2-D); "
                                   f"the model has {list(shape)}", key=logical))
        return None
    gs = _quanto_group_size(qtype.name, tuple(shape))
    rows, cols = (shape if gs is None else (math.prod(shape) // gs, gs))
    per = 8 // qtype.bits
    packed = (-(-rows // per), cols)            # PackedTensor.pack: rows in 8 // bits groups
    if tuple(data.shape) != packed:
        problems.append(_err(comp, f"packed {qtype.name} data is {list(data.shape)}, "
                                   f"{list(packed)} expected for weight {list(shape)}"
                                   + (f" in groups of {gs}" if gs else ""),
                             key=parts["_data._data"]))
        return None
    for p, info in (("_scale", scale), ("_shift", shift)):
        if tuple(info.shape) != (rows, 1):
            problems.append(_err(comp, f"{p[1:]} {list(info.shape)} does not fit weight "
                                       f"{list(shape)}: [{rows}, 1] expected (one per "
                                       + ("row" if gs is None else f"group of {gs}") + ")",
                                 key=parts[p]))
            return None
    return QuantoWeight(parts["_data._data"], tuple(shape), "U8",
                        (parts["_scale"], parts["_shift"]), qtype=qtype.name, prefix=prefix,
                        group_size=gs, stored_shape=tuple(data.shape))


# ----------------------------------------------------------------------------- torchao

#: tensor subclasses convkit decodes on a CPU (their dequantize() is plain torch code)
TORCHAO_TYPES = ("Int8Tensor",)
_TORCHAO_PART = re.compile(r"^(?P<mod>.+)\._(?P<leaf>[^.]+?)_(?P<part>qdata)$")


@dataclass
class TorchAOWeight(Float32Decoder):
    """A torchao tensor subclass flattened by ``flatten_tensor_state_dict``."""

    name: str = ""                        # its tensor name in the metadata ("<module>.weight")
    entry: str = ""                       # its metadata entry (JSON)
    parts: dict = field(default_factory=dict)     # data name -> stored key
    type_name: str = "Int8Tensor"
    per_row: bool = False
    stored_shape: tuple[int, ...] = ()

    family = "torchao"

    @property
    def label(self) -> str:
        return f"torchao:{self.type_name}"

    @property
    def granule(self) -> int:
        return _row(self.shape) if self.per_row and self.numel else 0

    def prepare(self, aux):
        return {p: aux[k] for p, k in self.parts.items() if k != self.main}

    def _dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        from torchao.prototype.safetensors.safetensors_support import (
            unflatten_tensor_state_dict,
        )

        mod, leaf = self.name.rsplit(".", 1)
        flat = {f"{mod}._{leaf}_{p}": t for p, t in tensors.items()}
        got, _ = unflatten_tensor_state_dict(
            flat, {self.name: self.entry, "tensor_names": json.dumps([self.name])})
        with torch.no_grad():
            return got[self.name].dequantize()

    def decode(self, raw, start, count, out, aux) -> None:
        row = _row(self.shape)
        r0, n = start // row, count // row
        tensors = {"qdata": raw.view(dtypes.to_torch(self.stored_dtype)).view(n, *self.shape[1:])}
        tensors.update({p: t[r0:r0 + n] for p, t in aux.items()})
        out.copy_(self._dequantize(tensors).reshape(-1))

    def decode_whole(self, stored, aux) -> torch.Tensor:
        if self.per_row:
            return super().decode_whole(stored, aux)
        qdata = stored.contiguous().reshape(-1).view(dtypes.to_torch(self.stored_dtype))
        tensors = {"qdata": qdata.reshape(self.stored_shape), **aux}
        return self._dequantize(tensors).float().reshape(self.shape)


def _metadata(src, comp: _Component) -> dict[str, str]:
    """The safetensors metadata of every weight file of the component, merged in file order
    (as diffusers' TorchAoHfQuantizer.set_metadata does)."""
    if src.format == "safetensors":
        return dict(src.metadata)
    from .safetensors_file import read_header

    merged: dict[str, str] = {}
    for f in comp.files:
        if Path(f).suffix != ".safetensors":
            continue
        meta = read_header(Path(f))[0].get("__metadata__") or {}
        if isinstance(meta, dict):
            merged.update({str(k): v for k, v in meta.items() if isinstance(v, str)})
    return merged


def detect_torchao(src, found) -> None:
    """torchao tensor subclasses in safetensors (diffusers folders, or a single file written
    with flatten_tensor_state_dict: the metadata says everything)."""
    if src.format not in ("diffusers", "safetensors"):
        return
    lib = None
    for comp in _components(src):
        qkeys = [k for k in comp.keys if _TORCHAO_PART.match(k)]
        if comp.method != "torchao" and not qkeys:
            continue
        meta = _metadata(src, comp)
        entries = _torchao_entries(comp, meta, found.problems)
        if entries is None:
            if comp.method == "torchao" or qkeys:
                found.hidden.update(qkeys)
                found.problems.append(_err(
                    comp, "torchao-quantized weights without torchao's safetensors metadata "
                          "(tensor_names and one JSON entry per tensor, written by "
                          "flatten_tensor_state_dict)", key=qkeys[0] if qkeys else None,
                    hint="save it again as safetensors with torchao >= 0.16 (what diffusers' "
                         "TorchAoHfQuantizer reads back), or " + _HINT_UNQUANTIZED))
            continue
        claimed: set[str] = set()
        pending = []
        for name, entry, md in entries:
            mod, leaf = name.rsplit(".", 1)
            parts = {p: f"{comp.prefix}{mod}._{leaf}_{p}" for p in md["_tensor_data_names"]}
            claimed.update(parts.values())
            found.hidden.update(k for k in parts.values() if k in src)
            pending.append((name, entry, md, parts))
        for k in qkeys:
            if k not in claimed:
                found.hidden.add(k)
                found.problems.append(_err(comp, "torchao data without an entry in the file's "
                                                 "metadata (tensor_names)", key=k))
        if not pending:
            continue
        if lib is None:
            lib = _import("torchao") or False
        if not lib:
            found.problems.append(_err(
                comp, "this folder is quantized with torchao, which is not installed",
                hint="pip install torchao  (or: pip install 'convkit[torchao]')"))
            continue
        for name, entry, md, parts in pending:
            dec = _torchao_decoder(src, comp, name, entry, md, parts, found.problems)
            if dec is not None:
                found.decoders.setdefault(comp.prefix + name, dec)


def _torchao_entries(comp, meta, problems):
    """[(tensor name, JSON entry, parsed entry)] of the tensor subclasses in the metadata;
    None when the metadata is not torchao's."""
    if "tensor_names" not in meta:
        return None
    try:
        names = loads(meta["tensor_names"], "torchao metadata 'tensor_names'")
    except ValueError as e:
        problems.append(_err(comp, str(e)))
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.append(_err(comp, "torchao metadata 'tensor_names' is not a list of names"))
        return []
    out = []
    for name in names:
        raw = meta.get(name)
        if raw is None:
            problems.append(_err(comp, "torchao metadata has no entry for this tensor",
                                 key=comp.prefix + name))
            continue
        try:
            md = loads(raw, f"torchao metadata of '{name}'")
        except ValueError as e:
            problems.append(_err(comp, str(e), key=comp.prefix + name))
            continue
        if not isinstance(md, dict):
            problems.append(_err(comp, "torchao metadata entry is not a JSON object",
                                 key=comp.prefix + name))
            continue
        if md.get("_type") in ("Tensor", "torch.Tensor"):
            continue
        dn = md.get("_tensor_data_names")
        if ("." not in name or not isinstance(dn, list) or "qdata" not in dn
                or not all(isinstance(x, str) for x in dn) or not isinstance(md.get("_data"), dict)):
            problems.append(_err(comp, f"torchao metadata entry ({md.get('_type')!r}) has no "
                                       "'_data' / '_tensor_data_names' with 'qdata'",
                                 key=comp.prefix + name))
            continue
        out.append((name, raw, md))
    return out


def _torchao_decoder(src, comp, name, entry, md, parts, problems) -> TorchAOWeight | None:
    key = comp.prefix + name
    tname = md.get("_type")
    if tname not in TORCHAO_TYPES:
        problems.append(_err(comp, f"torchao {tname} weights cannot be decoded by convkit "
                                   f"(it reads {', '.join(TORCHAO_TYPES)})", key=key,
                             hint=_HINT_UNQUANTIZED))
        return None
    if key in src:
        problems.append(_err(comp, "stored both as a float tensor and as torchao parts",
                             key=key))
        return None
    missing = [p for p, k in parts.items() if k not in src]
    if missing:
        problems.append(_err(comp, f"torchao {tname} weight without its "
                                   f"{', '.join(parts[p].rsplit('/', 1)[-1] for p in missing)}",
                             key=key))
        return None
    qinfo = src.info(parts["qdata"])
    if qinfo.dtype != "I8":
        problems.append(_err(comp, f"{tname} qdata is {qinfo.dtype}, I8 expected",
                             key=parts["qdata"]))
        return None
    shape = tuple(qinfo.shape)
    bs = md["_data"].get("block_size")
    if (not isinstance(bs, list) or len(bs) != len(shape)
            or not all(isinstance(b, int) and b > 0 and d % b == 0 for b, d in zip(bs, shape))):
        problems.append(_err(comp, f"{tname} block_size {bs!r} does not fit qdata "
                                   f"{list(shape)}", key=key))
        return None
    blocks = [d // b for d, b in zip(shape, bs)]
    for p in ("scale", "zero_point"):
        if p in parts and math.prod(src.info(parts[p]).shape) != math.prod(blocks):
            problems.append(_err(comp, f"{p} {list(src.info(parts[p]).shape)} does not fit "
                                       f"qdata {list(shape)} with block_size {bs}: "
                                       f"{blocks} expected", key=parts[p]))
            return None
    # rebuild it on the meta device with torchao's own code: catches what the checks above
    # do not know about (an attribute this torchao version does not take, ...)
    try:
        from torchao.prototype.safetensors.safetensors_support import (
            unflatten_tensor_state_dict,
        )

        mod, leaf = name.rsplit(".", 1)
        flat = {f"{mod}._{leaf}_{p}": torch.empty(src.info(k).shape,
                                                  dtype=dtypes.to_torch(src.info(k).dtype),
                                                  device="meta") for p, k in parts.items()}
        with _quiet():
            got, _ = unflatten_tensor_state_dict(flat, {name: entry,
                                                        "tensor_names": json.dumps([name])})
            t = got[name]
            t.dequantize()
        logical = tuple(t.shape)
    except Exception as e:  # noqa: BLE001 - torchao raises ValueError/RuntimeError/TypeError...
        problems.append(_err(comp, f"torchao cannot rebuild this {tname} "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                             key=key))
        return None
    # one scale (and zero point) per row, stored [rows, 1]: ranges of rows decode alone
    per_row = (len(shape) == 2 and list(bs) == [1, shape[1]] and logical == shape
               and set(parts) <= {"qdata", "scale", "zero_point"}
               and all(tuple(src.info(parts[p]).shape) == (shape[0], 1)
                       for p in parts if p != "qdata"))
    aux = tuple(k for p, k in parts.items() if p != "qdata")
    return TorchAOWeight(parts["qdata"], logical, "I8", aux, name=name, entry=entry,
                         parts=parts, type_name=tname, per_row=per_row, stored_shape=shape)


# ----------------------------------------------------------------------------- bitsandbytes 8-bit

#: 1/127 as bitsandbytes writes it (bitsandbytes/_ops.py, int8_vectorwise_dequant "default")
BNB8_RECIPROCAL = 7.874015718698502e-3
#: bitsandbytes.utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING
BNB8_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


@dataclass
class BNB8(Float32Decoder):
    """bitsandbytes LLM.int8 weight: int8 rows and their absmax (``SCB``)."""

    scb_key: str = ""

    family = "bnb8"

    @property
    def label(self) -> str:
        return "bnb:int8"

    @property
    def granule(self) -> int:
        return _row(self.shape) if self.numel else 0

    def decode(self, raw, start, count, out, aux) -> None:
        row = _row(self.shape)
        r0, n = start // row, count // row
        a = raw.view(torch.int8).view(n, row)
        stats = aux[self.scb_key].reshape(-1)[r0:r0 + n]
        # A * stats.view(-1, 1) * 7.874015718698502e-3, evaluated as bitsandbytes does
        if stats.dtype == torch.float32:
            o = out.view(n, row)
            torch.mul(a, stats.view(-1, 1), out=o)
            o.mul_(BNB8_RECIPROCAL)
        else:
            out.copy_((a * stats.view(-1, 1) * BNB8_RECIPROCAL).reshape(-1))


def detect_bnb8(src, found) -> None:
    """bitsandbytes 8-bit (``<module>.weight`` int8 + ``<module>.SCB`` + ``weight_format``)."""
    for comp in _components(src):
        keys = set(comp.keys)
        scbs = sorted(k for k in comp.keys if k.endswith(".SCB"))
        done: set[str] = set()
        for sk in scbs:
            mod = sk[: -len(".SCB")]
            w, fmt = mod + ".weight", mod + ".weight_format"
            found.hidden.add(sk)
            if fmt in keys:
                found.hidden.add(fmt)
            done.add(w)
            dec = _bnb8_decoder(src, comp, w, sk, fmt if fmt in keys else None, found.problems)
            if dec is not None:
                found.decoders.setdefault(w, dec)
        # weights of an 8-bit folder whose SCB is gone
        eight = comp.method == "bitsandbytes" and bool(
            comp.qconfig.get("load_in_8bit") or comp.qconfig.get("_load_in_8bit"))
        for k in comp.keys:
            if k.endswith(".weight_format") and k[: -len("_format")] not in done:
                found.hidden.add(k)
                found.problems.append(_err(comp, "8-bit weight without its SCB (absmax per "
                                                 "row; only weight_format is left)",
                                           key=k[: -len("_format")]))
            elif (eight and k.endswith(".weight") and k not in done
                  and src.info(k).dtype == "I8" and k[: -len("weight")] + "weight_format" not in keys):
                found.problems.append(_err(comp, "8-bit weight without its SCB (absmax per row)",
                                           key=k))


def _bnb8_decoder(src, comp, w, sk, fmt, problems) -> BNB8 | None:
    if w not in src:
        problems.append(_err(comp, "SCB without its 8-bit weight", key=sk))
        return None
    winfo, sinfo = src.info(w), src.info(sk)
    if winfo.dtype != "I8" or len(winfo.shape) != 2:
        problems.append(_err(comp, f"SCB beside a {winfo.dtype}{list(winfo.shape)} weight; "
                                   "LLM.int8 weights are 2-D int8", key=w))
        return None
    out_f = winfo.shape[0]
    if (not dtypes.is_float(sinfo.dtype) or sinfo.dtype.startswith("F8")
            or tuple(sinfo.shape) not in ((out_f,), (out_f, 1))):
        problems.append(_err(comp, f"SCB {sinfo.dtype}{list(sinfo.shape)} does not fit weight "
                                   f"{list(winfo.shape)} (float32 [{out_f}]: one absmax per row)",
                             key=sk))
        return None
    aux = (sk,)
    if fmt is not None:
        finfo = src.info(fmt)
        value = None
        if finfo.numel == 1 and finfo.dtype in ("U8", "I8", "I16", "I32", "I64") and finfo.nbytes <= 8:
            value = int(src.load(fmt).reshape(-1)[0])
        if value != 0:
            what = BNB8_FORMATS.get(value, repr(value) if value is not None else
                                    f"{finfo.dtype}{list(finfo.shape)}")
            problems.append(_err(comp, f"weight_format is {what}: only row-major ('row', 0) "
                                       "8-bit weights can be read (bitsandbytes >= 0.45 refuses "
                                       "the others too)", key=fmt,
                                 hint="save it again with bitsandbytes >= 0.45, or "
                                      + _HINT_UNQUANTIZED))
            return None
        aux += (fmt,)
    return BNB8(w, tuple(winfo.shape), "I8", aux, scb_key=sk)


DETECTORS = (detect_quanto, detect_torchao, detect_bnb8)

__all__ = [
    "BNB8",
    "DETECTORS",
    "QuantoWeight",
    "TorchAOWeight",
    "detect_bnb8",
    "detect_quanto",
    "detect_torchao",
]
