"""``--extras DIR``: the components a GGUF file does not hold (text encoders, VAE), each written
to its own safetensors file with its prefix removed (the names ComfyUI's CLIP / VAE loaders and
stable-diffusion.cpp's --clip_l / --vae take), optionally cast."""
from __future__ import annotations

from pathlib import Path

from .. import registry
from ..casts import CastContext
from ..plan import Plan, PlanItem, execute, provenance


def plan_extras(src, det, folder: Path, out: Path, rest_dtype: str | None) -> list[Plan]:
    plans = []
    comp_main = det.arch.diffusion_component
    stem = out.name.split(".")[0]
    for comp, keys in det.component_keys.items():
        if comp == comp_main or not keys:
            continue
        items = []
        for k in keys:
            info = src.info(k)
            tdt = rest_dtype if (rest_dtype and info.dtype in ("F32", "F16", "BF16")) else info.dtype
            items.append(PlanItem(k, det.strip(k), info.shape, info.dtype, tdt, comp, "",
                                  info.nbytes, "cast" if tdt != info.dtype else "copy"))
        p = Plan(src, folder / f"{stem}.{comp}.safetensors", items)
        p.metadata[""] = provenance(src, {"op": "extract", "component": comp})
        plans.append(p)
    return plans


def write_extras(plans: list[Plan], overwrite: bool, progress) -> list[str]:
    written = []
    for p in plans:
        ctx = CastContext(on_overflow="clamp")

        def transform(it, t, ctx=ctx):
            if it.dtype == it.src_dtype:
                return t
            return registry.get("cast", it.dtype)(it.key, t, ctx)

        execute(p, transform, overwrite=overwrite, progress=progress)
        written.append(str(p.out))
    return written
