"""``convkit inspect``: what a checkpoint is and holds, from headers (plus an optional value scan)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from . import archs
from .errors import UnknownArchitectureError
from .progress import Progress
from .sources import open_source

MAX_LISTED = 20


def inspect(path: str | os.PathLike, *, scan: bool = False, variant: str | None = None,
            progress: Progress | None = None) -> dict:
    """A JSON-able description: architecture, layout, components, dtypes, bytes, oddities."""
    progress = progress or Progress(enabled=False)
    from .quantize.inputs import dequantized

    with open_source(path, variant=variant) as raw:
        # quantized files (NF4, scaled fp8, GGUF) are described by their logical weights
        src, quant_note = dequantized(raw)
        report: dict = {"path": str(Path(path)), "format": src.format,
                        "file_bytes": sum(f.stat().st_size for f in raw.files()),
                        "tensors": len(src), "tensor_bytes": src.total_bytes,
                        "params": sum(i.numel for i in src.infos()),
                        "metadata": dict(src.metadata), "odd": []}
        if quant_note:
            report["quantization"] = quant_note.split(":")[0].replace("input is ", "")
        odd = report["odd"]
        try:
            det = archs.detect(src)
        except UnknownArchitectureError as e:
            det = None
            report.update(architecture=None, layout=None)
            odd.append(e.detail)
        groups: dict[str, list[str]] = det.component_keys if det else {"(all)": src.keys()}
        if det:
            report.update(architecture=det.arch.name, architecture_title=det.arch.title,
                          layout=det.layout.name, layout_title=det.layout.title)
            if det.unexpected:
                report["unexpected_keys"] = {"count": len(det.unexpected),
                                             "first": det.unexpected[:MAX_LISTED]}
                odd.append(f"{len(det.unexpected)} keys outside the known components "
                           f"(first: {det.unexpected[0]})")
            missing = [c for c in det.arch.components if c not in det.component_keys]
            if missing and det.layout.prefixes.keys() - {det.arch.diffusion_component}:
                report["missing_components"] = [c for c in missing if c in det.layout.prefixes]
        comps = {}
        for comp, keys in groups.items():
            infos = [src.info(k) for k in keys]
            kinds = Counter(i.stored_as for i in infos)
            spec = det.arch.components.get(comp) if det else None
            params = sum(i.numel for i in infos if not (spec and spec.is_buffer(i.name)))
            entry = {"tensors": len(infos), "params": params,
                     "bytes": sum(i.nbytes for i in infos), "dtypes": dict(kinds)}
            if spec is not None:
                expected = spec.params
                entry["full_size_params"] = expected
                entry["full_size"] = expected == params if expected else None
            float_kinds = {k for k in kinds if k not in ("I64", "I32", "I16", "I8", "U8", "BOOL")}
            if len(float_kinds) > 1 and not quant_note:  # mixed is normal when quantized
                odd.append(f"{comp}: mixed dtypes {', '.join(f'{k}×{n}' for k, n in kinds.items())}")
            comps[comp] = entry
        report["components"] = comps
        if scan:
            report["scan"] = _scan(src, progress)
            for name, s in report["scan"]["bad"].items():
                odd.append(f"{name}: {s['nan']} NaN, {s['inf']} Inf")
        return report


def _scan(src, progress: Progress) -> dict:
    """Load every tensor once and count NaN/Inf (one tensor in memory at a time)."""
    bad = {}
    with progress.bar(total=src.total_bytes, desc="scan") as bar:
        for info in src.infos():
            t = src.load(info.name)
            if t.is_floating_point():
                t32 = t if t.dtype in (torch.float32, torch.float64) else t.float()
                nan = int(torch.isnan(t32).sum())
                inf = int(torch.isinf(t32).sum())
                if nan or inf:
                    bad[info.name] = {"nan": nan, "inf": inf}
            bar.update(info.nbytes)
    return {"tensors_scanned": len(src), "bad": bad}


def format_report(r: dict) -> str:
    lines = [f"{r['path']}  ({r['format']}, {r['file_bytes']:,d} bytes)"]
    if r.get("architecture"):
        lines.append(f"architecture: {r['architecture']} — {r.get('architecture_title', '')}")
        lines.append(f"layout:       {r['layout']} — {r.get('layout_title', '')}")
    else:
        lines.append("architecture: not recognised")
    lines.append(f"tensors:      {r['tensors']:,d}   params: {r['params']:,d}   "
                 f"tensor bytes: {r['tensor_bytes']:,d}")
    lines.append("components:")
    for name, c in r["components"].items():
        dts = ", ".join(f"{k}×{n}" for k, n in c["dtypes"].items())
        full = ""
        if c.get("full_size_params"):
            full = ("  (full size)" if c["full_size"] else
                    f"  (released model has {c['full_size_params']:,d})")
        lines.append(f"  {name:<16} {c['tensors']:>6,d} tensors {c['params']:>15,d} params "
                     f"{c['bytes']:>16,d} B  {dts}{full}")
    if r.get("quantization"):
        lines.append(f"quantized:    {r['quantization']}")
    if r.get("missing_components"):
        lines.append(f"absent:       {', '.join(r['missing_components'])}")
    if r["metadata"]:
        lines.append("metadata:")
        for k, v in list(r["metadata"].items())[:MAX_LISTED]:
            v = str(v)
            lines.append(f"  {k}: {v if len(v) <= 100 else v[:97] + '...'}")
    if "scan" in r:
        lines.append(f"scan: {r['scan']['tensors_scanned']} tensors, "
                     f"{len(r['scan']['bad'])} with NaN/Inf")
    for o in r["odd"]:
        lines.append(f"odd: {o}")
    return "\n".join(lines)
