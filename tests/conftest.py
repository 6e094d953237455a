import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import pytest
import safetensors.torch as st
import torch

# A synthetic SGM-style file with the detection keys of SDXL base; used where a test needs a
# recognised layout but not real weights (real tiny models are built in test_fixtures).
SDXL_MARKERS = {
    "model.diffusion_model.label_emb.0.0.weight": (8, 16),
    "model.diffusion_model.input_blocks.8.0.in_layers.0.weight": (8,),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 8),
    "conditioner.embedders.1.model.ln_final.weight": (8,),
    "first_stage_model.decoder.conv_out.weight": (3, 8, 3, 3),
}


@pytest.fixture
def sdxl_like(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in SDXL_MARKERS.items()}
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77).unsqueeze(0)
    path = tmp_path / "sdxl_like.safetensors"
    st.save_file(sd, path, metadata={"modelspec.title": "synthetic"})
    return path, sd


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    """A tiny SDXL (real classes, seed 0) as an SGM single file and a diffusers folder."""
    from convkit import tiny

    d = tmp_path_factory.mktemp("sdxl")
    m = tiny.build("sdxl", 0)
    single = tiny.save_single_file(m, d / "base.safetensors")
    folder = tiny.save_diffusers(m, d / "base_diffusers")
    return m, single, folder, d


@pytest.fixture(scope="session")
def factors(sdxl):
    from tests.lora_helpers import random_factors

    return random_factors(sdxl[0])
