"""Quantization targets, registered as kind ``quantize``: each is a small object that plans its
items (which tensors become what, by the rules in ``formats/quant/*.toml``) and brings the op
that produces their bytes (:mod:`convkit.quantize.ops`).

``fp8-e4m3fn``, ``fp8-e5m2``, ``fp8-scaled``, ``nf4``, ``fp4``, ``gguf:<TYPE or MIX>``,
``quanto:int8|int4|fp8`` / ``torchao:int8wo`` (diffusers model folders; ``torchao:int4wo`` is
refused with the reason: no CPU kernel).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGUFValueType

from .. import dtypes, registry
from ..engine import Item, Out, OutFile, Src
from ..engine.ops import Const
from ..errors import UnknownNameError, UsageError
from ..provenance import output_metadata
from . import fp8, nf4
from .ops import BNB4Op, FP8Op, GGUFBlocksOp, GGUFFloatOp, RestOp, ScaledFP8Op
from .gguf_plan import gguf_item, gguf_kvs
from .plan import ORIG_SHAPE_PREFIX, QuantizePlan
from .report import REPORT_KEY, ErrorReport
from .rules import GGUF_PLAIN, GGUFTyper, TypeRule, gguf_mixes, is_small

FP8_DTYPES = {"e4m3fn": "F8_E4M3", "e5m2": "F8_E5M2"}


@dataclass
class Request:
    """Everything a target plans from."""

    src: object                     # the input as logical weights (single-file names)
    out: Path
    det: object                     # archs.Detection
    rules: object                   # rules.ArchRules
    layout: str = "comfy"
    type_rules: tuple = ()
    scaled_format: str = "scale_weight"
    double_quant: bool = False
    rest_dtype: str | None = None

    @property
    def comp(self) -> str:
        return self.det.arch.diffusion_component

    @property
    def prefix(self) -> str:
        return self.det.layout.prefixes[self.comp]

    @property
    def model_keys(self) -> list[str]:
        return self.det.component_keys.get(self.comp, [])


@dataclass(frozen=True)
class Target:
    name: str     # as the user typed it, normalised: "fp8-e4m3fn", "nf4", "gguf:Q4_K_M"
    kind: str     # "fp8" | "fp8-scaled" | "bnb4" | "gguf" | "quanto" | "torchao"
    qtype: str    # "F8_E4M3" / "F8_E5M2"; "nf4" / "fp4"; GGUF type or mix name

    output_format = "safetensors"
    #: rules section of formats/quant/*.toml that says which layers stay high
    section = "fp8"

    def step(self, r: Request) -> dict:
        s = {"op": "quantize", "target": self.name}
        if r.rest_dtype:
            s["rest_dtype"] = r.rest_dtype
        return s

    # -- safetensors targets: every tensor of the input, weights quantized, the rest kept ------
    def ops(self, r: Request, report: ErrorReport, path: str) -> dict:
        """The ops this target's items use, for one plan (they hold its error report)."""
        raise NotImplementedError

    def weight_item(self, r: Request, ops: dict, k: str, rel: str, info) -> Item | None:
        """The item of a quantizable weight, or None to keep it (small, kept, other rank)."""
        raise NotImplementedError

    def keep_reason(self, r: Request, rel: str, shape) -> str:
        small = is_small(shape, r.rules)
        if small:
            return f"kept: {small}"
        k = r.rules.kept(self.section, rel)
        if k:
            return f"kept: {r.rules.family} rule /{k}/"
        return "kept: not a quantized layer type"

    def extra_items(self, r: Request, ops: dict) -> list[Item]:
        return []

    def eligible(self, r: Request, rel: str, shape, ndims_key: str, default=(2,)) -> bool:
        """A weight this target quantizes: not small, a ``.weight``, not kept by the rules of
        its section, of a rank the rules allow (``ndims_key``)."""
        sec = getattr(r.rules, self.section)
        return not (is_small(shape, r.rules) or not rel.endswith(".weight")
                    or r.rules.kept(self.section, rel)
                    or len(shape) not in sec.get(ndims_key, list(default)))

    def plan(self, r: Request) -> QuantizePlan:
        report = ErrorReport(self.name)
        path = str(r.src.path)
        ops = self.ops(r, report, path)
        rest = RestOp(report, path)
        plan = QuantizePlan("quantize", [r.src], target=self, detection=r.det, layout=r.layout,
                            reports={"": report},
                            options={"scaled_format": r.scaled_format,
                                     "double_quant": r.double_quant, "rest_dtype": r.rest_dtype,
                                     "type_rules": list(r.type_rules)})
        in_model = set(r.model_keys)
        for n, k in enumerate(r.src.keys()):
            info = r.src.info(k)
            rel = k[len(r.prefix):] if k in in_model else k
            item = None
            if k in in_model and dtypes.is_float(info.dtype):
                item = self.weight_item(r, ops, k, rel, info)
            if item is None:
                tdt = info.dtype
                reason = ""
                if k in in_model and dtypes.is_float(info.dtype):
                    reason = self.keep_reason(r, rel, info.shape)
                if r.rest_dtype and dtypes.is_float(info.dtype):
                    tdt = r.rest_dtype
                item = Item(rest, (Src(0, k),), [Out(k, tdt, info.shape)], info.shape,
                            info.dtype, reason=reason, qtype=tdt)
            item.storage, item.src_bytes = info.storage, info.nbytes
            item.extra["in_model"] = k in in_model
            if isinstance(item.op, (FP8Op, ScaledFP8Op, BNB4Op)):
                item.op.order(item, n)
            plan.items.append(item)
        plan.items += self.extra_items(r, ops)
        meta = output_metadata(r.src, self.step(r),
                               storage={"convkit.quantization": self.name})
        plan.add_file(OutFile("", r.out, "safetensors", meta, reserve=REPORT_KEY,
                              fill=report.summary_text))
        return plan


class FP8Target(Target):
    def ops(self, r, report, path):
        return {"w": FP8Op(self.qtype, report, path)}

    def weight_item(self, r, ops, k, rel, info):
        shape = info.shape
        if not self.eligible(r, rel, shape, "plain_ndims"):
            return None
        return Item(ops["w"], (Src(0, k),), [Out(k, self.qtype, shape)], shape, info.dtype,
                    qtype=self.qtype)


class ScaledFP8Target(Target):
    def step(self, r):
        return {**super().step(r), "scaled_format": r.scaled_format}

    def ops(self, r, report, path):
        return {"w": ScaledFP8Op(self.qtype, report, path)}

    def weight_item(self, r, ops, k, rel, info):
        shape = info.shape
        if not self.eligible(r, rel, shape, "scaled_ndims"):
            return None
        q = self.qtype
        layer = k[: -len("weight")]
        if r.scaled_format == "scale_weight":
            outs = [Out(k, q, shape), Out(layer + "scale_weight", "F32", ())]
        else:
            outs = [Out(k, q, shape), Out(layer + "weight_scale", "F32", ()),
                    Out(layer + "comfy_quant", "U8", (fp8.comfy_quant_blob(q).numel(),))]
        return Item(ops["w"], (Src(0, k),), outs, shape, info.dtype, qtype=q)

    def extra_items(self, r, ops):
        if r.scaled_format != "scale_weight":
            return []
        name = r.prefix + "scaled_fp8"
        return [Item(Const({name: fp8.marker(self.qtype)}), (), [Out(name, self.qtype, (2,))],
                     (2,), "-", reason="ComfyUI scaled-fp8 marker (dtype = weight fp8 type)",
                     qtype=self.qtype, extra={"in_model": True})]

    def plan(self, r):
        p = super().plan(r)
        if r.scaled_format == "comfy_quant":
            p.notes.append("comfy_quant scaled fp8 is for ComfyUI; Forge ignores weight_scale "
                           "and would load these weights unscaled (use --scaled-format "
                           "scale_weight)")
        return p


class BNB4Target(Target):
    section = "nf4"

    def step(self, r):
        return {**super().step(r), "double_quant": r.double_quant}

    def ops(self, r, report, path):
        return {"w": BNB4Op(self.qtype, r.double_quant, report, path)}

    def weight_item(self, r, ops, k, rel, info):
        shape = info.shape
        if not self.eligible(r, rel, shape, "ndims"):
            return None
        dt = nf4.torch_dtype_name(dtypes.to_torch(info.dtype))
        specs = nf4.out_specs(k, shape, dt, self.qtype, r.double_quant)
        return Item(ops["w"], (Src(0, k),), [Out(n, d, s) for n, d, s in specs], shape,
                    info.dtype, qtype=self.qtype, extra={"dtype": dt})


class GGUFTarget(Target):
    output_format = "gguf"

    def step(self, r):
        return {"op": "quantize", "target": self.name, "layout": r.layout}

    def plan(self, r: Request) -> QuantizePlan:
        report = ErrorReport(self.name)
        path = str(r.src.path)
        plan = QuantizePlan("quantize", [r.src], target=self, detection=r.det, layout=r.layout,
                            reports={"": report},
                            options={"type_rules": list(r.type_rules)})
        typer = GGUFTyper(self.qtype, r.rules, r.layout, [TypeRule.parse(t) for t in r.type_rules])
        blocks, floats = GGUFBlocksOp(report, path), GGUFFloatOp(report, path)
        shapes = []
        model = set(r.model_keys)
        for n, k in enumerate(r.src.keys()):
            if k not in model:
                continue
            info = r.src.info(k)
            rel = k[len(r.prefix):]
            name = rel if r.layout == "comfy" else r.rules.sdcpp.get("prefix", "") + rel
            dec = typer.decide(rel, info.shape, info.dtype)
            item = gguf_item(blocks, floats, k, name, info, dec, "")
            item.op.order(item, n)
            plan.items.append(item)
            if dec.orig_shape is not None:
                shapes.append((ORIG_SHAPE_PREFIX + name, GGUFValueType.ARRAY,
                               [int(d) for d in dec.orig_shape], GGUFValueType.INT32))
        if plan.fallbacks:
            plan.notes.append(f"{len(plan.fallbacks)} tensors do not fit their block size and "
                              "use a fallback type (listed as 'fallback:')")
        if r.layout == "sdcpp" and r.rules.sdcpp.get("bundle"):
            from .extras_gguf import bundle_into

            plan.bundled = bundle_into(plan, r.src, r.det, blocks, floats)
            if plan.bundled:
                plan.notes.append("stable-diffusion.cpp layout: " + ", ".join(plan.bundled)
                                  + " are in the same file (sd.cpp detects SD1/SDXL from the "
                                    "text encoders in the model file)")
        others = len(r.src) - len(r.model_keys)
        if others and not plan.bundled:
            plan.notes.append(f"{others} tensors of other components ("
                              + ", ".join(c for c in r.det.component_keys if c != r.comp)
                              + ") are not in the GGUF file (--extras DIR writes them to "
                              "separate files)")
        kvs = gguf_kvs(self.qtype, r.det.arch.gguf_arch if r.layout == "comfy" else None)
        kvs += shapes
        meta = output_metadata(r.src, self.step(r),
                               storage={"convkit.quantization": self.name,
                                        "convkit.layout": r.layout})
        plan.add_file(OutFile("", r.out, "gguf", meta, kvs=kvs, reserve=REPORT_KEY,
                              fill=report.summary_text))
        return plan


class HFTarget(Target):
    """quanto / torchao: a diffusers model folder (:mod:`convkit.quantize.hf_libs`)."""

    output_format = "diffusers"


def _register(name: str, cls, kind: str, qtype: str, help: str) -> None:
    registry.add("quantize", name, cls(name, kind, qtype), help=help)


_register("fp8-e4m3fn", FP8Target, "fp8", "F8_E4M3", "plain fp8 (ComfyUI, Forge)")
_register("fp8-e5m2", FP8Target, "fp8", "F8_E5M2", "plain fp8, wider range")
_register("fp8-scaled", ScaledFP8Target, "fp8-scaled", "F8_E4M3",
          "fp8 with a per-tensor scale (ComfyUI scaled_fp8 / comfy_quant)")
_register("nf4", BNB4Target, "bnb4", "nf4", "bitsandbytes NF4 (Forge layout)")
_register("fp4", BNB4Target, "bnb4", "fp4", "bitsandbytes FP4 (Forge layout)")
for _t in GGUF_PLAIN + tuple(gguf_mixes()):
    _register(f"gguf:{_t}", GGUFTarget, "gguf", _t,
              "GGUF mix (per-layer types)" if _t in gguf_mixes() else f"GGUF {_t}")
for _t in ("quanto:int8", "quanto:int4", "quanto:fp8", "torchao:int8wo", "torchao:int4wo"):
    _register(_t, HFTarget, _t.split(":")[0], _t.split(":")[1],
              "diffusers model folder (" + _t.split(":")[0] + ")")


def normalise(name: str) -> str:
    n = name.strip()
    low = n.lower()
    if low.startswith("gguf:"):
        return "gguf:" + n[5:].upper()
    if low in ("fp8", "float8", "fp8-e4m3"):
        return "fp8-e4m3fn"
    return low


def parse_target(name: str) -> Target:
    """``'gguf:q4_k_m'`` -> Target; unknown names fail with the nearest known one suggested."""
    n = normalise(name)
    try:
        return registry.get("quantize", n)
    except UnknownNameError:
        raise UnknownNameError("quantize target", name, registry.names("quantize")) from None


def names() -> list[str]:
    return registry.names("quantize")


__all__ = ["Target", "Request", "parse_target", "names", "normalise", "UsageError"]
