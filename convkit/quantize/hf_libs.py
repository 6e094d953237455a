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
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import archs, dtypes
from ..engine import Item, Out, OutFile, OutFolder, Src, execute
from ..engine.ops import Op, as_bytes
from ..errors import TensorValueError, UsageError
from ..keymap import _bwd
from ..progress import Progress
from ..provenance import output_metadata
from ..sources import open_source
from . import hf_backends, hf_model
from .plan import QuantizePlan
from .report import REPORT_KEY, ErrorReport, measure

WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"     # diffusers SAFETENSORS_WEIGHTS_NAME
INDEX = "diffusion_pytorch_model.safetensors.index.json"    # diffusers SAFE_WEIGHTS_INDEX_NAME
MAX_SHARD = "10GB"                                          # save_pretrained's default


@dataclass
class HFPlan(QuantizePlan):
    model: hf_model.ModelInput | None = None
    dtype: str = "F32"                                   # the model dtype (torch_dtype)
    backend: object = field(default=None, repr=False)

    @property
    def fmt(self) -> str:
        return "diffusers"

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update({"model_class": self.model.cls_name, "config_from": self.model.config_from,
                  "torch_dtype": self.dtype,
                  "files": {f.path.name: len(self.outs_of(fid)) for fid, f in self.files.items()},
                  "extra_files": sorted(self.extra_files)})
        return d

    def format(self, limit: int | None = None) -> str:
        head = (f"diffusers folder: {self.model.cls_name} (config: {self.model.config_from}), "
                f"torch_dtype {self.dtype}; files: " + ", ".join(
                    [f"{f.path.name} ({len(self.outs_of(fid))} tensors)"
                     for fid, f in self.files.items()] + sorted(self.extra_files)))
        return head + "\n" + super().format(limit)


class HFOp(Op):
    """One source tensor -> its diffusers tensor(s) (a fused tensor is read once for all its
    parts), each cast to the model dtype as diffusers does and, for Linear weights, quantized
    by the library's own code; the error of every quantized weight is measured."""

    name = "hf"

    def __init__(self, plan: HFPlan, report: ErrorReport):
        self.plan, self.report = plan, report
        self._lock = threading.Lock()

    def granule(self, item):
        return 0

    def _prepare(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Refuse NaN/Inf (naming the source tensor) and cast to the model dtype."""
        path = str(self.plan.source.path)
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                raise TensorValueError(f"{int((~torch.isfinite(t)).sum())} NaN/Inf values; "
                                       "refusing to quantize", path=path, key=key,
                                       hint="repair or replace this weight in the source")
            t = t.to(dtypes.to_torch(self.plan.dtype))
            if not bool(torch.isfinite(t).all()):
                raise TensorValueError(f"values exceed the {self.plan.dtype} range", key=key,
                                       path=path, hint="pass --rest-dtype bf16")
        return t.contiguous()

    def run(self, item, worker, start, count, xs):
        be = self.plan.backend
        raw = xs[0]
        outs = {o.key: o for o in item.outs}
        writes = []
        for dt, is_weight in item.extra["parts"]:
            cur = _bwd(dt.transform, raw)
            t = cur if dt.part is None else cur[dt.part[0]:dt.part[1]]
            w = self._prepare(dt.key, t)
            if is_weight:
                got, deq = be.quantize(dt.name, w)
                self.report.add(measure(dt.name, be.label, t, deq),
                                order=item.extra["order"])
            else:
                got = {dt.name: w}
            for k, v in got.items():
                writes.append((outs[k], 0, as_bytes(v)))
        return writes

    def describe(self, item):
        return "+".join(sorted({self.plan.backend.lib if w else "cast"
                                for _, w in item.extra["parts"]}))


def quantize_hf(input, output, tgt, *, rest_dtype=None, config=None, max_shard_size=MAX_SHARD,
                report_path=None, overwrite=False, dry_run=False, verify=True, variant=None,
                progress: Progress | None = None):
    """Write ``output`` (a folder) as diffusers' ``save_pretrained`` does for the diffusion model
    of ``input`` loaded with the target's quantization config and ``torch_dtype`` = ``rest_dtype``
    (default: the source's float type). ``config``: a diffusers config dict / config.json / folder
    for a single file of a size convkit has no config for. ``max_shard_size`` as in
    ``save_pretrained``. Returns a :class:`~convkit.quantize.QuantizeResult`."""
    from .result import QuantizeResult

    hf_backends.check(tgt.name)
    rest = dtypes.parse_user(rest_dtype) if rest_dtype and rest_dtype != "source" else None
    if rest and rest not in ("F32", "F16", "BF16"):
        raise UsageError(f"--rest-dtype must be fp32, fp16, bf16 or source, not '{rest_dtype}'")
    out = Path(output)
    if out.suffix.lower() in (".safetensors", ".gguf", ".ckpt", ".pt", ".bin"):
        raise UsageError(f"target '{tgt.name}' writes a diffusers model folder, not a "
                         f"{out.suffix} file", path=out, hint="give a folder name as OUTPUT")
    with open_source(input, variant=variant) as src:
        notes = []
        what = src.describe_encoding()
        if what:
            notes.append(f"input is already quantized ({what}): dequantized to float32 first, "
                         "so this quantization adds to the error already in it")
            if rest is None:   # not the dequantized float32: what such models run in
                rest = "BF16"
                notes.append("torch_dtype bf16 for the dequantized input (--rest-dtype "
                             "chooses another)")
        det = archs.detect(src)
        plan = plan_hf(src, out, tgt, det, rest, config, max_shard_size)
        plan.notes[:0] = notes
        plan.verify = verify
        plan.check(overwrite)
        result = QuantizeResult(plan)
        if dry_run:
            return result
        result.stats = execute(plan, progress=progress, overwrite=overwrite)
        result.report = plan.report
    if report_path is not None:
        d = result.to_dict()
        d["error"] = result.report.to_dict()
        Path(report_path).write_text(json.dumps(d, indent=2) + "\n")
    return result


def plan_hf(src, out: Path, tgt, det, rest: str | None, config=None,
            max_shard_size=MAX_SHARD) -> HFPlan:
    model = hf_model.resolve(src, det, src, config)
    dt = hf_model.model_dtype(model.tensors, rest)
    tdt = dtypes.to_torch(dt)
    be = hf_backends.backend(tgt.name)
    layout, qmeta, weights = be.layout(model.meta, tdt)
    report = ErrorReport(tgt.name)
    plan = HFPlan("quantize", [src], target=tgt, detection=det, reports={"": report},
                  model=model, dtype=dt, backend=be)
    op = HFOp(plan, report)
    by_key: dict[str, Item] = {}
    made = set()
    for t in model.tensors:
        keys = weights.get(t.name, [t.name])
        outs = [Out(k, dtypes.from_torch(layout[k].dtype), tuple(layout[k].shape)) for k in keys]
        made.update(keys)
        it = by_key.get(t.key)
        if it is None:
            info = src.info(t.key)
            it = by_key[t.key] = Item(op, (Src(0, t.key),), [], tuple(info.shape), info.dtype,
                                      info.storage, info.nbytes,
                                      extra={"parts": [], "order": len(by_key)})
            plan.items.append(it)
        it.outs += outs
        it.extra["parts"].append((t, t.name in weights))
        it.qtype = be.label if t.name in weights else outs[0].dtype
    if made != set(layout):
        missing = sorted(set(layout) - made)
        raise UsageError(f"internal: the {be.lib} layout has tensors no source tensor makes: "
                         f"{missing[:3]}", path=src.path)
    _shard(plan, layout, qmeta, max_shard_size, out)
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


def _shard(plan: HFPlan, layout, qmeta: dict, max_shard_size, out: Path) -> None:
    """Split like save_pretrained (huggingface_hub's splitter over the same ordered state
    dict), the same file names, index and per-file metadata."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(layout, max_shard_size=max_shard_size,
                                               filename_pattern=WEIGHTS)
    file_of = dict(split.tensor_to_filename)
    folder = plan.folders.setdefault("", OutFolder("", out))
    step = {"op": "quantize", "target": plan.target.name, "torch_dtype": plan.dtype}
    src_meta = {k: v for k, v in plan.source.metadata.items()
                if k not in ("format", "tensor_names") and k not in layout}

    class _Meta:      # output_metadata wants a source; keep the filtered metadata
        metadata = src_meta
        path = plan.source.path

        @staticmethod
        def files():
            return plan.source.files()

    meta = output_metadata(_Meta, step, storage={"format": "pt", **qmeta,
                                                 "convkit.quantization": plan.target.name})
    for it in plan.items:
        for o in it.outs:
            o.file = file_of[o.key]
    for f in split.filename_to_tensors:
        plan.add_file(OutFile(f, out / f, "safetensors", dict(meta), reserve=REPORT_KEY,
                              folder="", fill=plan.report.summary_text))
    cfg = json.loads(plan.model.meta.to_json_string())
    cfg["_name_or_path"] = str(plan.source.path)
    cfg["quantization_config"] = plan.backend.hf_config()
    folder.extra_files["config.json"] = (json.dumps(cfg, indent=2, sort_keys=True)
                                         + "\n").encode()
    if split.is_sharded:
        index = {"metadata": {**split.metadata, **qmeta}, "weight_map": split.tensor_to_filename}
        folder.extra_files[INDEX] = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


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
