import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import pytest
import safetensors.torch as st
import torch

# One test process per core (pytest-xdist): each keeps to one intra-op thread, so two workers
# rendering at once do not run four threads on two cores (measured: the suite took longer
# oversubscribed). Subprocesses a test starts pick their own.
if os.environ.get("PYTEST_XDIST_WORKER") and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT",
                                                                 "1")) > 1:
    torch.set_num_threads(1)

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


# --- recipes (issue 11): the shipped lightning-merge recipe run once on the demo model --------
# shared by test_recipes.py and test_publish.py (both in xdist group "recipes", one worker)
TWO_PROMPTS = """
[[prompts]]
name = "red-circle"
seed = 1
text = "a red circle on a blue background"
[[prompts]]
name = "green-square"
seed = 2
text = "a green square on a yellow background"
"""


@pytest.fixture(scope="session")
def recipe_env(tmp_path_factory):
    """A cache of its own (demo inputs, reference renders) and a 2-prompt set that trims the
    recipes' renders to a third of the demo set's."""
    d = tmp_path_factory.mktemp("recipes")
    prompts = d / "two.toml"
    prompts.write_text(TWO_PROMPTS)
    old = os.environ.get("CONVKIT_CACHE")
    os.environ["CONVKIT_CACHE"] = str(d / "cache")
    yield {"dir": d, "prompts": prompts}
    if old is None:
        os.environ.pop("CONVKIT_CACHE", None)
    else:
        os.environ["CONVKIT_CACHE"] = old


@pytest.fixture(scope="session")
def lightning_release(recipe_env):
    """``convkit run lightning-merge`` on the demo model: (output folder, --json result)."""
    import json

    from click.testing import CliRunner
    from convkit.cli import main

    out = recipe_env["dir"] / "lightning"
    # all but verify-merge: its 25-step reference renders are the demo scenario's check,
    # which test_verify_demo runs in full
    only = ["fp16", "unet", "fp8", "nf4", "q8", "q4ks", "verify-variants"]
    r = CliRunner().invoke(main, ["run", "lightning-merge", "-o", str(out), "--json",
                                  "--set", f"prompts={recipe_env['prompts']}",
                                  *[x for n in only for x in ("--only", n)]])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.output)
