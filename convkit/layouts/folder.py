"""Everything a diffusers pipeline folder holds besides the weights, from data convkit ships.

``model_index.json``, each component's ``config.json``, ``scheduler/scheduler_config.json`` and
the tokenizer folders, written the way the real classes write them (diffusers' ``ConfigMixin``,
transformers' ``PretrainedConfig``), so ``DiffusionPipeline.from_pretrained`` loads the folder
offline. Nothing is downloaded: component configs come from the caller (resolved by
:mod:`convkit.configs`), the scheduler from ``formats/configs/<arch>/scheduler.json``, CLIP
tokenizers from ``formats/tokenizers/`` (:mod:`convkit.tokenizers`), the pipeline's flags and
absent components from ``formats/<arch>.toml`` ``[model_index]``. convkit ships no T5
vocabulary: Flux's ``tokenizer_2/`` comes from a ``--config-from`` folder, or the output has none.

Pure library: callers stage the returned bytes and copies (``OutFolder``) next to the weights.
"""
from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

from .. import data, tokenizers
from ..archs import Arch
from ..errors import InputFormatError, UsageError
from ..models import meta_model, model_class
from ..sources.jsonsafe import loads

#: a pipeline slot with nothing in it, as diffusers' register_modules records a None module
NULL = [None, None]

# keys of a transformers config.json the class computes or the writer of the weights owns:
# recomputed (model_type, transformers_version, architectures) or left out. dtype is left out
# on purpose: without it transformers 5 (dtype="auto" by default) takes the dtype of the weights
# actually written, which a config resolved before the cast cannot know.
_TRANSFORMERS_OWN = ("architectures", "model_type", "transformers_version", "dtype",
                     "torch_dtype", "quantization_config")


# --------------------------------------------------------------------------- configs


def component_config_json(class_name: str, config: dict) -> bytes:
    """The ``config.json`` ``class_name``'s own ``save_pretrained`` writes for ``config``.

    The model is built on the meta device (no memory) because the classes edit their config as
    they build (transformers' T5EncoderModel sets ``use_cache=False``, T5Config keeps
    ``tie_word_embeddings=False`` as ``scale_decoder_outputs``). diffusers: serialised by
    ``ConfigMixin`` (every constructor argument, ``_class_name``, ``_diffusers_version``).
    transformers: ``architectures=[class_name]`` and serialised as ``save_pretrained`` does
    (``use_diff``: what differs from the defaults, plus ``model_type`` and
    ``transformers_version``). convkit's note keys (``_source``, ...) are dropped either way, and
    so are dtype and quantization_config: the config describes the model, the weights' writer
    their storage.
    """
    given = config.get("_class_name")
    if given and given != class_name:
        raise UsageError(f"the config is for {given}, not {class_name}")
    # memoised: a folder writer asks for each component's file more than once, and building
    # a full-size model (even on the meta device) takes up to a second
    return _config_json(class_name, json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=32)
def _config_json(class_name: str, config_json: str) -> bytes:
    config = json.loads(config_json)
    cls = model_class(class_name)
    transformers_class = cls.__module__.startswith("transformers")
    if transformers_class:
        config = {k: v for k, v in config.items() if k not in _TRANSFORMERS_OWN}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = meta_model(class_name, config)
            if not transformers_class:
                return model.to_json_string().encode("utf-8")
            conf = model.config
            conf.architectures = [class_name]     # what save_pretrained sets
            conf.dtype = None                     # the default: left out of the diff
            return conf.to_json_string(use_diff=True).encode("utf-8")
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise InputFormatError(f"{class_name} does not take this config "
                               f"({type(e).__name__}: {e})") from None


def scheduler_config_json(config: dict) -> bytes:
    """``scheduler_config.json`` as the scheduler class named by ``config["_class_name"]``
    writes it (every constructor argument; convkit's ``_`` note keys dropped)."""
    cls = _scheduler_class(config.get("_class_name"))
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return cls.from_config(cfg).to_json_string().encode("utf-8")


def _scheduler_class(name):
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise InputFormatError(f"'{name}' is not a diffusers scheduler class")
    return cls


def library_of(class_name: str) -> str:
    """The ``library`` of a ``[library, class]`` model_index entry: the package the class
    lives in, as diffusers' ``_fetch_class_library_tuple`` (pipelines/pipeline_loading_utils.py)
    decides for every model, scheduler and tokenizer convkit writes."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        cls = getattr(lib, class_name, None)
        if isinstance(cls, type):
            return cls.__module__.split(".")[0]
    raise UsageError(f"neither diffusers nor transformers has a class '{class_name}'")


# --------------------------------------------------------------------------- --config-from


def _read_json(path: Path, what: str):
    try:
        d = loads(path.read_bytes(), what)
    except ValueError as e:
        raise InputFormatError(str(e), path=path) from None
    if not isinstance(d, dict):
        raise InputFormatError(f"{what} is not a JSON object", path=path)
    return d


def _is_entry(v) -> bool:
    return isinstance(v, list) and len(v) == 2


def read_model_index(folder: Path) -> dict:
    """``folder``'s model_index.json; UsageError when ``folder`` is not a pipeline folder."""
    folder = Path(folder)
    p = folder / "model_index.json"
    if not p.is_file():
        raise UsageError("has no model_index.json: not a diffusers pipeline folder", path=folder,
                         hint="--config-from takes a pipeline folder, e.g. a download of the "
                              "released model")
    return _read_json(p, "model_index.json")


def read_config_from(folder: Path) -> dict[str, dict]:
    """The component configs of a ``--config-from`` folder: ``{component: config}`` for every
    component model_index.json lists whose folder has a ``config.json``. transformers configs
    get ``_class_name`` from ``architectures`` (as :mod:`convkit.render` reads them), else
    from the model_index entry."""
    folder = Path(folder)
    out = {}
    for comp, entry in read_model_index(folder).items():
        if comp.startswith("_") or not _is_entry(entry) or entry[1] is None:
            continue
        p = folder / comp / "config.json"
        if not p.is_file():
            continue
        cfg = _read_json(p, "config.json")
        if "_class_name" not in cfg:
            cfg["_class_name"] = (cfg.get("architectures") or [entry[1]])[0]
        out[comp] = cfg
    return out


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- the folder


class _Out:
    """What :func:`pipeline_files` collects: files, copies, model_index entries, notes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.copies: dict[str, Path] = {}
        self.index: dict[str, list] = {}
        self.notes: list[str] = []

    def copy_folder(self, src: Path, rel: str) -> None:
        for p in _files_under(src):
            self.copies[f"{rel}/{p.relative_to(src).as_posix()}"] = p


def tokenizer_folder(component: str) -> str:
    """text_encoder -> tokenizer, text_encoder_2 -> tokenizer_2 (diffusers' pipeline slots)."""
    return component.replace("text_encoder", "tokenizer")


def pipeline_files(arch: Arch, configs: Mapping[str, dict], *, config_from: Path | None = None
                   ) -> tuple[dict[str, bytes], dict[str, Path], list[str]]:
    """Everything but the weights of ``arch``'s diffusers folder holding the components of
    ``configs`` (``{component: resolved config with "_class_name"}``).

    Returns ``(files, copies, notes)``: ``{relative path: bytes}`` to write, ``{relative path:
    source file}`` to copy as is (from ``config_from``), and what the caller should tell the
    user (components the folder lacks). ``config_from``: a pipeline folder whose tokenizer and
    scheduler folders are copied and whose model_index.json flags are kept.
    """
    unknown = sorted(set(configs) - set(arch.components))
    if unknown:
        raise UsageError(f"{arch.title} has no component(s) {', '.join(unknown)}; its "
                         f"components: {', '.join(arch.components)}")
    source_index = read_model_index(config_from) if config_from is not None else {}
    out = _Out()
    for comp in arch.components:
        _add_component(out, arch, comp, configs.get(comp))
    for comp, c in arch.components.items():
        if c.kind == "text_encoder":
            _add_tokenizer(out, arch, comp, comp in configs, config_from, source_index)
    _add_scheduler(out, arch, config_from)
    for slot in arch.model_index.get("absent", []):
        out.index.setdefault(slot, list(NULL))
    flags = {**arch.model_index.get("flags", {}), **_source_flags(out, arch, source_index)}
    out.files["model_index.json"] = model_index_json(arch.pipeline, out.index, flags)
    return out.files, out.copies, out.notes


def _add_component(out: _Out, arch: Arch, comp: str, config: dict | None) -> None:
    if config is None:
        # a UNet-only (or any partial) output is still a pipeline folder; the missing part is
        # given to from_pretrained (unet=..., text_encoder=...)
        out.index[comp] = list(NULL)
        tok = (f" (nor {tokenizer_folder(comp)})"
               if arch.components[comp].kind == "text_encoder" else "")
        out.notes.append(f"the folder has no {comp}{tok}: model_index.json lists it as "
                         f"[null, null]; {_how_to_add(arch, comp)}")
        return
    cls_name = config.get("_class_name")
    if not cls_name:
        raise UsageError(f"the config of '{comp}' names no class (\"_class_name\")")
    out.files[f"{comp}/config.json"] = component_config_json(cls_name, config)
    out.index[comp] = [library_of(cls_name), cls_name]


def _add_tokenizer(out: _Out, arch: Arch, comp: str, present: bool, config_from: Path | None,
                   source_index: dict) -> None:
    tok = tokenizer_folder(comp)
    if not present:
        out.index[tok] = list(NULL)
        return
    given = Path(config_from) / tok if config_from is not None else None
    if given is not None and given.is_dir() and _files_under(given):
        out.copy_folder(given, tok)
        out.index[tok] = _copied_tokenizer_entry(given, source_index.get(tok))
        return
    kind = arch.components[comp].tokenizer
    if kind in tokenizers.kinds():
        files = _clip_files(str(data.formats_dir()), kind)
        out.files.update({f"{tok}/{name}": blob for name, blob in files.items()})
        cls_name = json.loads(files["tokenizer_config.json"])["tokenizer_class"]
        out.index[tok] = [library_of(cls_name), cls_name]
        return
    out.index[tok] = list(NULL)
    released = arch.model_index.get("released") or "the released model"
    out.notes.append(
        f"the folder has no {tok}: convkit ships no {kind or 'such'} tokenizer, so "
        f"model_index.json lists {tok} as [null, null]; write the folder with --config-from a "
        f"folder that has {tok}/ (e.g. a download of {released}) to copy it, or "
        f"{_how_to_add(arch, tok)}")


def _how_to_add(arch: Arch, slot: str) -> str:
    # diffusers' from_pretrained loads a [null, null] slot as None only when the pipeline
    # declares it optional (_optional_components); any other slot it refuses to leave empty
    import diffusers

    optional = getattr(getattr(diffusers, arch.pipeline), "_optional_components", [])
    if slot in optional:
        return (f"diffusers loads the pipeline without it (give {slot}= to from_pretrained "
                "to add one)")
    return f"diffusers' from_pretrained then needs {slot}= (it refuses to leave {slot} empty)"


@functools.cache
def _clip_files(formats_dir: str, kind: str) -> dict[str, bytes]:
    # deriving the 49,408-entry vocabulary takes most of a second; a run writes it per text
    # encoder (keyed by the formats folder, as convkit.data caches)
    return tokenizers.tokenizer_files(kind)


def _copied_tokenizer_entry(folder: Path, entry) -> list:
    # the source's model_index entry names the class diffusers loads the folder with (the
    # released FLUX.1 says T5TokenizerFast, transformers 5 saves T5Tokenizer); a folder saved
    # without one still names its class in tokenizer_config.json
    if _is_entry(entry) and entry[1]:
        return list(entry)
    p = folder / "tokenizer_config.json"
    cls_name = _read_json(p, "tokenizer_config.json").get("tokenizer_class") if p.is_file() \
        else None
    if not isinstance(cls_name, str):
        raise InputFormatError("cannot tell the tokenizer's class: neither model_index.json nor "
                               "tokenizer_config.json (tokenizer_class) names it", path=folder)
    return [library_of(cls_name), cls_name]


def _add_scheduler(out: _Out, arch: Arch, config_from: Path | None) -> None:
    given = Path(config_from) / "scheduler" if config_from is not None else None
    if given is not None and (given / "scheduler_config.json").is_file():
        cfg = _read_json(given / "scheduler_config.json", "scheduler_config.json")
        cls_name = _scheduler_class(cfg.get("_class_name")).__name__
        out.copy_folder(given, "scheduler")
    else:
        try:
            cfg = dict(data.load_json(f"configs/{arch.name}/scheduler.json"))
        except OSError:
            raise UsageError(f"no scheduler config known for {arch.name}",
                             hint="give a model folder with scheduler/ as --config-from") from None
        out.files["scheduler/scheduler_config.json"] = scheduler_config_json(cfg)
        cls_name = cfg["_class_name"]
    out.index["scheduler"] = [library_of(cls_name), cls_name]


def _source_flags(out: _Out, arch: Arch, source_index: dict) -> dict:
    """The flags of a --config-from model_index.json that ``arch``'s pipeline takes (a
    fine-tune may change them, e.g. force_zeros_for_empty_prompt)."""
    if not source_index:
        return {}
    import inspect

    import diffusers

    src_cls = source_index.get("_class_name")
    if src_cls and src_cls != arch.pipeline:
        out.notes.append(f"--config-from is a {src_cls} folder; this one is written as "
                         f"{arch.pipeline} ({arch.title})")
    params = inspect.signature(getattr(diffusers, arch.pipeline).__init__).parameters
    flags = {k: v for k, v in source_index.items()
             if not k.startswith("_") and not _is_entry(v)}
    dropped = sorted(k for k in flags if k not in params)
    if dropped:
        out.notes.append(f"model_index.json flag(s) of --config-from that {arch.pipeline} does "
                         f"not take left out: {', '.join(dropped)}")
    return {k: v for k, v in flags.items() if k in params}


def model_index_json(pipeline: str, entries: Mapping[str, list], flags: Mapping) -> bytes:
    """model_index.json as diffusers' ``save_pretrained`` writes it (``ConfigMixin``'s
    ``to_json_string``: sorted keys, indent 2, a final newline)."""
    import diffusers

    d = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
         **dict(flags), **{k: list(v) for k, v in entries.items()}}
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode("utf-8")
