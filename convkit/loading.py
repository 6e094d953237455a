"""A component of any artifact convkit reads, as a real diffusers/transformers module.

:func:`component_tensors` lists a component's tensors under diffusers names (a single file's
SGM/LDM, BFL or ComfyUI names mapped through :mod:`convkit.keymap`; a fused tensor such as
Flux ``qkv`` read once and split), read lazily through the logical-weights view, so any
encoding (fp8, scaled fp8, NF4, GGUF, ...) arrives as float values. :func:`load_component`
builds the module from the config :mod:`convkit.configs` resolves (given, known, or inferred
from the shapes) on the meta device and assigns the decoded weights: nothing is allocated
twice and no weight is initialised only to be overwritten.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import configs, dtypes, keymap
from .errors import InputFormatError, UsageError
from .keymap import _bwd
from .models import align_names, meta_model


@dataclass
class DTensor:
    """One tensor of the diffusers state dict and where it comes from."""

    name: str                       # diffusers name, e.g. "down_blocks.1.attentions.0.proj_in.weight"
    key: str                        # source key holding it
    shape: tuple[int, ...]
    dtype: str                      # source dtype (safetensors name)
    transform: str | None = None    # keymap transform single file -> diffusers
    part: tuple[int, int] | None = None   # rows [a, b) of the (transformed) fused source tensor
    src_bytes: int = 0
    fill: str = ""                  # made, not read (key ""): "identity" (formats/<arch>.toml fill)


def component_tensors(src, det, comp: str) -> list[DTensor]:
    """The component's tensors under diffusers names, in source order."""
    keys = set(det.component_keys.get(comp, []))
    prefix = det.layout.prefixes.get(comp, "")
    ordered = [k for k in src.keys() if k in keys]
    out: list[DTensor] = []
    if det.layout.naming == "diffusers":
        for k in ordered:
            info = src.info(k)
            out.append(DTensor(k[len(prefix):], k, tuple(info.shape), info.dtype,
                               src_bytes=info.nbytes))
        return out
    kind = det.arch.components[comp].keymap
    rels = {k[len(prefix):]: k for k in ordered}
    shapes = {r: tuple(src.info(k).shape) for r, k in rels.items()}
    meta = {r: torch.empty(sh, device="meta") for r, sh in shapes.items()}
    km = keymap.get_map(kind, None, names=list(rels), side="s", sd=meta)
    for rel, name, transform, rows in keymap.diffusers_recipes(kind, km, shapes,
                                                                where=f" of '{comp}'"):
        k = rels[rel]
        info = src.info(k)
        shape = tuple(_bwd(transform, meta[rel]).shape)
        if rows is None:
            out.append(DTensor(name, k, shape, info.dtype, transform, src_bytes=info.nbytes))
        else:
            n = rows[1] - rows[0]
            out.append(DTensor(name, k, (n, *shape[1:]), info.dtype, transform, rows,
                               src_bytes=info.nbytes * n // max(shape[0], 1)))
    return out + _fills(det.arch.components[comp], out)


def _fills(spec, tensors: list[DTensor]) -> list[DTensor]:
    """Weights the architecture's data says a file may lack and what they are then
    (formats/<arch>.toml ``fill``: SD3's CLIP-L text_projection, an identity SAI files leave out)."""
    have = {t.name: t for t in tensors}
    out = []
    for name, rule in spec.fill.items():
        if name in have or not have:
            continue
        like = have.get(rule["identity_of"])
        if like is None:
            continue
        n = like.shape[int(rule.get("dim", 0))]
        out.append(DTensor(name, "", (n, n), like.dtype, fill="identity"))
    return out


def fill_value(t: DTensor) -> torch.Tensor:
    if t.fill == "identity":
        return torch.eye(*t.shape, dtype=dtypes.to_torch(t.dtype))
    raise ValueError(f"unknown fill {t.fill!r}")


def load_tensor(src, t: DTensor, loaded: torch.Tensor | None = None) -> torch.Tensor:
    """The logical (decoded) value of one diffusers-named tensor (``loaded``: its source
    tensor, already read)."""
    if t.fill:
        return fill_value(t)
    v = _bwd(t.transform, src.load(t.key) if loaded is None else loaded)
    return v if t.part is None else v[t.part[0]:t.part[1]]


class StoredWeight:
    """A layer's weight held as stored (fp16/bf16 values, fp8 + scales, NF4 blocks, GGUF
    blocks, ...) and decoded each time the layer runs, as ComfyUI-GGUF and Forge do: a model
    takes about its file's size in memory plus one decoded layer, and computes with exactly the
    values the logical-weights view gives (a fused source tensor's parts share its storage)."""

    __slots__ = ("stored", "decoder", "aux", "transform", "part", "dtype", "device")

    def __init__(self, stored, decoder, aux, transform, part, dtype, device=None):
        self.stored, self.decoder, self.aux = stored, decoder, aux
        self.transform, self.part, self.dtype, self.device = transform, part, dtype, device

    def value(self) -> torch.Tensor:
        from .sources.view import WeightsView

        v = _bwd(self.transform, WeightsView.decode_stored(self.stored, self.decoder, self.aux))
        if self.part is not None:
            v = v[self.part[0]:self.part[1]]
        return v.to(device=self.device, dtype=self.dtype)

    @property
    def nbytes(self) -> int:
        return self.stored.numel() * self.stored.element_size()


_LAZY_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)


def _decode_before(module, args):
    module.weight = module._convkit_stored.value()


def _release_after(module, args, output):
    # a meta placeholder keeps .weight's shape and dtype readable between calls
    module.weight = module._convkit_placeholder


def _hold_stored(m: torch.nn.Module, name: str, sw: StoredWeight) -> bool:
    """Make ``name`` (a Linear/Conv weight of ``m``) a :class:`StoredWeight`; False when
    ``name`` is not such a weight."""
    owner_name, _, leaf = name.rpartition(".")
    if leaf != "weight":
        return False
    owner = m.get_submodule(owner_name) if owner_name else m
    if not isinstance(owner, _LAZY_TYPES) or "weight" not in owner._parameters:
        return False
    meta = owner._parameters.pop("weight")
    owner._convkit_stored = sw
    owner._convkit_placeholder = torch.empty(meta.shape, dtype=sw.dtype, device="meta")
    owner.weight = owner._convkit_placeholder
    owner.register_forward_pre_hook(_decode_before)
    owner.register_forward_hook(_release_after)
    return True


def stored_bytes(m: torch.nn.Module) -> int:
    """Bytes of the weights ``m`` holds in their stored encoding (shared storage once)."""
    seen, total = set(), 0
    for mod in m.modules():
        sw = getattr(mod, "_convkit_stored", None)
        if sw is not None and id(sw.stored) not in seen:
            seen.add(id(sw.stored))
            total += sw.nbytes
    return total


def resolve_config(src, det, comp: str, *, config: dict | None = None,
                   config_source: str = "--config-from", context: dict | None = None,
                   tensors: list[DTensor] | None = None) -> configs.ResolvedConfig:
    """The model config of ``comp`` in ``src`` (given, known or inferred from the shapes),
    without reading a weight."""
    if not det.component_keys.get(comp):
        raise UsageError(f"no '{comp}' in this input; it has: "
                         f"{', '.join(det.component_keys) or 'nothing known'}", path=src.path)
    tensors = tensors if tensors is not None else component_tensors(src, det, comp)
    return configs.resolve(det.arch.name, comp, {t.name: t.shape for t in tensors}, given=config,
                           given_source=config_source, path=src.path, context=context)


def load_component(src, det, comp: str, *, config: dict | None = None,
                   config_source: str = "--config-from", dtype: torch.dtype = torch.float32,
                   keep_stored: bool = False, context: dict | None = None,
                   resolved: configs.ResolvedConfig | None = None
                   ) -> tuple[torch.nn.Module, configs.ResolvedConfig]:
    """``comp`` of ``src`` as an eval-mode module holding the decoded weights in ``dtype``;
    with ``keep_stored``, Linear/Conv weights stay in their stored encoding and are decoded
    to ``dtype`` each time their layer runs (:class:`StoredWeight`). ``resolved``: the config
    :func:`resolve_config` gave (not resolved again)."""
    tensors = component_tensors(src, det, comp)
    r = resolved or resolve_config(src, det, comp, config=config, config_source=config_source,
                                   context=context, tensors=tensors)
    m = meta_model(r.class_name, r.config)
    names = align_names(m.state_dict().keys(), [t.name for t in tensors])
    sd = {}
    last_key, last, stored = None, None, None
    for t in tensors:
        if t.fill:
            v = fill_value(t)
            sd[names[t.name]] = v.to(dtype) if v.is_floating_point() else v
            continue
        # the parts of a fused tensor (Flux qkv) are consecutive: read the source once
        if keep_stored:
            if t.key != last_key:
                last_key, stored = t.key, src.stored_form(t.key)
            sw = StoredWeight(*stored, t.transform, t.part, dtype)
            if _hold_stored(m, names[t.name], sw):
                continue
            v = load_tensor(src, t, src.decode_stored(*stored))
        else:
            if t.key != last_key:
                last_key, last = t.key, src.load(t.key)
            v = load_tensor(src, t, last)
        sd[names[t.name]] = v.to(dtype) if v.is_floating_point() else v
    m.load_state_dict(sd, strict=False, assign=True)
    if hasattr(m, "tie_weights"):   # transformers: tied aliases (T5's embed_tokens) follow
        m.tie_weights()
    _materialise_buffers(m, src.path, comp)
    return m.eval(), r


def _materialise_buffers(m: torch.nn.Module, path, comp: str) -> None:
    """Buffers a file does not carry (transformers keeps ``position_ids`` out of the state
    dict) are still on the meta device after assignment: recreate the known ones."""
    for name, buf in list(m.named_buffers()):
        if buf.device.type != "meta":
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = m.get_submodule(owner_name) if owner_name else m
        if leaf == "position_ids":
            new = torch.arange(buf.shape[-1], dtype=buf.dtype).expand(buf.shape).contiguous()
        else:
            raise InputFormatError(f"'{comp}' has no value for its buffer '{name}'", path=path)
        persistent = leaf not in getattr(owner, "_non_persistent_buffers_set", set())
        owner.register_buffer(leaf, new, persistent=persistent)
    missing = [n for n, p in m.named_parameters() if p.device.type == "meta"]
    if missing:
        raise InputFormatError(f"'{comp}' lacks {len(missing)} weights, e.g. {missing[0]}",
                               path=path)
