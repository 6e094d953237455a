"""optimum-quanto and torchao as diffusers uses them, one tensor at a time.

diffusers' ``QuantoConfig`` replaces every ``nn.Linear`` by a quanto ``QLinear`` and freezes it;
``TorchAoConfig`` runs ``quantize_`` on every ``nn.Linear``. Before that, every float tensor is
cast to ``torch_dtype``. Here each Linear weight is quantized by the library's own code for one
layer (quanto: ``QLinear.qweight``, which ``freeze()`` stores; torchao: the per-tensor function
behind ``quantize_``) and serialised by the library's own code (quanto:
``save_to_state_dict``; torchao: ``flatten_tensor_state_dict``), so names, dtypes, shapes and
values are the ones diffusers' ``save_pretrained`` writes. The full output layout (names,
dtypes, shapes, the order that decides sharding, torchao's metadata) is computed on ``meta``
tensors before anything is read.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import warnings
from collections import OrderedDict

import torch

from ..errors import UsageError

#: target -> (library, diffusers setting); int4wo is refused, see INT4WO_CPU below
TARGETS = {"quanto:int8": ("quanto", "int8"), "quanto:int4": ("quanto", "int4"),
           "quanto:fp8": ("quanto", "float8"), "torchao:int8wo": ("torchao", "int8wo"),
           "torchao:int4wo": ("torchao", "int4wo")}
PIP = {"quanto": ("optimum-quanto", "optimum.quanto", "0.2.6"), "torchao": ("torchao", "torchao", "0.16.0")}

INT4WO_CPU = (
    "torchao's Int4WeightOnlyConfig cannot quantize on a CPU: its default packing 'plain' "
    "(Int4Tensor) and 'preshuffled' need the mslk kernels, which ship for CUDA/ROCm only "
    "('ImportError: Requires mslk >= 1.0.0'), 'tile_packed_to_4d' (tinygemm) requires a CUDA GPU "
    "of compute capability >= 8.0, 'plain_int32' runs on XPU/NPU only, and torchao's CPU int4 "
    "layout (Int4CPULayout) no longer exists; its Int4 tensors also run their matmul with "
    "those GPU kernels only")
INT4WO_HINT = ("on a CUDA GPU, load the model with diffusers' TorchAoConfig(Int4WeightOnlyConfig()) "
               "and save_pretrained; on a CPU use quanto:int4 (4-bit, reloads and runs on CPU) or "
               "torchao:int8wo")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _newer(v: str, floor: str) -> bool:
    from packaging.version import Version

    return Version(v) >= Version(floor)


def check(target: str) -> None:
    """Raise a one-line UsageError unless ``target`` can be made and reloaded here."""
    lib, what = TARGETS[target]
    if target == "torchao:int4wo":
        ver = _version("torchao")
        raise UsageError(f"target '{target}': {INT4WO_CPU}"
                         + (f" (torchao {ver})" if ver else ""), hint=INT4WO_HINT)
    dist, module, floor = PIP[lib]
    ver = _version(dist)
    if ver is None or importlib.util.find_spec(module.split(".")[0]) is None:
        raise UsageError(f"target '{target}' needs {dist}, which is not installed",
                         hint=f"pip install {dist}  (or: pip install 'convkit[{lib}]')")
    if not _newer(ver, floor):
        raise UsageError(f"target '{target}' needs {dist} >= {floor} (installed: {ver})",
                         hint=f"pip install -U {dist}")
    preload(lib)
    if lib == "torchao":
        from diffusers.quantizers.torchao.torchao_quantizer import TorchAoHfQuantizer

        if not hasattr(TorchAoHfQuantizer, "set_metadata"):
            raise UsageError(f"target '{target}': the installed diffusers "
                             f"({_version('diffusers')}) cannot reload torchao safetensors "
                             "checkpoints", hint="pip install -U diffusers")


@contextlib.contextmanager
def _quiet_imports():
    """The libraries log missing CUDA extensions and deprecations at import; not ours to show."""
    names = ("torchao", "torch.utils._pytree", "optimum.quanto", "bitsandbytes")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


def preload(lib: str) -> None:
    """Import diffusers and the library once, quietly (they import each other)."""
    with _quiet_imports():
        mods = ["diffusers.quantizers"]   # imports every installed quantization library
        mods += (["optimum.quanto"] if lib == "quanto" else
                 ["torchao.quantization", "torchao.prototype.safetensors.safetensors_support"])
        for m in mods:
            importlib.import_module(m)


class Backend:
    lib = ""
    label = ""         # quantized type as shown in plans and reports

    def hf_config(self) -> dict:
        """``quantization_config`` exactly as diffusers writes it into config.json."""
        raise NotImplementedError

    def layout(self, meta: torch.nn.Module, dtype: torch.dtype):
        """(ordered {output key: meta tensor} in state_dict order, file metadata,
        {Linear weight name: its output keys})."""
        raise NotImplementedError

    def quantize(self, name: str, w: torch.Tensor):
        """({output key: tensor}, dequantized weight) for Linear weight ``name``."""
        raise NotImplementedError


def _plain(mod: torch.nn.Module, prefix: str, dtype, out: OrderedDict) -> None:
    for n, t in mod._parameters.items():
        if t is not None:
            out[prefix + n] = _cast_meta(t, dtype)
    for n, t in mod._buffers.items():
        if t is not None and n not in mod._non_persistent_buffers_set:
            out[prefix + n] = _cast_meta(t, dtype)


def _cast_meta(t: torch.Tensor, dtype) -> torch.Tensor:
    t = t.detach()
    return t.to(dtype) if t.is_floating_point() else t


class Quanto(Backend):
    lib = "quanto"

    def __init__(self, weights_dtype: str):
        with _quiet_imports():
            from diffusers import QuantoConfig
        self.weights_dtype = weights_dtype
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # QuantoConfig is deprecated in diffusers (still loads)
            self._config = QuantoConfig(weights_dtype=weights_dtype)
        # diffusers' own table (quantizers/quanto/utils.py: _get_weight_type)
        name = {"float8": "qfloat8", "int8": "qint8", "int4": "qint4", "int2": "qint2"}[weights_dtype]
        import optimum.quanto as oq

        self.qtype = getattr(oq, name)
        self.label = name

    def hf_config(self) -> dict:
        return self._config.to_dict()

    def _qlinear(self, w: torch.Tensor):
        from optimum.quanto import QLinear

        out_f, in_f = w.shape
        ql = QLinear(in_f, out_f, bias=False, dtype=w.dtype, weights=self.qtype, device="meta")
        ql.weight = torch.nn.Parameter(w, requires_grad=False)
        return ql

    def _weight(self, name: str, w: torch.Tensor):
        with torch.no_grad():
            q = self._qlinear(w).qweight      # what QLinear.freeze() stores
        d: OrderedDict = OrderedDict()
        q.save_to_state_dict(d, name + ".", False)
        return d, q

    def layout(self, meta, dtype):
        out: OrderedDict = OrderedDict()
        weights: dict[str, list[str]] = {}
        for mname, mod in meta.named_modules():
            p = mname + "." if mname else ""
            if not isinstance(mod, torch.nn.Linear):
                _plain(mod, p, dtype, out)
                continue
            d, _ = self._weight(p + "weight", torch.empty(mod.weight.shape, dtype=dtype, device="meta"))
            out.update(d)
            if mod.bias is not None:
                out[p + "bias"] = _cast_meta(mod.bias, dtype)
            scales = {p + "input_scale": torch.empty((), dtype=dtype, device="meta"),
                      p + "output_scale": torch.empty((), dtype=dtype, device="meta")}
            out.update(scales)
            weights[p + "weight"] = list(d) + list(scales)
        return out, {}, weights

    def quantize(self, name, w):
        d, q = self._weight(name, w)
        mod = name[: -len("weight")]
        d[mod + "input_scale"] = torch.ones((), dtype=w.dtype)   # QLinear's buffers, as created
        d[mod + "output_scale"] = torch.ones((), dtype=w.dtype)
        return d, q.dequantize()


class TorchAO(Backend):
    lib = "torchao"
    label = "int8wo"

    def __init__(self, what: str):
        with _quiet_imports():
            from diffusers import TorchAoConfig
            from torchao.quantization import Int8WeightOnlyConfig
            from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
        self._flatten = flatten_tensor_state_dict
        self.aoconfig = Int8WeightOnlyConfig()
        self._config = TorchAoConfig(self.aoconfig)

    def hf_config(self) -> dict:
        return self._config.to_dict()

    def _qtensor(self, w: torch.Tensor):
        from torchao.quantization import Int8Tensor, quant_api

        fn = getattr(quant_api, "_int8_weight_only_quantize_tensor", None)   # what quantize_ runs
        with torch.no_grad():
            if fn is not None:
                return fn(w, self.aoconfig)
            return Int8Tensor.from_hp(w, granularity=self.aoconfig.granularity)

    def layout(self, meta, dtype):
        sd: OrderedDict = OrderedDict()
        linears = {n + ".weight" if n else "weight" for n, m in meta.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        for k, t in meta.state_dict().items():
            sd[k] = self._qtensor(_cast_meta(t, dtype)) if k in linears else _cast_meta(t, dtype)
        data, md = self._flatten(sd)
        weights = {}
        for k in linears:
            mod, leaf = k.rsplit(".", 1) if "." in k else ("", k)
            pre = f"{mod}._{leaf}_"
            weights[k] = [x for x in data if x.startswith(pre)]
        return OrderedDict(data), md, weights

    def quantize(self, name, w):
        qt = self._qtensor(w)
        data, _ = self._flatten({name: qt})
        return OrderedDict(data), qt.dequantize()


def backend(target: str) -> Backend:
    lib, what = TARGETS[target]
    return Quanto(what) if lib == "quanto" else TorchAO(what)
