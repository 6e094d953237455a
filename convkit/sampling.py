"""Sampling facts a checkpoint's tensors cannot tell: its prediction type and its sampler.

A 1-step SDXL-Lightning UNet predicts x0 and an LCM merge wants the LCM scheduler, yet their
keys and shapes are those of any SDXL. A user states them when a command writes a model
(``--prediction``, ``--sampler``: :func:`stated`, a context the CLI commands and recipe steps
open around the library call); :func:`convkit.provenance.output_metadata` records them in the
output's metadata (``convkit.prediction``, ``convkit.sampler``: ``formats/sampling.toml``), and
since every output carries its source's metadata, every later output carries them too (a
stated value overrides an inherited one). A diffusers-folder output also gets them in
``scheduler/scheduler_config.json`` (:func:`patch_folder`), where diffusers reads them;
``convkit verify`` renders with them (:mod:`convkit.verify.settings`).

Library use::

    with sampling.stated(prediction="sample"):
        convert("lightning_1step_unet.safetensors", "out.safetensors", "fp16")
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from dataclasses import dataclass

from . import data
from .errors import UnknownNameError


def _data() -> dict:
    return data.load_toml("sampling.toml")


def prediction_names() -> tuple[str, ...]:
    """diffusers' prediction_type values, the names convkit writes."""
    return tuple(_data()["prediction"]["names"])


def prediction_spellings() -> dict[str, str]:
    p = _data()["prediction"]
    return {**{n: n for n in p["names"]}, **p.get("aliases", {})}


def sampler_names() -> tuple[str, ...]:
    """The sampler presets of ``formats/verify/render.toml``."""
    return tuple(data.load_toml("verify/render.toml")["samplers"])


def sampler_preset(name: str) -> dict:
    return data.load_toml("verify/render.toml")["samplers"][name]


def check_prediction(value: str | None, option: str = "--prediction") -> str | None:
    """``value`` in diffusers' spelling; an unknown name fails with the nearest one."""
    if value is None or value == "":
        return None
    v = prediction_spellings().get(str(value).strip().lower())
    if v is None:
        raise UnknownNameError(f"prediction type ({option})", str(value),
                               tuple(prediction_spellings()))
    return v


def check_sampler(value: str | None, option: str = "--sampler") -> str | None:
    if value is None or value == "":
        return None
    v = str(value).strip().lower()
    if v not in sampler_names():
        raise UnknownNameError(f"sampler ({option})", str(value), sampler_names())
    return v


@dataclass(frozen=True)
class Facts:
    prediction: str | None = None       # diffusers' prediction_type
    sampler: str | None = None          # a formats/verify/render.toml sampler preset

    def __bool__(self) -> bool:
        return bool(self.prediction or self.sampler)

    def over(self, other: Facts) -> Facts:
        """These facts, each missing one taken from ``other``."""
        return Facts(self.prediction or other.prediction, self.sampler or other.sampler)

    def metadata(self) -> dict[str, str]:
        d = _data()
        out = {}
        if self.prediction:
            out[d["prediction"]["key"]] = self.prediction
        if self.sampler:
            out[d["sampler"]["key"]] = self.sampler
        return out

    def to_dict(self) -> dict:
        return {k: v for k, v in (("prediction", self.prediction), ("sampler", self.sampler))
                if v}


def from_metadata(meta: dict[str, str] | None, *, own_only: bool = False) -> Facts:
    """What a file's metadata says (values convkit does not know are ignored: a file is
    read, never refused, for its metadata); ``own_only``: convkit's own keys only."""
    meta = meta or {}
    d = _data()
    spell = prediction_spellings()
    pred = None
    for k in [d["prediction"]["key"]] if own_only else d["prediction"]["keys"]:
        v = meta.get(k)
        if isinstance(v, str) and v.strip().lower() in spell:
            pred = spell[v.strip().lower()]
            break
    s = meta.get(d["sampler"]["key"])
    sampler = s.strip().lower() if isinstance(s, str) and s.strip().lower() in sampler_names() \
        else None
    return Facts(pred, sampler)


def of_path(path, *, own_only: bool = False) -> Facts:
    """The facts a file or folder's metadata states."""
    from .sources import open_source

    with open_source(path) as src:
        return from_metadata(src.metadata, own_only=own_only)


# -- what the user states for the outputs written in a context ------------------------------

_NOTHING = Facts()      # frozen: an immutable default
_STATED: contextvars.ContextVar[Facts] = contextvars.ContextVar("convkit_sampling",
                                                                default=_NOTHING)


@contextlib.contextmanager
def stated(prediction: str | None = None, sampler: str | None = None):
    """Every output written in this context records these facts (checked first: an unknown
    name fails before anything is read)."""
    facts = Facts(check_prediction(prediction), check_sampler(sampler))
    token = _STATED.set(facts.over(_STATED.get()))
    try:
        yield facts
    finally:
        _STATED.reset(token)


def current() -> Facts:
    return _STATED.get()


def apply(meta: dict[str, str], step: dict, *, inherited: Facts = Facts()) -> None:
    """Write the facts of an output into its metadata ``meta`` (in place): those ``inherited``
    (e.g. a merged LoRA's) over what ``meta`` already carries, the stated ones over both; a
    stated fact is also recorded in ``step``."""
    now = current()
    facts = now.over(inherited)
    meta.update(facts.metadata())
    step.update(now.to_dict())
    p = _data()["prediction"]
    mk = p["modelspec_key"]
    if facts.prediction and mk in meta and \
            prediction_spellings().get(meta[mk].strip().lower()) != facts.prediction:
        # a stated type contradicting the publisher's ModelSpec key: the file says one thing
        meta[mk] = p["modelspec_values"].get(facts.prediction, facts.prediction)


# -- diffusers folders -----------------------------------------------------------------------

SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def patch_folder(folder, meta: dict[str, str], notes: list[str] | None = None) -> None:
    """Give a diffusers-folder output (an engine ``OutFolder``: ``extra_files`` to write,
    ``copies`` to copy) the facts its metadata ``meta`` states, where diffusers reads them:
    ``prediction_type`` in the scheduler config, the sampler's scheduler class and overrides
    (and the class in model_index.json)."""
    facts = from_metadata(meta)
    if not facts:
        return
    blob = folder.extra_files.get(SCHEDULER_CONFIG)
    src = folder.copies.get(SCHEDULER_CONFIG)
    if blob is None and src is None:
        return
    cfg = json.loads(blob if blob is not None else src.read_bytes())
    new = dict(cfg)
    if facts.sampler:
        preset = sampler_preset(facts.sampler)
        new["_class_name"] = preset["class"]
        new.update(preset.get("overrides", {}))
    key = _data()["prediction"]["scheduler_key"]
    if facts.prediction:
        new[key] = facts.prediction
    if new == cfg:
        return
    written = _scheduler_json(new)
    if facts.prediction and json.loads(written).get(key) != facts.prediction and notes is not None:
        notes.append(f"{new['_class_name']} takes no {key}: the prediction type "
                     f"'{facts.prediction}' is in the weights' metadata only")
    folder.copies.pop(SCHEDULER_CONFIG, None)
    folder.extra_files[SCHEDULER_CONFIG] = written
    if new.get("_class_name") != cfg.get("_class_name"):
        _patch_index(folder, new["_class_name"])


def _scheduler_json(config: dict) -> bytes:
    # as the scheduler class writes it (every constructor argument; what it does not take is
    # dropped), like convkit.layouts.folder.scheduler_config_json
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return cls.from_config(cfg).to_json_string().encode("utf-8")


def _patch_index(folder, cls_name: str) -> None:
    blob = folder.extra_files.get("model_index.json")
    src = folder.copies.get("model_index.json")
    if blob is None and src is None:
        return
    index = json.loads(blob if blob is not None else src.read_bytes())
    index["scheduler"] = ["diffusers", cls_name]
    folder.copies.pop("model_index.json", None)
    # as diffusers' save_pretrained writes it (sorted keys, indent 2, a final newline)
    folder.extra_files["model_index.json"] = (json.dumps(index, indent=2, sort_keys=True)
                                              + "\n").encode("utf-8")


__all__ = ["Facts", "apply", "check_prediction", "check_sampler", "current", "from_metadata",
           "of_path", "patch_folder", "prediction_names", "prediction_spellings", "sampler_names", "stated"]
