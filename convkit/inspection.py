"""``convkit inspect``: what a checkpoint is and holds, from headers (plus an optional value scan).

Two views of every input: its logical weights (what the model is: architecture, components,
parameters, logical dtypes - the view every command reads) and how they are stored (fp8 with
scales, NF4, GGUF block types, quanto/torchao, auxiliary tensors). A LoRA file is described as
a LoRA (format, target architecture, modules per component, ranks and alphas, coverage).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from . import archs
from .errors import UnknownArchitectureError
from .layouts import parts
from .progress import Progress
from .sources import open_source

MAX_LISTED = 20
_INTS = ("I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64")


def inspect(path: str | os.PathLike, *, scan: bool = False, variant: str | None = None,
            progress: Progress | None = None) -> dict:
    """A JSON-able description: architecture, layout, components, dtypes, storage, oddities."""
    progress = progress or Progress(enabled=False)
    with open_source(path, variant=variant) as src:
        raw = src.raw
        report: dict = {"path": str(Path(path)), "format": src.format,
                        "file_bytes": sum(f.stat().st_size for f in src.files()),
                        "tensors": len(src), "stored_tensors": len(raw),
                        "tensor_bytes": src.total_bytes,
                        "params": sum(i.numel for i in src.infos()),
                        "metadata": dict(src.metadata), "odd": []}
        enc = src.describe_encoding()
        if enc:
            report["quantization"] = enc
        report["storage"] = dict(src.encodings())
        report["aux_tensors"] = len(raw) - len(src)
        odd = report["odd"]
        part = None
        try:
            det = archs.detect(src)
            part = parts.from_detection(src, det)
        except UnknownArchitectureError as e:
            det = None
            report.update(architecture=None, layout=None)
            # a lone text encoder or VAE has no diffusion model to detect an architecture by
            part = parts.match_rules(src)
            from .lora.summary import summarize

            lora = summarize(path) if part is None and src.format != "diffusers" else None
            if lora is not None:
                report["lora"] = lora
            elif part is None:
                odd.append(e.detail)
        groups: dict[str, list[str]] = det.component_keys if det else {"(all)": src.keys()}
        specs = {c: det.arch.components.get(c) for c in groups} if det else {}
        if part is not None:
            report["part"] = _part_entry(part)
            if det is None:
                group, spec = _part_group(part)
                groups, specs = {group: src.keys()}, {group: spec}
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
            logical = Counter(i.dtype for i in infos)
            stored = Counter(i.stored_as for i in infos)
            spec = specs.get(comp)
            params = sum(i.numel for i in infos if not (spec and spec.is_buffer(i.name)))
            entry = {"tensors": len(infos), "params": params,
                     "bytes": sum(i.nbytes for i in infos), "dtypes": dict(logical),
                     "stored": dict(stored)}
            if spec is not None:
                expected = spec.params
                entry["full_size_params"] = expected
                entry["full_size"] = expected == params if expected else None
            float_kinds = {k for k in stored if k not in _INTS}
            if len(float_kinds) > 1 and not enc:  # mixed is normal when quantized
                odd.append(f"{comp}: mixed dtypes {', '.join(f'{k}×{n}' for k, n in stored.items())}")
            comps[comp] = entry
        report["components"] = comps
        if scan:
            report["scan"] = _scan(src, progress)
            for name, s in report["scan"]["bad"].items():
                odd.append(f"{name}: {s['nan']} NaN, {s['inf']} Inf")
        return report


def _part_entry(part: parts.PartMatch) -> dict:
    entry = {"kind": part.kind, "naming": part.naming, "prefix": part.prefix,
             "title": part.title, "fits": part.fits}
    if part.note:
        entry["note"] = part.note
    return entry


def _part_group(part: parts.PartMatch) -> tuple[str, archs.Component | None]:
    """The components-table row of a lone part: named after the component it fits (the kind
    when its fits name different components), with that component's buffers and released size
    when every fit agrees on them."""
    specs = [archs.get(a).components[c] for a, c in part.archs]
    names = {s.name for s in specs}
    name = names.pop() if len(names) == 1 else part.kind
    same = specs and all((s.params, s.buffers) == (specs[0].params, specs[0].buffers) for s in specs)
    return name, (specs[0] if same else None)


def _scan(src, progress: Progress) -> dict:
    """Load every logical tensor once (decoded) and count NaN/Inf."""
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


def _format_part(p: dict) -> list[str]:
    prefix = f", prefix '{p['prefix']}'" if p["prefix"] else ", no prefix"
    lines = [f"part:         {parts.label(p['kind'], p['title'])}{prefix}",
             f"fits:         {', '.join(p['fits']) or 'no known architecture'}"]
    if p.get("note"):
        lines.append(f"note:         {p['note']}")
    return lines


def format_report(r: dict) -> str:
    lines = [f"{r['path']}  ({r['format']}, {r['file_bytes']:,d} bytes)"]
    if r.get("lora"):
        from .lora.summary import format_summary

        lines += format_summary(r["lora"])
        return "\n".join(lines + [f"odd: {o}" for o in r["odd"]])
    if r.get("architecture"):
        lines.append(f"architecture: {r['architecture']} — {r.get('architecture_title', '')}")
        lines.append(f"layout:       {r['layout']} — {r.get('layout_title', '')}")
    elif not r.get("part"):
        lines.append("architecture: not recognised")
    if r.get("part"):
        lines += _format_part(r["part"])
    lines.append(f"tensors:      {r['tensors']:,d} logical   params: {r['params']:,d}   "
                 f"stored bytes: {r['tensor_bytes']:,d}")
    if r.get("quantization"):
        lines.append(f"stored as:    {r['quantization']}; {r['aux_tensors']:,d} auxiliary "
                     f"tensors (scales, quant states) in {r['stored_tensors']:,d} stored")
    lines.append("components:   (logical dtypes; how stored, when different)")
    for name, c in r["components"].items():
        dts = ", ".join(f"{k}×{n}" for k, n in c["dtypes"].items())
        if c["stored"] != c["dtypes"]:
            dts += "  stored " + ", ".join(f"{k}×{n}" for k, n in c["stored"].items())
        full = ""
        if c.get("full_size_params"):
            full = ("  (full size)" if c["full_size"] else
                    f"  (released model has {c['full_size_params']:,d})")
        lines.append(f"  {name:<16} {c['tensors']:>6,d} tensors {c['params']:>15,d} params "
                     f"{c['bytes']:>16,d} B  {dts}{full}")
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
