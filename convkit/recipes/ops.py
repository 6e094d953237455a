"""Recipe operations: every convkit operation a recipe step can name, with its option schema.

Each operation is one small object registered as kind ``operation`` (:mod:`convkit.registry`):
its options (type, default, choices; the registry entry's ``options`` are the defaults), which of
them name inputs (``path``/``paths``: a recipe reference ``@name`` or a file), what it writes (a
file or a folder), how much memory it may need, and ``run``: the library call the CLI command
makes, with the same option names (kebab-case in the CLI, snake_case here; a test keeps the two in
step). Recipes are validated against these schemas before anything runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import registry

GB = 1 << 30
ON_OVERFLOW = ("clamp", "inf", "error")


@dataclass(frozen=True)
class Opt:
    """One option: ``type`` is path (an input), paths, str, strs (a list), int, float, bool,
    choice, or ``registry:KIND`` (a registered name, checked with the nearest suggested)."""

    type: str
    default: Any = None
    choices: tuple = ()
    required: bool = False
    help: str = ""
    normalise: Callable[[str], str] | None = None   # registry names: e.g. gguf:q8_0 -> gguf:Q8_0

    @property
    def is_input(self) -> bool:
        return self.type in ("path", "paths")


@dataclass(frozen=True)
class Operation:
    name: str
    help: str
    options: dict[str, Opt]
    output: str                               # "file" or "folder"
    call: Callable[[dict, Path, bool, Any], Any] = field(repr=False)  # (opts, out, dry_run, progress)
    summarise: Callable[[Any], dict] = field(repr=False, default=lambda r: {})
    base_memory: int = int(1.5 * GB)          # streaming ops: bounded buffers
    input_memory_factor: float = 0.0          # + this x the largest input (renders, SVD)
    cpus: float = 1.0

    def inputs(self) -> list[str]:
        return [k for k, o in self.options.items() if o.is_input]

    def memory(self, input_bytes: list[int]) -> int:
        return int(self.base_memory + self.input_memory_factor * max(input_bytes, default=0))

    def run(self, opts: dict, out: Path, *, dry_run: bool = False, progress=None):
        return self.call(opts, out, dry_run, progress)


def add(op: Operation) -> Operation:
    return registry.add("operation", op.name, op, help=op.help,
                        options={k: o.default for k, o in op.options.items()})


def _size(text):
    if text is None or isinstance(text, int):
        return text
    from ..units import parse_size

    return parse_size(text)


def _sampling_opts() -> dict[str, Opt]:
    """--prediction / --sampler of the commands that write a model (:mod:`convkit.sampling`)."""
    from .. import sampling

    spellings = tuple(sampling.prediction_names()) + tuple(
        sorted(set(sampling.prediction_spellings()) - set(sampling.prediction_names())))
    return {"prediction": Opt("choice", None, spellings,
                              help="record the prediction type (epsilon, v_prediction, sample)"),
            "sampler": Opt("choice", None, sampling.sampler_names(),
                           help="record the sampler the model is meant for (e.g. lcm)")}


def _stated(o):
    from .. import sampling

    return sampling.stated(prediction=o.get("prediction"), sampler=o.get("sampler"))


def planned_bytes(result) -> int | None:
    """What an operation's dry run says it would write (None when it cannot say)."""
    plan = getattr(result, "plan", None)
    n = getattr(plan, "out_bytes", None)
    n = n() if callable(n) else n
    return int(n) if isinstance(n, int) else None


# --- the operations -------------------------------------------------------------------------

def _convert(o, out, dry_run, progress):
    with _stated(o):
        return _convert_run(o, out, dry_run, progress)


def _convert_run(o, out, dry_run, progress):
    from ..convert import convert

    return convert(o["input"], out, o["dtype"], components=o["components"],
                   on_overflow=o["on_overflow"], detect=not o["no_detect"], variant=o["variant"],
                   layout=o["layout"], config_from=o["config_from"],
                   overwrite=True, dry_run=dry_run, progress=progress,
                   **({"max_shard_bytes": _size(o["max_shard_size"])}
                      if o["max_shard_size"] else {}))


def _convert_summary(r) -> dict:
    return {"notes": list(r.plan.notes), "overflows": sum(r.overflows.values())}


add(Operation(
    "convert", "Cast float precision and/or change the layout (convkit convert).",
    {"input": Opt("path", required=True, help="the checkpoint (file or diffusers folder)"),
     "dtype": Opt("registry:cast", "fp16"),
     "components": Opt("str", help="e.g. unet, or unet,te,vae"),
     "on_overflow": Opt("choice", "clamp", ON_OVERFLOW),
     "no_detect": Opt("bool", False),
     "variant": Opt("str"),
     "max_shard_size": Opt("str", help="e.g. 5GB"),
     "layout": Opt("str", help="single-file, diffusers, sgm-unet, ..."),
     "config_from": Opt("path"), **_sampling_opts()},
    "file", _convert, _convert_summary))


def _normalise_target(name: str) -> str:
    from ..quantize.targets import normalise

    return normalise(name)


def _quantize(o, out, dry_run, progress):
    with _stated(o):
        return _quantize_run(o, out, dry_run, progress)


def _quantize_run(o, out, dry_run, progress):
    from ..quantize import quantize

    return quantize(o["input"], out, o["to"], layout=o["layout"], type_rules=o["type_rule"],
                    scaled_format=o["scaled_format"], double_quant=o["double_quant"],
                    rest_dtype=o["rest_dtype"], extras_dir=o["extras"],
                    extras_format=o["extras_format"],
                    extras_type=None if o["extras_type"] == "auto" else o["extras_type"],
                    verify=not o["no_verify"], variant=o["variant"],
                    overwrite=True, dry_run=dry_run, progress=progress)


def _quantize_summary(r) -> dict:
    s = r.report.summary(3)
    return {"target": getattr(getattr(r.plan, "target", None), "name", None),
            "rel_rmse": s.get("rel_rmse"), "max_rel_rmse": s.get("max_rel_rmse"),
            "fallbacks": len(r.plan.fallbacks), "notes": list(r.plan.notes)}


add(Operation(
    "quantize", "Quantize the diffusion model: fp8, fp8-scaled, nf4, gguf:* (convkit quantize).",
    {"input": Opt("path", required=True),
     "to": Opt("registry:quantize", required=True, normalise=_normalise_target),
     "layout": Opt("choice", "comfy", ("comfy", "sdcpp")),
     "type_rule": Opt("strs", (), help="REGEX=TYPE rules (GGUF)"),
     "scaled_format": Opt("choice", "scale_weight", ("scale_weight", "comfy_quant")),
     "double_quant": Opt("bool", False),
     "rest_dtype": Opt("str", "source"),
     "extras": Opt("str", help="folder (inside the output folder) for the other components"),
     "extras_format": Opt("choice", "safetensors", ("safetensors", "gguf")),
     "extras_type": Opt("str", "auto"),
     "no_verify": Opt("bool", False),
     "variant": Opt("str"), **_sampling_opts()},
    "file", _quantize, _quantize_summary))


def _merge(o, out, dry_run, progress):
    with _stated(o):
        return _merge_run(o, out, dry_run, progress)


def _merge_run(o, out, dry_run, progress):
    from ..lora.merge import merge_lora

    return merge_lora(o["base"], list(o["loras"]), out, dtype=o["dtype"],
                      allow_unmatched=o["allow_unmatched"], on_overflow=o["on_overflow"],
                      overwrite=True, dry_run=dry_run, progress=progress)


def _merge_summary(r) -> dict:
    return {"loras": [{"lora": Path(x.path).name, "weight": x.weight, "modules": x.modules,
                       "unmatched": len(x.unmatched)} for x in r.loras],
            "notes": list(r.notes)}


add(Operation(
    "merge-lora", "Merge LoRA files into a base (convkit merge-lora).",
    {"base": Opt("path", required=True),
     "loras": Opt("paths", required=True, help="@lora or @lora:WEIGHT"),
     "dtype": Opt("registry:cast"),
     "allow_unmatched": Opt("bool", False),
     "on_overflow": Opt("choice", "clamp", ON_OVERFLOW), **_sampling_opts()},
    "file", _merge, _merge_summary))


def _extract(o, out, dry_run, progress):
    from ..lora.extract import extract_lora

    comps = None
    if o["components"]:
        from .. import archs
        from ..sources import open_source

        with open_source(o["base"]) as s:
            det = archs.detect(s)
            comps = archs.select_components(det.arch, o["components"], det.component_keys)
    return extract_lora(o["tuned"], o["base"], out, rank=o["rank"], conv_rank=o["conv_rank"],
                        dynamic=o["dynamic"], clamp_quantile=o["clamp_quantile"],
                        min_diff=o["min_diff"], fmt=o["format"], dtype=o["dtype"],
                        components=comps, svd=o["svd"], overwrite=True, dry_run=dry_run,
                        progress=progress)


def _extract_summary(r) -> dict:
    return {"modules": r.modules, "rank": getattr(r, "rank", None),
            "total_error": r.total_error}


add(Operation(
    "extract-lora", "Extract a LoRA of tuned - base by SVD (convkit extract-lora).",
    {"tuned": Opt("path", required=True), "base": Opt("path", required=True),
     "rank": Opt("int", 32), "conv_rank": Opt("int"), "dynamic": Opt("str"),
     "clamp_quantile": Opt("float"), "min_diff": Opt("float", 1e-5),
     "format": Opt("registry:lora-format", "kohya"), "dtype": Opt("registry:cast", "fp16"),
     "components": Opt("str"), "svd": Opt("choice", "auto", ("auto", "lowrank", "full"))},
    "file", _extract, _extract_summary, base_memory=2 * GB, input_memory_factor=0.1))


def _convert_lora(o, out, dry_run, progress):
    from ..lora.convert import convert_lora

    return convert_lora(o["input"], out, o["format"], arch=o["arch"], base=o["base"],
                        dtype=o["dtype"], overwrite=True, dry_run=dry_run, progress=progress)


add(Operation(
    "convert-lora", "Rewrite a LoRA in another format (convkit convert-lora).",
    {"input": Opt("path", required=True), "format": Opt("registry:lora-format", required=True),
     "arch": Opt("str"), "base": Opt("path"), "dtype": Opt("registry:cast")},
    "file", _convert_lora, lambda r: {"modules": r.modules, "format": r.format},
    base_memory=GB))


def _split(o, out, dry_run, progress):
    with _stated(o):
        return _split_run(o, out, dry_run, progress)


def _split_run(o, out, dry_run, progress):
    from ..layouts.split import LoraPart, split

    parts = o["parts"]
    part_list = [p.strip() for p in parts.split(",") if p.strip()] if parts else None
    lora = LoraPart(o["base"], o["rank"], o["lora_format"]) if o["base"] else None
    return split(o["checkpoint"], out, o["for"], parts=part_list, name=o["name"],
                 dtype=tuple(o["dtype"]), to=tuple(o["to"]), lora=lora,
                 on_overflow=o["on_overflow"], config_from=o["config_from"], overwrite=True,
                 dry_run=dry_run, progress=progress)


def _layout_summary(r) -> dict:
    return {"files": len(r.plan.files), "notes": list(r.plan.notes)}


add(Operation(
    "split", "Split a checkpoint into parts for a tool's folders (convkit split).",
    {"checkpoint": Opt("path", required=True),
     "for": Opt("registry:layout-target", "comfyui"),
     "parts": Opt("str", help="unet,clip_l,clip_g,t5,vae,lora"),
     "name": Opt("str"), "dtype": Opt("strs", ()), "to": Opt("strs", ()),
     "base": Opt("path"), "rank": Opt("int", 64), "lora_format": Opt("registry:lora-format"),
     "config_from": Opt("path"), "on_overflow": Opt("choice", "clamp", ON_OVERFLOW),
     **_sampling_opts()},
    "folder", _split, _layout_summary))


def _assemble(o, out, dry_run, progress):
    with _stated(o):
        return _assemble_run(o, out, dry_run, progress)


def _assemble_run(o, out, dry_run, progress):
    from ..layouts.assemble import assemble

    layout = o["layout"]
    if o["for"]:
        from ..layouts.targets import get

        layout = "diffusers" if get(o["for"]).diffusers_folder else "single-file"
    parts = {p: [o[p]] if o[p] else [] for p in ("unet", "clip_l", "clip_g", "t5", "vae")}
    return assemble(parts, out, layout=layout, dtype=o["dtype"], on_overflow=o["on_overflow"],
                    config_from=o["config_from"], overwrite=True, dry_run=dry_run,
                    progress=progress)


add(Operation(
    "assemble", "Assemble one model from parts (convkit assemble).",
    {"unet": Opt("path", required=True), "clip_l": Opt("path"), "clip_g": Opt("path"),
     "t5": Opt("path"), "vae": Opt("path"), "layout": Opt("str"),
     "for": Opt("registry:layout-target"), "dtype": Opt("registry:cast"),
     "config_from": Opt("path"), "on_overflow": Opt("choice", "clamp", ON_OVERFLOW),
     **_sampling_opts()},
    "file", _assemble, _layout_summary))


def _verify(o, out, dry_run, progress):
    from ..verify import verify
    from ..writer import FolderStage

    kw = dict(base=o["base"], prompts=o["prompts"], steps=o["steps"], size=o["size"],
              sampler=o["sampler"], guidance=o["guidance"], prediction=o["prediction"],
              reference_steps=o["reference_steps"], reference_sampler=o["reference_sampler"],
              reference_guidance=o["reference_guidance"], gate=tuple(o["gate"]),
              must_differ_from=o["must_differ_from"], config_from=o["config_from"],
              device=o["device"], lpips_weights=tuple(o["lpips_weights"]), progress=progress)
    if dry_run:
        return verify(list(o["artifacts"]), o["reference"], dry_run=True, **kw)
    # the report folder appears whole or not at all, like every other artifact
    with FolderStage(out, overwrite=True) as tmp:
        r = verify(list(o["artifacts"]), o["reference"], report_dir=tmp, **kw)
    return r


def _verify_summary(r) -> dict:
    arts = []
    for a in r.artifacts:
        arts.append({"path": str(a.ref.path), "name": a.ref.name, "kind": a.kind, "ok": a.ok,
                     "psnr": _finite(a.mean.get("psnr")), "ssim": _finite(a.mean.get("ssim")),
                     "failure": a.first_failure()})
    return {"ok": r.ok, "artifacts": arts, "failure": None if r.ok else r.failure_message(),
            "reference_settings": r.reference.settings.to_dict(),
            "settings": r.artifacts[0].run.settings.to_dict() if r.artifacts else {},
            "contact_sheet": r.contact_sheet.name if r.contact_sheet else None}


def _finite(v):
    import math

    if v is None:
        return None
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


add(Operation(
    "verify", "Render artifacts against a reference and gate them (convkit verify).",
    {"artifacts": Opt("paths", required=True), "reference": Opt("path", required=True),
     "base": Opt("path"), "config_from": Opt("path"), "prompts": Opt("str"),
     "steps": Opt("int"), "size": Opt("str"), "sampler": Opt("str"), "guidance": Opt("float"),
     "prediction": Opt("str"), "reference_steps": Opt("int"),
     "reference_sampler": Opt("str"), "reference_guidance": Opt("float"),
     "gate": Opt("strs", ()), "must_differ_from": Opt("path"),
     "lpips_weights": Opt("paths", ()), "device": Opt("str", "cpu")},
    "folder", _verify, _verify_summary, base_memory=GB, input_memory_factor=3.0))


def get(name: str) -> Operation:
    return registry.get("operation", name)


def input_bytes(path: str) -> int:
    p = Path(path.rsplit(":", 1)[0] if not os.path.exists(path) and ":" in path else path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return 0
