"""``convkit quantize``: FP8 (plain / ComfyUI scaled), bitsandbytes NF4/FP4 (Forge layout) and
GGUF (ComfyUI-GGUF or stable-diffusion.cpp layout, legacy and K-quants), streaming on CPU.

Library API::

    from convkit.quantize import quantize
    res = quantize("sdxl.safetensors", "sdxl-Q4_K_S.gguf", "gguf:Q4_K_S")
    res.report.summary()      # per-type relative RMSE, worst tensors
    res.plan.fallbacks        # tensors whose rows did not fit the block size

:func:`plan_for` builds the plan without writing (``--dry-run``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .. import archs, dtypes
from ..engine import execute
from ..errors import UsageError
from ..progress import Progress
from ..sources import open_source
from .plan import LAYOUTS, SCALED_FORMATS, QuantizePlan
from .result import QuantizeResult
from .rules import rules_for
from .targets import Request, names as target_names, parse_target

__all__ = ["quantize", "QuantizeResult", "parse_target", "target_names", "plan_quantize"]


def _logical_input(raw_view, notes: list[str]):
    """The input with single-file names (a diffusers folder or a diffusers-named model file is
    mapped through the key map, fused tensors assembled on load), and its detection."""
    src = raw_view
    det = archs.detect(raw_view)
    if raw_view.format == "diffusers" or det.layout.naming == "diffusers":
        from .diffusers_in import SingleFileView

        src = SingleFileView(raw_view, det)
        what = "a diffusers folder" if raw_view.format == "diffusers" else \
            f"in diffusers names ({det.layout.name})"
        notes.append(f"input is {what}: its tensors are mapped to single-file "
                     "names (fused tensors assembled on load)")
    what = raw_view.describe_encoding()
    if what:
        notes.append(f"input is already quantized ({what}): dequantized to float32 first, so "
                     "this quantization adds to the error already in it")
    return src, archs.detect(src)


def plan_quantize(src, out: Path, target, det, *, layout: str = "comfy", type_rules=(),
                  scaled_format: str = "scale_weight", double_quant: bool = False,
                  rest_dtype: str | None = None) -> QuantizePlan:
    """The plan of quantizing ``src`` (logical weights, single-file names) to ``target``."""
    if isinstance(target, str):
        target = parse_target(target)
    rules = rules_for(det.arch.name)
    comp = det.arch.diffusion_component
    if not det.component_keys.get(comp):
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
    return target.plan(Request(src, Path(out), det, rules, layout, tuple(type_rules),
                               scaled_format, double_quant, rest_dtype))


def quantize(input: str | os.PathLike, output: str | os.PathLike, target: str, *,
             layout: str = "comfy", type_rules=(), scaled_format: str = "scale_weight",
             double_quant: bool = False, rest_dtype: str | None = None,
             extras_dir: str | os.PathLike | None = None, extras_format: str = "safetensors",
             extras_type: str | None = None, report_path: str | os.PathLike | None = None,
             overwrite: bool = False, dry_run: bool = False, verify: bool = True,
             variant: str | None = None, progress: Progress | None = None) -> QuantizeResult:
    """Quantize ``input``'s diffusion model to ``target``, writing ``output``."""
    tgt = parse_target(target)
    if tgt.kind in ("quanto", "torchao"):   # a diffusers model folder: convkit/quantize/hf_libs.py
        from .hf_libs import check_options, quantize_hf

        check_options(layout=layout, type_rules=type_rules, scaled_format=scaled_format,
                      double_quant=double_quant, extras_dir=extras_dir,
                      extras_format=extras_format, extras_type=extras_type)
        return quantize_hf(input, output, tgt, rest_dtype=rest_dtype, report_path=report_path,
                           overwrite=overwrite, dry_run=dry_run, verify=verify, variant=variant,
                           progress=progress)
    rest = dtypes.parse_user(rest_dtype) if rest_dtype and rest_dtype != "source" else None
    if rest and rest not in ("F32", "F16", "BF16"):
        raise UsageError(f"--rest-dtype must be fp32, fp16, bf16 or source, not '{rest_dtype}'")
    from .extras_gguf import parse_extras_format, parse_extras_type
    xfmt, xtype = parse_extras_format(extras_format), parse_extras_type(extras_type)
    if extras_dir is None and (xfmt != "safetensors" or xtype):
        raise UsageError("--extras-format / --extras-type need --extras DIR")
    if xtype and xfmt != "gguf":
        raise UsageError("--extras-type applies to --extras-format gguf only")
    out = Path(output)
    with open_source(input, variant=variant) as raw:
        notes: list[str] = []
        src, det = _logical_input(raw, notes)
        plan = plan_quantize(src, out, tgt, det, layout=layout, type_rules=list(type_rules),
                             scaled_format=scaled_format, double_quant=double_quant,
                             rest_dtype=rest)
        plan.notes[:0] = notes
        plan.verify = verify
        if extras_dir is not None:
            from .extras import add_extras

            if not dry_run:
                Path(extras_dir).mkdir(parents=True, exist_ok=True)
            add_extras(plan, src, det, Path(extras_dir), out, rest, fmt=xfmt, layout=layout,
                       qtype=xtype, skip=plan.bundled)
            if plan.bundled:
                plan.notes.append(f"extras: {', '.join(plan.bundled)} not written to {extras_dir}:"
                                  f" already in {out.name}")
        plan.check(overwrite)
        result = QuantizeResult(plan)
        if dry_run:
            return result
        result.stats = execute(plan, progress=progress, overwrite=overwrite)
        result.report = plan.report
        if plan.extras:
            result.extras = [str(plan.files[f].path) for f in plan.extras]
            result.extras_reports = {str(plan.files[f].path): plan.reports[f]
                                     for f in plan.extras if f in plan.reports}
        if report_path is not None:
            d = result.to_dict()
            d["error"] = result.report.to_dict()
            Path(report_path).write_text(json.dumps(d, indent=2) + "\n")
        return result
