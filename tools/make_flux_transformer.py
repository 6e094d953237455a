"""Full-size random FLUX.1-dev transformer-only checkpoint (BFL names, no prefix, bf16).

Like the released ``flux1-dev.safetensors``: only the diffusion model, with the BFL key names
(``double_blocks.0.img_attn.qkv.weight`` ...), no ``model.diffusion_model.`` prefix. Values
N(0, 0.02), seed 0, streamed one tensor at a time through convkit's own writer (~23.8 GB).

    python tools/make_flux_transformer.py bench/data/flux_transformer_bf16.safetensors [--arch flux_dev]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from convkit.tiny.full_size import full_size_shapes
from convkit.writer import OutSpec, SafetensorsWriter

PREFIX = "model.diffusion_model."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--arch", default="flux_dev")
    a = ap.parse_args()
    shapes = full_size_shapes(a.arch)
    specs = [OutSpec(k[len(PREFIX):], "BF16", tuple(s)) for k, s in shapes.items() if k.startswith(PREFIX)]
    total = sum(s.nbytes for s in specs)
    print(f"generating {a.out} ({len(specs)} tensors, {total / 1e9:.2f} GB) ...", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with SafetensorsWriter(a.out, specs, {"convkit.bench": f"random full-size {a.arch} transformer"}) as w:
        for s in specs:
            w.write(s.name, (torch.randn(s.shape, generator=g) * 0.02).to(torch.bfloat16))
    print(f"generated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
