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
from dataclasses import dataclass
from pathlib import Path

from .. import archs, dtypes
from ..errors import UsageError
from ..progress import Progress
from ..sources import open_source
from ..writer import check_output
from ..errors import raise_all
from .inputs import dequantized
from .plan import QPlan, plan_quantize
from .report import ErrorReport
from .run import QStats, execute
from .targets import names as target_names, parse_target

__all__ = ["quantize", "QuantizeResult", "parse_target", "target_names", "plan_quantize"]



@dataclass
class QuantizeResult:
    plan: QPlan
    stats: QStats | None = None
    report: ErrorReport | None = None
    extras: list[str] | None = None
    extras_reports: dict | None = None      # {path: ErrorReport} of GGUF extras

    def to_dict(self) -> dict:
        d = {"output": str(self.plan.out), "target": self.plan.target.name,
             "format": self.plan.fmt, "architecture": self.plan.detection.arch.name,
             "tensors": len(self.plan.items), "types": self.plan.counts(),
             "in_bytes": self.plan.in_bytes, "out_bytes": self.plan.out_bytes,
             "fallbacks": [{"name": i.name, "wanted": i.wanted, "used": i.qtype}
                           for i in self.plan.fallbacks],
             "notes": self.plan.notes, "dry_run": self.stats is None}
        if self.stats:
            d.update({"seconds": round(self.stats.seconds, 3),
                      "bytes_written": self.stats.bytes_written,
                      "verified_tensors": self.stats.verified,
                      "verify_seconds": round(self.stats.verify_seconds, 3)})
        if self.report:
            d["error"] = self.report.summary(10)
        if self.extras:
            d["extras"] = self.extras
        if self.extras_reports:
            d["extras_error"] = {p: r.summary(3) for p, r in self.extras_reports.items()}
        return d


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
        notes = []
        base = raw
        if raw.format == "diffusers":
            from .diffusers_in import SingleFileView

            base = SingleFileView(raw, archs.detect(raw))
            notes.append("input is a diffusers folder: its tensors are mapped to single-file "
                         "names (fused tensors assembled on load)")
        src, note = dequantized(base)
        det = archs.detect(src)
        plan = plan_quantize(src, out, tgt, det, layout=layout, type_rules=list(type_rules),
                             scaled_format=scaled_format, double_quant=double_quant,
                             rest_dtype=rest)
        if note:
            notes.append(note)
        plan.notes[:0] = notes
        problems = check_output(out, raw.files() + [raw.path], overwrite, plan.out_bytes)
        extras_plan = None
        if extras_dir is not None:
            from .extras import plan_extras
            if not dry_run:
                Path(extras_dir).mkdir(parents=True, exist_ok=True)
            extras_plan = plan_extras(src, det, Path(extras_dir), out, rest, fmt=xfmt,
                                      layout=layout, qtype=xtype, skip=plan.bundled)
            if plan.bundled:
                plan.notes.append(f"extras: {', '.join(plan.bundled)} not written to {extras_dir}:"
                                  f" already in {out.name}")
            for p in extras_plan:
                problems += check_output(p.out, raw.files() + [raw.path], overwrite, p.out_bytes)
                plan.notes += p.notes
        raise_all(problems)
        result = QuantizeResult(plan)
        if dry_run:
            return result
        result.stats, result.report = execute(plan, progress=progress, verify=verify)
        if extras_plan:
            from .extras import write_extras
            result.extras_reports = {}
            result.extras = write_extras(extras_plan, overwrite, progress, verify=verify,
                                         reports=result.extras_reports)
        if report_path is not None:
            d = result.to_dict()
            d["error"] = result.report.to_dict()
            Path(report_path).write_text(json.dumps(d, indent=2) + "\n")
        return result
