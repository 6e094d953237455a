"""AutoencoderKL <-> LDM autoencoder: level arithmetic from the model structure.

Encoder levels keep their order (``down_blocks.i`` <-> ``down.i``); decoder levels are numbered
from the other end (diffusers ``up_blocks.i`` <-> LDM ``up.{L-1-i}``). Every level but the last
(in each direction) has a down/upsampler. The mid block is block_1, attn_1, block_2.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ._data import load_toml
from ._engine import Block, TableMap


@dataclass(frozen=True)
class VAEStructure:
    levels: int = 4
    enc_layers: int = 2          # resnets per encoder level (layers_per_block)
    dec_layers: int = 3          # resnets per decoder level (layers_per_block + 1)

    @classmethod
    def from_config(cls, cfg: dict) -> "VAEStructure":
        lpb = int(cfg.get("layers_per_block", 2))
        levels = len(cfg.get("block_out_channels") or cfg.get("down_block_types") or [0] * 4)
        return cls(levels, lpb, lpb + 1)

    @classmethod
    def _count(cls, names, rx_level, rx_layer) -> tuple[int, int]:
        levels = layers = 0
        for n in names:
            m = re.match(rx_level, n)
            if m:
                levels = max(levels, int(m.group(1)) + 1)
            m = re.match(rx_layer, n)
            if m:
                layers = max(layers, int(m.group(1)) + 1)
        return levels, layers

    @classmethod
    def from_diffusers_names(cls, names) -> "VAEStructure":
        names = list(names)
        lv, enc = cls._count(names, r"encoder\.down_blocks\.(\d+)\.", r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        _, dec = cls._count(names, r"decoder\.up_blocks\.(\d+)\.", r"decoder\.up_blocks\.0\.resnets\.(\d+)\.")
        return cls(lv, enc, dec)

    @classmethod
    def from_single_names(cls, names) -> "VAEStructure":
        names = list(names)
        lv, enc = cls._count(names, r"encoder\.down\.(\d+)\.", r"encoder\.down\.0\.block\.(\d+)\.")
        _, dec = cls._count(names, r"decoder\.up\.(\d+)\.", r"decoder\.up\.0\.block\.(\d+)\.")
        return cls(lv, enc, dec)


def vae_blocks(st: VAEStructure) -> list[Block]:
    data = load_toml("vae_ldm")
    res, attn = data["resnet"], data["attention"]
    conv = frozenset(data["attention_transform"]["conv1x1"])
    lay = data["layout"]
    blocks = [Block(d, s) for d, s in data["top"].items()]
    L = st.levels
    for i in range(L):
        for j in range(st.enc_layers):
            blocks.append(Block(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", res))
        if i < L - 1:
            for dsub, ssub in data["downsample"].items():
                blocks.append(Block(f"encoder.down_blocks.{i}.downsamplers.0.{dsub}", f"encoder.down.{i}.{ssub}"))
    for i in range(L):
        k = L - 1 - i
        for j in range(st.dec_layers):
            blocks.append(Block(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{k}.block.{j}", res))
        if i < L - 1:
            for dsub, ssub in data["upsample"].items():
                blocks.append(Block(f"decoder.up_blocks.{i}.upsamplers.0.{dsub}", f"decoder.up.{k}.{ssub}"))
    for side in ("encoder", "decoder"):
        for r, name in enumerate(lay["mid_resnets"]):
            blocks.append(Block(f"{side}.mid_block.resnets.{r}", f"{side}.mid.{name}", res))
        blocks.append(Block(f"{side}.mid_block.attentions.0", f"{side}.mid.{lay['mid_attention']}", attn, conv))
    return blocks


def vae_map(st: VAEStructure) -> TableMap:
    return TableMap("vae", vae_blocks(st))
