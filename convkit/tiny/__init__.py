"""Tiny, seeded models built from the REAL diffusers/transformers classes.

Each architecture keeps the real structure (levels, where attention sits, transformer depth pattern,
text_time embedding, which text encoders, Flux double/single blocks, guidance only on dev) with
small channel counts; configs are data in ``convkit/tiny/configs/<arch>.json``. Every parameter is
re-initialised from a seeded generator (``randn * 0.02``; norm weights ``1 + randn * 0.02``) so no
tensor is all-zero or all-one.

Nothing is downloaded: tokenizers are built locally from a byte-level vocabulary.
"""
from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import keymap
from ..models import instantiate

_CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: every architecture with a tiny config (convkit/tiny/configs/<arch>.json). A variant
#: architecture (formats/<arch>.toml variant_of: SD3.5 Large Turbo) has its base's structure and
#: is built from its base's tiny config (:func:`spec`), so it is not tested twice.
ARCHS = tuple(sorted(p.stem for p in _CONFIG_DIR.glob("*.json")))


@dataclass
class TinyModel:
    arch: str
    components: dict[str, torch.nn.Module]
    pipeline_class_name: str
    spec: dict = field(repr=False, default_factory=dict)

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{component: diffusers state dict}`` as save_pretrained writes it (tied aliases dropped)."""
        return {name: component_state_dict(m) for name, m in self.components.items()}

    def param_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.components.items()}


@functools.lru_cache(maxsize=None)
def spec(arch: str) -> dict:
    if arch not in ARCHS:
        from .. import archs
        from ..errors import UnknownNameError

        base = archs.load_all().get(arch)
        if base is not None and base.variant_of in ARCHS:
            return spec(base.variant_of)
        raise UnknownNameError("tiny architecture", arch, ARCHS)
    with open(_CONFIG_DIR / f"{arch}.json") as f:
        return json.load(f)


DEMO_DIR = Path(__file__).resolve().parent / "demo"


def demo_spec() -> dict | None:
    """The trained demo model's spec (configs, sampling), None when it is not installed."""
    return _demo_spec(str(DEMO_DIR))


@functools.lru_cache(maxsize=None)
def _demo_spec(folder: str) -> dict | None:
    p = Path(folder) / "demo.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _reinit(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02
            is_norm_weight = name.endswith((".weight", ".scale")) and p.ndim == 1 and any(
                s in name for s in ("norm", "ln_", "layer_norm", "group_norm"))
            p.copy_((noise + 1.0 if is_norm_weight else noise).to(p.dtype))


def build(arch: str, seed: int = 0) -> TinyModel:
    """Instantiate the tiny architecture from the real classes, seeded."""
    s = spec(arch)
    torch.manual_seed(seed)
    comps = {}
    for i, (name, c) in enumerate(s["components"].items()):
        m = instantiate(c["class"], c["config"])
        _reinit(m, seed * 1000 + i)
        # weights the released model has as identity matrices (SD3's CLIP-L text_projection:
        # SD3 uses CLIP-L's pooled output unprojected, diffusers single_file_utils.py sets it to
        # torch.eye when it loads an SD3 single file)
        with torch.no_grad():
            for pname in c.get("identity", ()):
                p = m.get_parameter(pname)
                p.copy_(torch.eye(*p.shape, dtype=p.dtype))
        m.eval()
        comps[name] = m
    return TinyModel(arch, comps, s["pipeline"], s)


def component_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without tied aliases (what save_pretrained stores)."""
    sd = module.state_dict()
    if type(module).__name__ == "T5EncoderModel":
        sd.pop("encoder.embed_tokens.weight", None)
    return sd


# --------------------------------------------------------------------------- single file


def state_dict_single_file(tiny: TinyModel, layout: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint as one single-file state dict with the real names and prefixes."""
    configs = {name: c["config"] for name, c in tiny.spec["components"].items()}
    return keymap.arch_to_single_file(tiny.arch, tiny.state_dicts(), layout=layout, configs=configs)


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def save_state_dict(sd: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None
                    ) -> Path:
    """Write a state dict as safetensors through convkit's writer: atomic, and with the mode a
    plain ``open()`` gives under the umask (safetensors' own ``save_file`` makes 0600 files)."""
    from ..writer import OutSpec, SafetensorsWriter
    from .. import dtypes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    specs = [OutSpec(k, dtypes.from_torch(t.dtype), tuple(t.shape)) for k, t in sd.items()]
    with SafetensorsWriter(path, specs, metadata) as w:
        for k, t in sd.items():
            w.write(k, t.contiguous())
    return path


def save_single_file(tiny: TinyModel, path, dtype: torch.dtype = torch.float32, layout: str | None = None) -> Path:
    """Write one .safetensors with the real single-file names (``layout`` "sgm", or "bfl" for Flux)."""
    sd = _cast(state_dict_single_file(tiny, layout), dtype)
    return save_state_dict(sd, path, {"format": "pt"})


def fix_modes(folder: Path) -> None:
    """Give files the mode a plain ``open()`` gives under the umask (save_pretrained writes its
    weights through safetensors, which makes them 0600)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for p in Path(folder).rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~mask)


# --------------------------------------------------------------------------- diffusers folder


def make_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A byte-level CLIP BPE tokenizer with no merges (514 tokens), built locally."""
    from transformers import CLIPTokenizer

    from ..tokenizers import byte_symbols

    chars = byte_symbols()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=77)


def make_t5_tokenizer(vocab_size: int):
    """A tiny Unigram T5 tokenizer (ids 0..2 = pad, eos, unk), built locally."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    pieces += [(ch, -2.0) for ch in alphabet]
    pieces += [("▁" + ch, -1.5) for ch in alphabet[: max(0, vocab_size - len(pieces))]]
    pieces = pieces[:vocab_size]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _scheduler(cfg: dict):
    import diffusers

    cfg = dict(cfg)
    cls = getattr(diffusers, cfg.pop("_class_name"))
    return cls(**cfg)


def pipeline(tiny: TinyModel, dtype: torch.dtype = torch.float32):
    """The real diffusers pipeline object wrapping the tiny components."""
    import diffusers

    s = tiny.spec
    cls = getattr(diffusers, s["pipeline"])
    kwargs = {name: (m.to(dtype) if dtype != torch.float32 else m) for name, m in tiny.components.items()}
    for name, c in s["components"].items():
        tok = c.get("tokenizer")
        if tok is None:
            continue
        if c["class"] == "T5EncoderModel":
            kwargs[tok] = make_t5_tokenizer(c["config"]["vocab_size"])
        else:
            kwargs[tok] = make_clip_tokenizer("!" if tok == "tokenizer_2" else "<|endoftext|>")
    kwargs["scheduler"] = _scheduler(s["scheduler"])
    import inspect

    # every pipeline slot the tiny model does not fill (the refiner's text_encoder, IP-Adapter
    # and safety-checker slots) is None, whatever the pipeline class names them
    kwargs.update(s.get("pipeline_extra", {}))
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name != "self" and name not in kwargs and p.default is inspect.Parameter.empty \
                and p.kind is p.POSITIONAL_OR_KEYWORD:
            kwargs[name] = None
    return cls(**kwargs)


def save_diffusers(tiny: TinyModel, folder, dtype: torch.dtype = torch.float32, weights: bool = True) -> Path:
    """Write a real diffusers folder (model_index.json, components, scheduler, tokenizers).

    ``weights=False`` leaves only the configs, tokenizers and scheduler: a config folder for
    ``from_single_file(..., config=folder)`` that cannot silently supply weights itself.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dtype != torch.float32:
        tiny = build_copy(tiny)
    pipe = pipeline(tiny, dtype)
    with _no_save_progress():
        pipe.save_pretrained(str(folder), safe_serialization=True)
    fix_modes(folder)
    if not weights:
        for p in folder.rglob("*"):
            if p.is_file() and p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"):
                p.unlink()
    return folder


@contextlib.contextmanager
def _no_save_progress():
    """save_pretrained's "Writing model shards" bars would interleave with convkit's own lines
    (the demo's, a recipe's progress); restored afterwards."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    was = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def build_copy(tiny: TinyModel) -> TinyModel:
    import copy

    return TinyModel(tiny.arch, {k: copy.deepcopy(v) for k, v in tiny.components.items()},
                     tiny.pipeline_class_name, tiny.spec)
