"""``--extras DIR``: the components a GGUF file does not hold (text encoders, VAE), each written
to its own file in DIR.

``--extras-format safetensors`` (default): safetensors with the component prefix removed (the
names ComfyUI's CLIP / VAE loaders and stable-diffusion.cpp's --clip_l / --vae take), optionally
cast (``--rest-dtype``).

``--extras-format gguf``: each component in the GGUF form its loader takes under ``--layout``
(:mod:`convkit.quantize.extras_gguf`, data in ``formats/extras/gguf.toml``); a component no
loader takes as GGUF is written as safetensors, and a note says so.
"""
from __future__ import annotations

from pathlib import Path

from .. import registry
from ..casts import CastContext
from ..plan import Plan, PlanItem, execute, provenance


def _plan_safetensors(src, det, comp: str, keys: list[str], out: Path,
                      rest_dtype: str | None) -> Plan:
    items = []
    for k in keys:
        info = src.info(k)
        tdt = rest_dtype if (rest_dtype and info.dtype in ("F32", "F16", "BF16")) else info.dtype
        items.append(PlanItem(k, det.strip(k), info.shape, info.dtype, tdt, comp, "",
                              info.nbytes, "cast" if tdt != info.dtype else "copy"))
    p = Plan(src, out, items)
    p.metadata[""] = provenance(src, {"op": "extract", "component": comp})
    return p


def plan_extras(src, det, folder: Path, out: Path, rest_dtype: str | None, *,
                fmt: str = "safetensors", layout: str = "comfy",
                qtype: str | None = None, skip=()) -> list:
    """One plan per extra component: :class:`~convkit.plan.Plan` (safetensors) or
    :class:`~convkit.quantize.plan.QPlan` (GGUF). Each plan's ``notes`` say what it is."""
    plans = []
    comp_main = det.arch.diffusion_component
    stem = out.name.split(".")[0]
    for comp, keys in det.component_keys.items():
        if comp == comp_main or comp in skip or not keys:
            continue
        if fmt == "gguf":
            from .extras_gguf import plan_gguf_extra, rule_for

            kind = det.arch.components[comp].keymap
            rule = rule_for(kind, layout).for_arch(det.arch.name)
            if rule.format == "gguf":
                plans.append(plan_gguf_extra(src, det, comp, keys,
                                             folder / f"{stem}.{comp}.gguf", rule, qtype))
                continue
            p = _plan_safetensors(src, det, comp, keys, folder / f"{stem}.{comp}.safetensors",
                                  rest_dtype)
            p.notes.append(f"extras: {comp} ({kind}) -> {p.out.name}: safetensors, not GGUF: "
                           f"{rule.why}")
            plans.append(p)
            continue
        plans.append(_plan_safetensors(src, det, comp, keys,
                                       folder / f"{stem}.{comp}.safetensors", rest_dtype))
    return plans


def write_extras(plans: list, overwrite: bool, progress, verify: bool = True,
                 reports: dict | None = None) -> list[str]:
    """Write every plan (atomically); GGUF ones are reopened and verified like the main output.
    ``reports`` (if given) receives {path: ErrorReport} of the GGUF files."""
    from .plan import QPlan

    written = []
    for p in plans:
        if isinstance(p, QPlan):
            from .run import execute as execute_q

            _, report = execute_q(p, progress=progress, verify=verify)
            if reports is not None:
                reports[str(p.out)] = report
            written.append(str(p.out))
            continue
        ctx = CastContext(on_overflow="clamp")

        def transform(it, t, ctx=ctx):
            if it.dtype == it.src_dtype:
                return t
            return registry.get("cast", it.dtype)(it.key, t, ctx)

        execute(p, transform, overwrite=overwrite, progress=progress)
        written.append(str(p.out))
    return written
