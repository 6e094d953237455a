"""``--extras DIR``: the components a GGUF file does not hold (text encoders, VAE), each as one
more output file of the same plan, in DIR.

``--extras-format safetensors`` (default): safetensors with the component prefix removed (the
names ComfyUI's CLIP / VAE loaders and stable-diffusion.cpp's --clip_l / --vae take), optionally
cast (``--rest-dtype``).

``--extras-format gguf``: each component in the GGUF form its loader takes under ``--layout``
(:mod:`convkit.quantize.extras_gguf`, data in ``formats/extras/gguf.toml``); a component no
loader takes as GGUF is written as safetensors, and a note says so.
"""
from __future__ import annotations

from pathlib import Path

from ..engine import Item, Out, OutFile, Src
from ..provenance import output_metadata
from .ops import RestOp


def _add_safetensors(plan, src, det, comp: str, keys: list[str], out: Path,
                     rest_dtype: str | None) -> None:
    fid = f"extras:{comp}"
    op = RestOp(plan.report, str(src.path))
    for k in keys:
        info = src.info(k)
        tdt = rest_dtype if (rest_dtype and info.dtype in ("F32", "F16", "BF16")) else info.dtype
        plan.items.append(Item(op, (Src(0, k),), [Out(det.strip(k), tdt, info.shape, fid)],
                               info.shape, info.dtype, info.storage, info.nbytes, comp,
                               qtype=tdt))
    meta = output_metadata(src, {"op": "extract", "component": comp})
    plan.add_file(OutFile(fid, out, "safetensors", meta))
    plan.extras.append(fid)


def add_extras(plan, src, det, folder: Path, out: Path, rest_dtype: str | None, *,
               fmt: str = "safetensors", layout: str = "comfy", qtype: str | None = None,
               skip=()) -> None:
    """Add one output file per extra component to ``plan``; notes say what each one is."""
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
                plan_gguf_extra(plan, src, det, comp, keys, folder / f"{stem}.{comp}.gguf", rule,
                                qtype)
                continue
            path = folder / f"{stem}.{comp}.safetensors"
            _add_safetensors(plan, src, det, comp, keys, path, rest_dtype)
            plan.notes.append(f"extras: {comp} ({kind}) -> {path.name}: safetensors, not GGUF: "
                              f"{rule.why}")
            continue
        _add_safetensors(plan, src, det, comp, keys, folder / f"{stem}.{comp}.safetensors",
                         rest_dtype)
