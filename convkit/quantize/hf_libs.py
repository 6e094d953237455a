"""``quanto:int8|int4|fp8`` and ``torchao:int8wo``: a diffusers model folder of the diffusion
model (``UNet2DConditionModel`` / ``FluxTransformer2DModel``) that diffusers reloads with
``from_pretrained`` as quantized modules, written the way diffusers' ``save_pretrained`` writes
a model loaded with ``QuantoConfig`` / ``TorchAoConfig``: ``config.json`` with its
``quantization_config``, ``diffusion_pytorch_model.safetensors`` (sharded at 10 GB like
diffusers, with the same index) holding the library's tensors (quanto ``weight._data`` /
``weight._scale`` / ``weight._shift`` / ``input_scale`` / ``output_scale``; torchao
``_weight_qdata`` / ``_weight_scale`` / ``_weight_zero_point`` plus its JSON metadata).

Plan, then stream: the layout is computed on a meta-device model; then one source tensor at a
time is read, cast to the model dtype (diffusers' ``torch_dtype``), quantized by the library
(:mod:`.hf_backends`), measured and written. ``torchao:int4wo`` is refused up front (no CPU
kernel in torchao), as is a target whose library is not installed.
"""
from __future__ import annotations

import json
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import archs, dtypes
from ..errors import Interrupted, OutputError, TensorValueError, UsageError, raise_all
from ..plan import provenance
from ..progress import Progress
from ..sources import open_source
from ..writer import FolderStage, OutSpec, check_output
from . import hf_backends, hf_model
from .plan import PLACEHOLDER, QItem, QOut, QPlan
from .report import REPORT_KEY, ErrorReport, measure
from .run import QStats, _ReportingWriter
from .stream import crc_ranges

WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"     # diffusers SAFETENSORS_WEIGHTS_NAME
INDEX = "diffusion_pytorch_model.safetensors.index.json"    # diffusers SAFE_WEIGHTS_INDEX_NAME
MAX_SHARD = "10GB"                                          # save_pretrained's default


@dataclass
class HFPlan(QPlan):
    model: hf_model.ModelInput | None = None
    dtype: str = "F32"                                   # the model dtype (torch_dtype)
    files: dict[str, list[str]] = field(default_factory=dict)    # shard -> output keys
    outs: dict[str, QOut] = field(default_factory=dict)          # output key -> spec
    extra_files: dict[str, bytes] = field(default_factory=dict)  # config.json, index
    backend: object = field(default=None, repr=False)

    @property
    def fmt(self) -> str:
        return "diffusers"

    @property
    def out_bytes(self) -> int:
        return sum(i.out_bytes for i in self.items) + sum(len(b) for b in self.extra_files.values())

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update({"model_class": self.model.cls_name, "config_from": self.model.config_from,
                  "torch_dtype": self.dtype, "files": {f: len(k) for f, k in self.files.items()},
                  "extra_files": sorted(self.extra_files)})
        return d

    def format(self, limit: int | None = None) -> str:
        head = (f"diffusers folder: {self.model.cls_name} (config: {self.model.config_from}), "
                f"torch_dtype {self.dtype}; files: " + ", ".join(
                    [f"{f} ({len(k)} tensors)" for f, k in self.files.items()]
                    + sorted(self.extra_files)))
        return head + "\n" + super().format(limit)


def quantize_hf(input, output, tgt, *, rest_dtype=None, config=None, max_shard_size=MAX_SHARD,
                report_path=None, overwrite=False, dry_run=False, verify=True, variant=None,
                progress: Progress | None = None):
    """Write ``output`` (a folder) as diffusers' ``save_pretrained`` does for the diffusion model
    of ``input`` loaded with the target's quantization config and ``torch_dtype`` = ``rest_dtype``
    (default: the source's float type). ``config``: a diffusers config dict / config.json / folder
    for a single file of a size convkit has no config for. ``max_shard_size`` as in
    ``save_pretrained``. Returns a :class:`~convkit.quantize.QuantizeResult`."""
    from . import QuantizeResult

    hf_backends.check(tgt.name)
    rest = dtypes.parse_user(rest_dtype) if rest_dtype and rest_dtype != "source" else None
    if rest and rest not in ("F32", "F16", "BF16"):
        raise UsageError(f"--rest-dtype must be fp32, fp16, bf16 or source, not '{rest_dtype}'")
    out = Path(output)
    if out.suffix.lower() in (".safetensors", ".gguf", ".ckpt", ".pt", ".bin"):
        raise UsageError(f"target '{tgt.name}' writes a diffusers model folder, not a "
                         f"{out.suffix} file", path=out, hint="give a folder name as OUTPUT")
    with open_source(input, variant=variant) as raw:
        notes = []
        src = raw
        hf_model.refuse_prequantized(raw)
        if raw.format != "diffusers":
            from .inputs import dequantized

            src, note = dequantized(raw)
            if note:
                notes.append(note)
                if rest is None:   # not the dequantized float32: what such models run in
                    rest = "BF16"
                    notes.append("torch_dtype bf16 for the dequantized input (--rest-dtype "
                                 "chooses another)")
        det = archs.detect(src)
        plan = plan_hf(src, raw, out, tgt, det, rest, config, max_shard_size)
        plan.notes[:0] = notes
        raise_all(check_output(out, raw.files() + [raw.path], overwrite, plan.out_bytes,
                               is_dir=True))
        result = QuantizeResult(plan)
        if dry_run:
            return result
        result.stats, result.report = execute_hf(plan, overwrite=overwrite, progress=progress,
                                                 verify=verify)
    if report_path is not None:
        d = result.to_dict()
        d["error"] = result.report.to_dict()
        Path(report_path).write_text(json.dumps(d, indent=2) + "\n")
    return result


def plan_hf(src, raw, out: Path, tgt, det, rest: str | None, config=None,
            max_shard_size=MAX_SHARD) -> HFPlan:
    model = hf_model.resolve(src, det, raw, config)
    dt = hf_model.model_dtype(model.tensors, rest)
    tdt = dtypes.to_torch(dt)
    be = hf_backends.backend(tgt.name)
    layout, qmeta, weights = be.layout(model.meta, tdt)
    plan = HFPlan(src, out, tgt, [], det, model=model, dtype=dt, backend=be)
    for t in model.tensors:
        keys = weights.get(t.name, [t.name])
        outs = [QOut(k, dtypes.from_torch(layout[k].dtype), tuple(layout[k].shape)) for k in keys]
        if t.name in weights:
            method, qtype = be.lib, be.label
        else:
            method = "cast" if outs[0].dtype != t.dtype else "copy"
            qtype = outs[0].dtype
        plan.items.append(QItem(t.key, t.name, t.shape, t.dtype, method, qtype, outs,
                                src_bytes=t.src_bytes, in_model=True))
        plan.outs.update({o.key: o for o in outs})
    if set(plan.outs) != set(layout):
        missing = sorted(set(layout) - set(plan.outs))
        raise UsageError(f"internal: the {be.lib} layout has tensors no source tensor makes: "
                         f"{missing[:3]}", path=src.path)
    _shard(plan, layout, qmeta, max_shard_size)
    comp = det.arch.diffusion_component
    others = [c for c in det.component_keys if c != comp]
    if others:
        plan.notes.append(f"the output is the diffusers '{comp}' folder only; "
                          f"{', '.join(others)} are not written")
    if not (rest or dt == "BF16") and be.lib == "torchao":
        plan.notes.append(f"torch_dtype is {dt}: diffusers warns that torchao integer "
                          "quantization supports only bfloat16; it reloads and runs on CPU "
                          "anyway (pass --rest-dtype bf16 for the recommended setting)")
    return plan


def _shard(plan: HFPlan, layout, qmeta: dict, max_shard_size) -> None:
    """Split like save_pretrained (huggingface_hub's splitter over the same ordered state
    dict), the same file names, index and per-file metadata."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(layout, max_shard_size=max_shard_size,
                                               filename_pattern=WEIGHTS)
    file_of = dict(split.tensor_to_filename)
    order = [o.key for it in plan.items for o in it.outs]          # write order
    for f in split.filename_to_tensors:
        plan.files[f] = [k for k in order if file_of[k] == f]
    step = {"op": "quantize", "target": plan.target.name, "torch_dtype": plan.dtype}
    meta = {k: v for k, v in plan.source.metadata.items()
            if k not in ("format", "tensor_names") and k not in layout}
    plan.metadata = {**meta, **provenance(plan.source, step, plan.source.metadata),
                     "format": "pt", **qmeta, "convkit.quantization": plan.target.name,
                     REPORT_KEY: PLACEHOLDER}
    cfg = json.loads(plan.model.meta.to_json_string())
    cfg["_name_or_path"] = str(plan.source.path)
    cfg["quantization_config"] = plan.backend.hf_config()
    plan.extra_files["config.json"] = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    if split.is_sharded:
        index = {"metadata": {**split.metadata, **qmeta}, "weight_map": split.tensor_to_filename}
        plan.extra_files[INDEX] = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def _prepare(plan: HFPlan, it: QItem, t: torch.Tensor) -> torch.Tensor:
    """Refuse NaN/Inf (naming the source tensor) and cast to the model dtype as diffusers does."""
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()):
            raise TensorValueError(f"{int((~torch.isfinite(t)).sum())} NaN/Inf values; refusing "
                                   "to quantize", path=str(plan.source.path), key=it.key,
                                   hint="repair or replace this weight in the source")
        t = t.to(dtypes.to_torch(plan.dtype))
        if not bool(torch.isfinite(t).all()):
            raise TensorValueError(f"values exceed the {plan.dtype} range", key=it.key,
                                   path=str(plan.source.path), hint="pass --rest-dtype bf16")
    return t.contiguous()


def execute_hf(plan: HFPlan, *, overwrite: bool = False, progress: Progress | None = None,
               verify: bool = True) -> tuple[QStats, ErrorReport]:
    progress = progress or Progress(enabled=False)
    stats = QStats()
    report = ErrorReport(plan.target.name)
    file_of = {k: f for f, ks in plan.files.items() for k in ks}
    t0 = time.perf_counter()
    try:
        with progress.bar(total=plan.in_bytes, desc=plan.out.name) as bar, \
                FolderStage(plan.out, overwrite=overwrite) as stage:
            for rel, data in plan.extra_files.items():
                (stage / rel).write_bytes(data)
            with ExitStack() as stack:
                writers = {f: stack.enter_context(_ReportingWriter(
                    stage / f, [OutSpec(k, plan.outs[k].dtype, plan.outs[k].shape) for k in ks],
                    plan.metadata)) for f, ks in plan.files.items()}
                items = iter(plan.items)
                for dt, t in hf_model.stream(plan.source, plan.model.tensors):
                    it = next(items)
                    w = _prepare(plan, it, t)
                    if it.method == plan.backend.lib:
                        outs, deq = plan.backend.quantize(it.name, w)
                        report.add(measure(it.name, it.qtype, t, deq))
                        del deq
                    else:
                        outs = {it.name: w}
                    del t, w
                    for k, v in outs.items():
                        v = v.contiguous()
                        stats.crcs[k] = zlib.crc32(v.view(-1).view(torch.uint8).numpy()) \
                            if v.numel() else 0
                        writers[file_of[k]].write(k, v)
                        stats.tensors_written += 1
                    stats.bytes_read += it.src_bytes
                    bar.update(it.src_bytes)
                for wr in writers.values():
                    wr.fill(report)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; no output was written", path=plan.out) from None
    stats.seconds = time.perf_counter() - t0
    stats.bytes_written = sum(p.stat().st_size for p in plan.out.iterdir() if p.is_file())
    if verify:
        t1 = time.perf_counter()
        stats.verified = verify_hf(plan, stats.crcs)
        stats.verify_seconds = time.perf_counter() - t1
    return stats, report


def verify_hf(plan: HFPlan, crcs: dict[str, int]) -> int:
    """Reopen every written file: key set, dtypes, shapes, bytes (CRC), metadata, config."""
    from ..sources.safetensors_file import SafetensorsFile

    problems, n = [], 0
    for f, keys in plan.files.items():
        path = plan.out / f
        with SafetensorsFile(path) as sf:
            if set(sf.keys()) != set(keys):
                problems.append(f"{f}: key set differs ({len(sf)} in file, {len(keys)} planned)")
            md = sf.metadata
            bad = [k for k, v in plan.metadata.items() if k != REPORT_KEY and md.get(k) != v]
            if bad:
                problems.append(f"{f}: metadata '{bad[0]}' differs")
            todo = []
            for k in keys:
                if k not in sf:
                    continue
                info, o = sf.info(k), plan.outs[k]
                if info.dtype != o.dtype or tuple(info.shape) != tuple(o.shape):
                    problems.append(f"{k}: {info.dtype}{list(info.shape)}, planned "
                                    f"{o.dtype}{list(o.shape)}")
                else:
                    todo.append((k, sf._data_start + sf._offsets[k], info.nbytes))
        for (k, _, _), c in zip(todo, crc_ranges(path, [(a, b) for _, a, b in todo])):
            n += 1
            if c != crcs[k]:
                problems.append(f"{k}: bytes differ from what was written")
    for rel, data in plan.extra_files.items():
        if (plan.out / rel).read_bytes() != data:
            problems.append(f"{rel} differs from what was written")
    if problems:
        raise OutputError("verification of the written folder failed: " + "; ".join(problems[:5]),
                          path=plan.out)
    return n


#: options of the other targets, with their defaults (given anything else they are refused)
_NOT_HERE = {"layout": "comfy", "type_rules": (), "scaled_format": "scale_weight",
             "double_quant": False, "extras_dir": None, "extras_format": "safetensors",
             "extras_type": None}


def check_options(**given) -> None:
    """quanto/torchao targets take --rest-dtype only; refuse the other targets' options."""
    flag = {"layout": "--layout", "type_rules": "--type-rule", "scaled_format": "--scaled-format",
            "double_quant": "--double-quant", "extras_dir": "--extras",
            "extras_format": "--extras-format", "extras_type": "--extras-type"}
    bad = [flag[k] for k, v in given.items()
           if k in _NOT_HERE and (tuple(v) if k == "type_rules" else v) != _NOT_HERE[k]]
    if bad:
        raise UsageError(f"{', '.join(bad)} do(es) not apply to quanto/torchao targets (they "
                         "write a diffusers model folder of the diffusion model only)")
