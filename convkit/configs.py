"""Which diffusers/transformers config describes a set of weights.

A component's weights (diffusers names -> shapes) are matched, in order, against a config the
user gives (``--config-from``), the architecture's released config (``formats/configs/``) and
convkit's tiny and demo model configs; when none fits, the config is *inferred*: every field the
shapes determine is read from them and the rest comes from the released config and the rules
in ``formats/configs/infer.toml``. Whatever the source, the config is accepted only when the
model it builds has exactly the weights' names and shapes (no missing or unexpected keys).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from . import data
from .errors import InputFormatError

Shapes = Mapping[str, tuple[int, ...]]


@dataclass
class ResolvedConfig:
    config: dict           # with "_class_name"
    source: str            # where it came from, for messages and reports

    @property
    def class_name(self) -> str:
        return self.config["_class_name"]


def mismatch(cls_name: str, config: dict, shapes: Shapes) -> list[str]:
    """What differs between the model ``config`` builds and ``shapes`` (empty: they fit)."""
    from .models import align_names, meta_shapes, tied_aliases

    try:
        want = meta_shapes(cls_name, config)
        tied = tied_aliases(cls_name, config)
    except Exception as e:  # a config the class rejects fits nothing
        return [f"the config does not build a {cls_name} ({type(e).__name__}: {e})"]
    want = {k: v for k, v in want.items() if not _optional_buffer(k) and k not in tied}
    names = align_names(want, shapes)
    got = {names[k]: tuple(v) for k, v in shapes.items() if not _optional_buffer(k)}
    problems = [f"missing {k}" for k in want if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in want]
    problems += [f"{k}: {list(got[k])}, the model has {list(s)}" for k, s in want.items()
                 if k in got and got[k] != s]
    return problems


def _optional_buffer(name: str) -> bool:
    # buffers a file may or may not carry (transformers recreates them)
    return name.endswith("position_ids")


def known_configs(arch: str, component: str) -> Iterable[tuple[str, dict]]:
    """(source, config) of the configs convkit knows for ``arch``'s ``component``."""
    from .keymap._data import load_config

    try:
        yield (f"the released {arch} {component} config (formats/configs/{arch}/{component}.json)",
               dict(load_config(arch, component)))
    except OSError:
        pass
    from . import tiny

    try:
        c = tiny.spec(arch)["components"][component]
        yield f"convkit's tiny {arch} model config", {"_class_name": c["class"], **c["config"]}
    except (KeyError, LookupError):
        pass
    demo = tiny.demo_spec()
    if demo and demo.get("arch") == arch and component in demo["components"]:
        yield "convkit's demo model config (convkit/tiny/demo/demo.json)", \
            dict(demo["components"][component])


def resolve(arch: str, component: str, shapes: Shapes, *, given: dict | None = None,
            given_source: str = "--config-from", path=None, context: dict | None = None,
            hint: str = "give the model's diffusers folder (or one with its config.json) as "
                        "--config-from") -> ResolvedConfig:
    """The config of ``arch``'s ``component`` whose model has exactly ``shapes``.
    ``context``: what other components of the same model say (``pooled_dim``: the width of
    the pooled text embedding the UNet's added embedding takes)."""
    if given is not None:
        probs = mismatch(given["_class_name"], given, shapes)
        if probs:
            raise InputFormatError(f"the weights of '{component}' do not fit the config from "
                                   f"{given_source}: " + "; ".join(probs[:4]), path=path)
        return ResolvedConfig(dict(given), given_source)
    base = None
    for source, cfg in known_configs(arch, component):
        base = base or cfg
        if not mismatch(cfg["_class_name"], cfg, shapes):
            return ResolvedConfig(cfg, source)
    if base is None:
        raise InputFormatError(f"no config known for {arch} '{component}'", path=path)
    try:
        cfg = infer(arch, base, shapes, context)
    except InputFormatError as e:
        raise InputFormatError(f"cannot tell the config of this {arch} '{component}': "
                               f"{e.detail}", path=path, hint=hint) from None
    probs = mismatch(cfg["_class_name"], cfg, shapes)
    if probs:
        raise InputFormatError(
            f"cannot tell the config of this {arch} '{component}': its shapes fit no known config "
            "and the one inferred from them does not build the same model (" +
            "; ".join(probs[:4]) + ")", path=path, hint=hint)
    return ResolvedConfig(cfg, f"inferred from the tensor shapes ({arch} {component}; the "
                               "fields shapes do not determine from formats/configs/infer.toml "
                               "and the released config)")


def infer(arch: str, base: dict, shapes: Shapes, context: dict | None = None) -> dict:
    """``base`` with every field the shapes (and ``context``) determine replaced by what they
    say."""
    cls = base["_class_name"]
    fn = _INFER.get(cls)
    if fn is None:
        raise InputFormatError(f"convkit cannot infer a {cls} config from shapes")
    return fn(arch, copy.deepcopy(base), dict(shapes), context or {})


# ----------------------------------------------------------------------------- per class


def _rules() -> dict:
    return data.load_toml("configs/infer.toml")


def _groups(channels: Iterable[int], released: int | None) -> int:
    chans = list(channels)
    prefer = ([released] if released else []) + list(_rules()["norm_groups"]["prefer"])
    return next(g for g in prefer if all(c % g == 0 for c in chans))


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _unet(arch: str, cfg: dict, s: Shapes, context: dict) -> dict:
    from .keymap.unet import UNetStructure

    st = UNetStructure.from_diffusers_names(s)       # levels, layers, where attention sits
    n, lpb = st.levels, st.layers_per_block
    down_attn, up_attn = list(st.down_attn), list(st.up_attn)
    chans = [s[f"down_blocks.{l}.resnets.0.conv2.weight"][0] for l in range(n)]
    depth = [len(_indices(s, rf"down_blocks\.{l}\.attentions\.0\.transformer_blocks\.(\d+)\."))
             for l in range(n)]
    mid_depth = len(_indices(s, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))
    cfg.update(
        in_channels=s["conv_in.weight"][1], out_channels=s["conv_out.weight"][0],
        block_out_channels=chans, layers_per_block=lpb,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        norm_num_groups=_groups(chans, cfg.get("norm_num_groups")),
    )
    cfg["mid_block_type"] = (None if not st.has_mid else
                             "UNetMidBlock2DCrossAttn" if st.mid_attn else "UNetMidBlock2D")
    proj = next((v for k, v in s.items() if k.endswith("attentions.0.proj_in.weight")), None)
    if proj is not None:
        cfg["use_linear_projection"] = len(proj) == 2
    k2 = next((v for k, v in s.items() if k.endswith("attn2.to_k.weight")), None)
    if k2 is not None:
        cfg["cross_attention_dim"] = k2[1]
    # transformer depth per level (diffusers reads the mid block's from the last entry, so a
    # last level without attention carries the mid block's depth there), and per up-block
    # layer when the up path is not the mirrored down path (SSD-1B / Vega prune them apart)
    if any(depth) or mid_depth:
        per_level = [d if a else 1 for d, a in zip(depth, down_attn)]
        if mid_depth and not down_attn[-1]:
            per_level[-1] = mid_depth
        cfg["transformer_layers_per_block"] = per_level
        up = [[len(_indices(s, rf"up_blocks\.{u}\.attentions\.{j}\.transformer_blocks\.(\d+)\."))
               for j in range(lpb + 1)] if up_attn[u] else [1] * (lpb + 1) for u in range(n)]
        mirrored = [[per_level[n - 1 - u]] * (lpb + 1) if up_attn[u] else [1] * (lpb + 1)
                    for u in range(n)]
        if up != mirrored:
            cfg["reverse_transformer_layers_per_block"] = up
        else:
            cfg.pop("reverse_transformer_layers_per_block", None)
    rules = _rules()["unet_heads"]
    heads = rules.get(arch, rules["default"])
    if "heads" in heads:
        cfg["attention_head_dim"] = heads["heads"]
    else:
        cfg["attention_head_dim"] = [max(1, c // heads["head_width"]) for c in chans]
    if st.add_embedding:
        cfg["addition_embed_type"] = "text_time"
        proj_in = s["add_embedding.linear_1.weight"][1]
        cfg["projection_class_embeddings_input_dim"] = proj_in
        # proj_in = pooled text width + ids x addition_time_embed_dim (infer.toml [time_ids]); the
        # split is not in the UNet's shapes but in the text encoder's: the pooled width is its
        # projection (context), else the released value must leave one
        ids = _rules()["time_ids"].get(arch, _rules()["time_ids"]["default"])
        pooled = context.get("pooled_dim")
        if pooled and (proj_in - pooled) > 0 and (proj_in - pooled) % ids == 0:
            cfg["addition_time_embed_dim"] = (proj_in - pooled) // ids
        elif ids * int(cfg.get("addition_time_embed_dim") or 0) >= proj_in:
            raise InputFormatError(
                f"its addition_time_embed_dim is not in its shapes (the added embedding takes "
                f"{proj_in} values; the released {cfg.get('addition_time_embed_dim')} x {ids} "
                "leaves none for the pooled text)")
    te = s.get("time_embedding.linear_1.weight")
    if te is not None and te[0] != 4 * chans[0]:
        cfg["time_embedding_dim"] = te[0]
    return cfg


def _clip_text(arch: str, cfg: dict, s: Shapes, context: dict) -> dict:
    pre = "text_model." if any(k.startswith("text_model.") for k in s) else ""
    tok = s[f"{pre}embeddings.token_embedding.weight"]
    pos = s[f"{pre}embeddings.position_embedding.weight"]
    layers = _indices(s, rf"{re.escape(pre)}encoder\.layers\.(\d+)\.")
    fc1 = s[f"{pre}encoder.layers.0.mlp.fc1.weight"]
    width = tok[1]
    cfg.update(vocab_size=tok[0], hidden_size=width, max_position_embeddings=pos[0],
               num_hidden_layers=len(layers), intermediate_size=fc1[0])
    rule = _rules()["text_encoder_heads"]
    hw = rule["head_width"]
    cfg["num_attention_heads"] = width // hw if width % hw == 0 else \
        next(h for h in rule["fallback_heads"] if width % h == 0)
    if "text_projection.weight" in s:
        cfg["projection_dim"] = s["text_projection.weight"][0]
    return cfg


def _vae(arch: str, cfg: dict, s: Shapes, context: dict) -> dict:
    levels = _indices(s, r"encoder\.down_blocks\.(\d+)\.")
    chans = [s[f"encoder.down_blocks.{l}.resnets.0.conv2.weight"][0] for l in levels]
    lpb = len(_indices(s, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    cfg.update(
        in_channels=s["encoder.conv_in.weight"][1], out_channels=s["decoder.conv_out.weight"][0],
        latent_channels=s["decoder.conv_in.weight"][1], block_out_channels=chans,
        layers_per_block=lpb, norm_num_groups=_groups(chans, cfg.get("norm_num_groups")),
        down_block_types=["DownEncoderBlock2D"] * len(chans),
        up_block_types=["UpDecoderBlock2D"] * len(chans),
    )
    cfg["mid_block_add_attention"] = any(k.startswith("encoder.mid_block.attentions.") for k in s)
    cfg["use_quant_conv"] = "quant_conv.weight" in s
    cfg["use_post_quant_conv"] = "post_quant_conv.weight" in s
    return cfg


def _sd3_transformer(arch: str, cfg: dict, s: Shapes, context: dict) -> dict:
    """SD3Transformer2DModel: depth, widths, dual attention and q/k norms from the shapes (as
    diffusers' own single-file converter and ComfyUI's model_detection.py read them)."""
    blocks = _indices(s, r"transformer_blocks\.(\d+)\.")
    proj = s["pos_embed.proj.weight"]                       # [hidden, in, patch, patch]
    hidden = proj[0]
    hw = int(_rules()["mmdit_heads"]["head_width"])
    if hidden % hw:
        raise InputFormatError(f"hidden size {hidden} is not a multiple of the {hw}-wide heads")
    cfg.update(num_layers=len(blocks), in_channels=proj[1], patch_size=proj[2],
               attention_head_dim=hw, num_attention_heads=hidden // hw,
               caption_projection_dim=hidden, joint_attention_dim=s["context_embedder.weight"][1],
               pooled_projection_dim=s["time_text_embed.text_embedder.linear_1.weight"][1],
               out_channels=s["proj_out.weight"][0] // (proj[2] * proj[3]))
    pos = s.get("pos_embed.pos_embed")
    if pos is not None:
        side = int(round(pos[1] ** 0.5))
        if side * side != pos[1]:
            raise InputFormatError(f"pos_embed holds {pos[1]} positions, not a square grid")
        cfg["pos_embed_max_size"] = side
    dual = _indices(s, r"transformer_blocks\.(\d+)\.attn2\.")
    if dual:
        cfg["dual_attention_layers"] = dual
    else:
        cfg.pop("dual_attention_layers", None)
    cfg["qk_norm"] = "rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in s else None
    return cfg


_INFER = {
    "UNet2DConditionModel": _unet,
    "CLIPTextModel": _clip_text,
    "CLIPTextModelWithProjection": _clip_text,
    "AutoencoderKL": _vae,
    "SD3Transformer2DModel": _sd3_transformer,
}
