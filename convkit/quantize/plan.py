"""Quantize plan: one item per source tensor, each with the output tensors it becomes.

A quantized weight becomes several tensors (NF4: packed weight + absmax + quant_map + packed
state; scaled fp8: weight + scale; GGUF: one block-typed tensor), so an item lists all of its
outputs with dtype and shape known up front: the safetensors header / GGUF tensor infos are
written before any data, and ``--dry-run`` prints the same plan.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGUFValueType

from .. import archs, dtypes
from ..errors import UsageError
from ..plan import provenance
from ..sources.base import TensorSource
from . import nf4
from .gguf_out import tensor_nbytes
from .report import REPORT_KEY, REPORT_WIDTH
from .rules import GGUFTyper, TypeRule, is_small, rules_for, gguf_file_type
from .targets import Target

GGUF_QUANT_VERSION = 2
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
PLACEHOLDER = "~" * REPORT_WIDTH
SCALED_FORMATS = ("scale_weight", "comfy_quant")
LAYOUTS = ("comfy", "sdcpp")


@dataclass
class QOut:
    key: str
    dtype: str                 # safetensors dtype, or the GGML type name in a GGUF file
    shape: tuple[int, ...]
    gguf: bool = False

    @property
    def nbytes(self) -> int:
        if self.gguf:
            return tensor_nbytes(self.dtype, self.shape)
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


@dataclass
class QItem:
    key: str | None            # source key (None for the scaled_fp8 marker)
    name: str                  # output name of the main tensor
    shape: tuple[int, ...]     # logical shape
    src_dtype: str
    method: str                # copy | cast | fp8 | fp8-scaled | bnb4 | gguf | marker
    qtype: str                 # type of the main output tensor
    outs: list[QOut]
    src_bytes: int = 0
    in_model: bool = False
    reason: str = ""
    orig_shape: tuple[int, ...] | None = None
    wanted: str | None = None  # type asked for before a block-size fallback

    @property
    def out_bytes(self) -> int:
        return sum(o.nbytes for o in self.outs)


@dataclass
class QPlan:
    source: TensorSource
    out: Path
    target: Target
    items: list[QItem]
    detection: archs.Detection
    layout: str = "comfy"
    metadata: dict[str, str] = field(default_factory=dict)     # safetensors output
    gguf_kvs: list[tuple] = field(default_factory=list)         # GGUF output
    notes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    bundled: list[str] = field(default_factory=list)   # other components in the GGUF (sdcpp)

    @property
    def fmt(self) -> str:
        return self.target.output_format

    @property
    def in_bytes(self) -> int:
        return sum(i.src_bytes for i in self.items)

    @property
    def out_bytes(self) -> int:
        return sum(i.out_bytes for i in self.items)

    @property
    def fallbacks(self) -> list[QItem]:
        return [i for i in self.items if i.wanted]

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for i in self.items:
            c[i.qtype] = c.get(i.qtype, 0) + 1
        return c

    def to_dict(self) -> dict:
        return {"source": str(self.source.path), "output": str(self.out), "target": self.target.name,
                "format": self.fmt, "layout": self.layout if self.fmt == "gguf" else None,
                "tensors": len(self.items), "in_bytes": self.in_bytes, "out_bytes": self.out_bytes,
                "types": self.counts(), "notes": self.notes,
                "fallbacks": [{"name": i.name, "wanted": i.wanted, "used": i.qtype,
                               "reason": i.reason} for i in self.fallbacks],
                "items": [{"key": i.key, "name": i.name, "shape": list(i.shape), "from": i.src_dtype,
                           "to": i.qtype, "method": i.method, "reason": i.reason,
                           "outputs": [{"key": o.key, "dtype": o.dtype, "shape": list(o.shape)}
                                       for o in i.outs], "bytes": i.out_bytes}
                          for i in self.items]}

    def format(self, limit: int | None = None) -> str:
        rows = self.items if limit is None else self.items[:limit]
        w = max((len(i.name) for i in rows), default=10)
        lines = [f"plan: {self.source.path} -> {self.out} ({self.target.name}, {self.fmt}"
                 + (f", layout {self.layout}" if self.fmt == "gguf" else "") + ")"]
        for i in rows:
            extra = f" +{len(i.outs) - 1} tensors" if len(i.outs) > 1 else ""
            lines.append(f"  {i.name:<{w}}  {i.src_dtype:>7} -> {i.qtype:<8} "
                         f"{str(list(i.shape)):<20} {i.out_bytes:>12,d} B  {i.method}{extra}"
                         + (f"  ({i.reason})" if i.reason else ""))
        if limit is not None and len(self.items) > limit:
            lines.append(f"  ... {len(self.items) - limit} more tensors")
        types = ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items()))
        lines.append(f"total: {len(self.items)} tensors ({types}), {self.in_bytes:,d} B read -> "
                     f"{self.out_bytes:,d} B written")
        for i in self.fallbacks:
            lines.append(f"fallback: {i.name}: {i.wanted} -> {i.qtype} ({i.reason})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _is_float(dt: str) -> bool:
    return dtypes.is_float(dt)


def plan_quantize(src: TensorSource, out: Path, target: Target, det: archs.Detection, *,
                  layout: str = "comfy", type_rules: list[str] | tuple = (),
                  scaled_format: str = "scale_weight", double_quant: bool = False,
                  rest_dtype: str | None = None) -> QPlan:
    rules = rules_for(det.arch.name)
    comp = det.arch.diffusion_component
    model_keys = det.component_keys.get(comp, [])
    if not model_keys:
        raise UsageError(f"no diffusion model ({comp}) in this input; it has: "
                         f"{', '.join(det.component_keys) or 'nothing known'}", path=src.path)
    if det.layout.naming == "diffusers":
        raise UsageError("quantize needs single-file names (SGM/LDM or BFL); this input uses "
                         "diffusers names", path=src.path,
                         hint="write a single file first, or use the original checkpoint")
    if layout not in LAYOUTS:
        from ..errors import UnknownNameError
        raise UnknownNameError("GGUF layout", layout, LAYOUTS)
    if layout != "comfy" and target.kind != "gguf":
        raise UsageError("--layout applies to GGUF targets only")
    if type_rules and target.kind != "gguf":
        raise UsageError("--type-rule applies to GGUF targets only")
    if scaled_format not in SCALED_FORMATS:
        from ..errors import UnknownNameError
        raise UnknownNameError("scaled fp8 format", scaled_format, SCALED_FORMATS)
    prefix = det.layout.prefixes[comp]
    in_model = set(model_keys)
    plan = QPlan(src, out, target, [], det, layout,
                 options={"scaled_format": scaled_format, "double_quant": double_quant,
                          "rest_dtype": rest_dtype, "type_rules": list(type_rules)})
    step = {"op": "quantize", "target": target.name}
    if target.kind == "gguf":
        _plan_gguf(plan, src, rules, prefix, model_keys, [TypeRule.parse(r) for r in type_rules])
        step["layout"] = layout
        if layout == "sdcpp" and rules.sdcpp.get("bundle"):
            from .extras_gguf import bundle_into

            plan.bundled = bundle_into(plan, src, det)
            if plan.bundled:
                plan.notes.append("stable-diffusion.cpp layout: " + ", ".join(plan.bundled)
                                  + " are in the same file (sd.cpp detects SD1/SDXL from the "
                                    "text encoders in the model file)")
        others = len(src) - len(model_keys)
        if others and not plan.bundled:
            plan.notes.append(f"{others} tensors of other components ("
                              + ", ".join(c for c in det.component_keys if c != comp)
                              + ") are not in the GGUF file (--extras DIR writes them to "
                              "separate files)")
        prov = provenance(src, step)
        plan.gguf_kvs += [(k, GGUFValueType.STRING, v) for k, v in prov.items()]
        return plan
    for k in src.keys():
        info = src.info(k)
        rel = k[len(prefix):] if k in in_model else k
        item = None
        if k in in_model and _is_float(info.dtype):
            item = _plan_weight(target, rules, k, rel, info, scaled_format, double_quant)
        if item is None:
            tdt = info.dtype
            reason = ""
            if k in in_model and _is_float(info.dtype):
                reason = _keep_reason(target, rules, rel, info.shape)
            if rest_dtype and _is_float(info.dtype):
                tdt = rest_dtype
            item = QItem(k, k, info.shape, info.dtype, "cast" if tdt != info.dtype else "copy",
                         tdt, [QOut(k, tdt, info.shape)], reason=reason)
        item.src_bytes = info.nbytes
        item.in_model = k in in_model
        plan.items.append(item)
    if target.kind == "fp8-scaled" and scaled_format == "comfy_quant":
        plan.notes.append("comfy_quant scaled fp8 is for ComfyUI; Forge ignores weight_scale and "
                          "would load these weights unscaled (use --scaled-format scale_weight)")
    if target.kind == "fp8-scaled" and scaled_format == "scale_weight":
        name = prefix + "scaled_fp8"
        plan.items.append(QItem(None, name, (2,), "-", "marker", target.qtype,
                                [QOut(name, target.qtype, (2,))], in_model=True,
                                reason="ComfyUI scaled-fp8 marker (dtype = weight fp8 type)"))
    if rest_dtype:
        step["rest_dtype"] = rest_dtype
    if target.kind == "bnb4":
        step["double_quant"] = double_quant
    if target.kind == "fp8-scaled":
        step["scaled_format"] = scaled_format
    plan.metadata = {**src.metadata, **provenance(src, step, src.metadata),
                     "convkit.quantization": target.name, REPORT_KEY: PLACEHOLDER}
    return plan


def _keep_reason(target: Target, rules, rel: str, shape) -> str:
    small = is_small(shape, rules)
    if small:
        return f"kept: {small}"
    section = "nf4" if target.kind == "bnb4" else "fp8"
    k = rules.kept(section, rel)
    if k:
        return f"kept: {rules.family} rule /{k}/"
    return "kept: not a quantized layer type"


def _plan_weight(target: Target, rules, k: str, rel: str, info, scaled_format: str,
                 double_quant: bool) -> QItem | None:
    shape = info.shape
    if is_small(shape, rules) or not rel.endswith(".weight"):
        return None
    if target.kind in ("fp8", "fp8-scaled"):
        if rules.kept("fp8", rel):
            return None
        ndims = rules.fp8.get("plain_ndims" if target.kind == "fp8" else "scaled_ndims", [2])
        if len(shape) not in ndims:
            return None
        q = target.qtype
        if target.kind == "fp8":
            return QItem(k, k, shape, info.dtype, "fp8", q, [QOut(k, q, shape)])
        layer = k[: -len("weight")]
        if scaled_format == "scale_weight":
            outs = [QOut(k, q, shape), QOut(layer + "scale_weight", "F32", ())]
        else:
            from .fp8 import comfy_quant_blob
            n = comfy_quant_blob(q).numel()
            outs = [QOut(k, q, shape), QOut(layer + "weight_scale", "F32", ()),
                    QOut(layer + "comfy_quant", "U8", (n,))]
        return QItem(k, k, shape, info.dtype, "fp8-scaled", q, outs)
    if target.kind == "bnb4":
        if rules.kept("nf4", rel) or len(shape) not in rules.nf4.get("ndims", [2]):
            return None
        dt = nf4.torch_dtype_name(dtypes.to_torch(info.dtype))
        specs = nf4.out_specs(k, shape, dt, target.qtype, double_quant)
        return QItem(k, k, shape, info.dtype, "bnb4", target.qtype,
                     [QOut(n, d, s) for n, d, s in specs])
    return None


def _plan_gguf(plan: QPlan, src: TensorSource, rules, prefix: str, model_keys: list[str],
               type_rules: list[TypeRule]) -> None:
    target = plan.target
    typer = GGUFTyper(target.qtype, rules, plan.layout, type_rules)
    kvs = []
    if plan.layout == "comfy":
        kvs.append(("general.architecture", GGUFValueType.STRING, plan.detection.arch.gguf_arch))
    kvs.append(("general.quantization_version", GGUFValueType.UINT32, GGUF_QUANT_VERSION))
    import gguf

    kvs.append(("general.file_type", GGUFValueType.UINT32,
                int(gguf.LlamaFileType[gguf_file_type(target.qtype)])))
    shapes = []
    for k in src.keys():
        if k not in set(model_keys):
            continue
        info = src.info(k)
        rel = k[len(prefix):]
        name = rel if plan.layout == "comfy" else rules.sdcpp.get("prefix", "") + rel
        dec = typer.decide(rel, info.shape, info.dtype)
        plan.items.append(QItem(k, name, info.shape, info.dtype, "gguf", dec.qtype,
                                [QOut(name, dec.qtype, dec.stored_shape, gguf=True)],
                                src_bytes=info.nbytes, in_model=True, reason=dec.reason,
                                orig_shape=dec.orig_shape, wanted=dec.wanted))
        if dec.orig_shape is not None:
            shapes.append((ORIG_SHAPE_PREFIX + name, GGUFValueType.ARRAY,
                           [int(d) for d in dec.orig_shape], GGUFValueType.INT32))
    plan.gguf_kvs = kvs + shapes
    plan.gguf_kvs.append(("convkit.quantization", GGUFValueType.STRING, target.name))
    plan.gguf_kvs.append(("convkit.layout", GGUFValueType.STRING, plan.layout))
    if plan.fallbacks:
        plan.notes.append(f"{len(plan.fallbacks)} tensors do not fit their block size and use a "
                          "fallback type (listed as 'fallback:')")


def metadata_json(plan: QPlan) -> str:
    return json.dumps(plan.to_dict())
