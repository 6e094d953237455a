"""UNet2DConditionModel <-> LDM/SGM UNet: block index arithmetic from the model structure.

LDM numbers its TimestepEmbedSequential blocks flatly:

* ``input_blocks.0`` is conv_in; then for each level ``l`` and each of its ``layers_per_block``
  layers ``j``: ``input_blocks.{1 + l*(lpb+1) + j}`` = ``[resnet, attention?]``; after every level but
  the last one more block ``input_blocks.{(l+1)*(lpb+1)}.0.op`` is the downsampler.
* ``middle_block.{0,1,2}`` = resnet, attention, resnet.
* diffusers ``up_blocks.u`` (u = 0 is the deepest level) has ``lpb+1`` layers:
  ``output_blocks.{u*(lpb+1) + j}`` = ``[resnet, attention?, upsampler?]``, the upsampler on the last
  layer of every up block but the last, at slot 2 if the level has attention else slot 1.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ._data import load_toml
from ._engine import Block, TableMap


@dataclass(frozen=True)
class UNetStructure:
    levels: int
    layers_per_block: int
    down_attn: tuple[bool, ...]
    up_attn: tuple[bool, ...]
    mid_attn: bool = True
    has_mid: bool = True
    add_embedding: bool = False
    class_embedding: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> "UNetStructure":
        down = cfg.get("down_block_types") or ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
        up = cfg.get("up_block_types") or ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
        lpb = cfg.get("layers_per_block", 2)
        if isinstance(lpb, (list, tuple)):
            if len(set(lpb)) != 1:
                raise ValueError("per-level layers_per_block is not supported by the LDM layout")
            lpb = lpb[0]
        mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        return cls(
            levels=len(down),
            layers_per_block=int(lpb),
            down_attn=tuple("CrossAttn" in t for t in down),
            up_attn=tuple("CrossAttn" in t for t in up),
            mid_attn=mid is not None and "CrossAttn" in mid,
            has_mid=mid is not None,
            add_embedding=cfg.get("addition_embed_type") == "text_time",
            class_embedding=cfg.get("class_embed_type") in ("timestep", "projection"),
        )

    @classmethod
    def from_diffusers_names(cls, names) -> "UNetStructure":
        names = list(names)
        levels = 1 + max(int(m.group(1)) for n in names
                         if (m := re.match(r"down_blocks\.(\d+)\.", n)))
        lpb = 1 + max(int(m.group(1)) for n in names
                      if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n)))
        down = tuple(any(n.startswith(f"down_blocks.{l}.attentions.") for n in names)
                     for l in range(levels))
        up = tuple(any(n.startswith(f"up_blocks.{u}.attentions.") for n in names)
                   for u in range(levels))
        return cls(levels, lpb, down, up,
                   mid_attn=any(n.startswith("mid_block.attentions.") for n in names),
                   has_mid=any(n.startswith("mid_block.") for n in names),
                   add_embedding=any(n.startswith("add_embedding.") for n in names),
                   class_embedding=any(n.startswith("class_embedding.") for n in names))

    @classmethod
    def from_single_names(cls, names) -> "UNetStructure":
        names = list(names)
        n_out = 1 + max(int(m.group(1)) for n in names
                        if (m := re.match(r"output_blocks\.(\d+)\.", n)))
        ops = sorted({int(m.group(1)) for n in names
                      if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", n))})
        # the first downsampler sits right after the first level's lpb layers
        lpb = ops[0] - 1 if ops else n_out - 1
        levels = n_out // (lpb + 1)
        has = set()
        for n in names:
            m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.1\.", n)
            if m:
                has.add((m.group(1), int(m.group(2))))
        down = tuple(("input_blocks", 1 + l * (lpb + 1)) in has for l in range(levels))
        up = tuple(("output_blocks", u * (lpb + 1)) in has for u in range(levels))
        return cls(levels, lpb, down, up,
                   mid_attn=any(n.startswith("middle_block.1.") for n in names),
                   has_mid=any(n.startswith("middle_block.") for n in names),
                   add_embedding=any(n.startswith("label_emb.") for n in names))


def unet_blocks(st: UNetStructure) -> list[Block]:
    data = load_toml("unet_ldm")
    res, attn = data["resnet"], None  # attention: identity names
    lay = data["layout"]
    rs, as_ = lay["resnet_slot"], lay["attention_slot"]
    blocks = [Block(d, s) for d, s in data["top"].items()]
    if st.add_embedding:
        blocks += [Block(d, s) for d, s in data["add_embedding"].items()]
    if st.class_embedding:
        blocks += [Block(d, s) for d, s in data["class_embedding"].items()]
    lpb = st.layers_per_block
    for l in range(st.levels):
        for j in range(lpb):
            i = 1 + l * (lpb + 1) + j
            blocks.append(Block(f"down_blocks.{l}.resnets.{j}", f"input_blocks.{i}.{rs}", res))
            if st.down_attn[l]:
                blocks.append(Block(f"down_blocks.{l}.attentions.{j}", f"input_blocks.{i}.{as_}", attn))
        if l < st.levels - 1:
            i = (l + 1) * (lpb + 1)
            for dsub, ssub in data["downsample"].items():
                blocks.append(Block(f"down_blocks.{l}.downsamplers.0.{dsub}", f"input_blocks.{i}.0.{ssub}"))
    if st.has_mid:
        r = a = 0
        for slot, what in enumerate(lay["middle"]):
            if what == "resnet":
                blocks.append(Block(f"mid_block.resnets.{r}", f"middle_block.{slot}", res))
                r += 1
            elif st.mid_attn:
                blocks.append(Block(f"mid_block.attentions.{a}", f"middle_block.{slot}", attn))
                a += 1
    for u in range(st.levels):
        for j in range(lpb + 1):
            i = u * (lpb + 1) + j
            blocks.append(Block(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{i}.{rs}", res))
            if st.up_attn[u]:
                blocks.append(Block(f"up_blocks.{u}.attentions.{j}", f"output_blocks.{i}.{as_}", attn))
            if j == lpb and u < st.levels - 1:
                slot = 2 if st.up_attn[u] else 1
                for dsub, ssub in data["upsample"].items():
                    blocks.append(Block(f"up_blocks.{u}.upsamplers.0.{dsub}", f"output_blocks.{i}.{slot}.{ssub}"))
    return blocks


def unet_map(st: UNetStructure) -> TableMap:
    return TableMap("unet", unet_blocks(st))
