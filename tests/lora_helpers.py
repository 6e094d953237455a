"""Shared LoRA test helpers: random factors over the tiny model's real modules, format writers."""
from __future__ import annotations

import os

import safetensors.torch as st
import torch

from convkit import keymap
from convkit.sources import open_source

TE_PRE = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def modules(model, comp):
    """(name as kohya/PEFT write it, real module name, weight) for every Linear/Conv2d."""
    for name, mod in model.components[comp].named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and "embed" not in name \
                and "projection" not in name:
            n = name if comp == "unet" or name.startswith("text_model") else "text_model." + name
            yield n, name, mod.weight.detach()


def random_factors(model, seed=1, rank=2, comps=("unet", "text_encoder", "text_encoder_2")):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for comp in comps:
        for n, name, w in modules(model, comp):
            r = min(rank, w.shape[0])
            down = torch.randn(r, *w.shape[1:], generator=g) * 0.1
            up = torch.randn(w.shape[0], r, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
            out[(comp, n, name)] = (up, down, float(r) / 2)   # alpha = rank/2 -> scale 0.5
    return out


def delta(up, down, alpha, shape):
    return (up.flatten(1) @ down.flatten(1) * (alpha / down.shape[0])).reshape(shape)


def kohya_diffusers_paths(f):
    sd = {}
    for (comp, n, _), (up, down, a) in f.items():
        k = TE_PRE[comp] + n.replace(".", "_")
        sd |= {k + ".lora_down.weight": down, k + ".lora_up.weight": up, k + ".alpha": torch.tensor(a)}
    return sd


def peft(f, up_suffix=".lora_B.weight", down_suffix=".lora_A.weight", fold=True):
    sd = {}
    for (comp, n, _), (up, down, a) in f.items():
        k = f"{comp}.{n}"
        s = a / down.shape[0]
        sd |= {k + down_suffix: down, k + up_suffix: up * s if fold else up}
        if not fold:
            sd[k + ".alpha"] = torch.tensor(a)
    return sd



def diffusers_state(path):
    """{component: {name: tensor}} of a merged output, single file or folder."""
    if os.path.isdir(path):
        with open_source(path) as s:
            out = {}
            for k in s.keys():
                c, _, n = k.partition("/")
                out.setdefault(c, {})[n] = s.load(k)
            return out
    return keymap.arch_to_diffusers("sdxl", st.load_file(str(path)))


def expected(model, f, w):
    exp = {}
    for (comp, _, name), (up, down, a) in f.items():
        base = model.components[comp].state_dict()[name + ".weight"]
        exp[(comp, name)] = base + w * delta(up, down, a, base.shape)
    return exp


def assert_matches(out, exp, atol=1e-6):
    for (comp, name), ref in exp.items():
        got = out[comp][name + ".weight"]
        torch.testing.assert_close(got, ref, atol=atol, rtol=1e-5, msg=f"{comp}.{name}")
