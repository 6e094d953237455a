"""convkit verify on SD3.5 (tiny sd35_large, real diffusers classes): StableDiffusion3Pipeline
rendered in stages through the stored weights, flow-matching Euler with the model's shift 3.0,
guidance and sampler from formats/verify/render.toml; an fp16 convert passes the fp16 gate
against its fp32 source, a NaN in the transformer fails it. The Turbo variant, told by its file
name, renders with its own defaults (4 steps, guidance 0)."""
from __future__ import annotations

import json

import pytest
import safetensors.torch as st

from convkit import tiny
from convkit.convert import convert
from tests.test_read_path_bad_input import one_line, run

pytestmark = pytest.mark.xdist_group("verify-sd3")
FAST = ["--size", "32", "--steps", "2"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify-sd3")
    m = tiny.build("sd35_large", 0)
    single = tiny.save_single_file(m, d / "sd35.safetensors")
    # tokenizers and configs: the tiny text encoders have tiny vocabularies
    folder = tiny.save_diffusers(m, d / "folder", weights=False)
    convert(single, d / "sd35-fp16.safetensors", "fp16")
    prompts = d / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n")
    return {"fp32": single, "fp16": d / "sd35-fp16.safetensors", "folder": folder,
            "prompts": prompts, "dir": d}


def test_fp16_passes_and_a_nan_in_the_transformer_fails(sd35, tmp_path):
    code, out = run("verify", sd35["fp16"], "-r", sd35["fp32"], "--config-from", sd35["folder"],
                    "--prompts", sd35["prompts"], *FAST, "--json")
    assert code == 0, out
    d = json.loads(out)
    a = d["artifacts"][0]
    s = a["render"]["settings"]
    assert (s["sampler"], s["guidance"], s["steps"]) == ("flow-euler", 3.5, 2)
    assert a["kind"] == "fp16" and a["ok"], a
    assert a["mean"]["psnr"] > 40, a

    # a NaN in the MMDiT's final layer: the artifact's own weights reach the sampler
    sd = st.load_file(str(sd35["fp16"]))
    k = "model.diffusion_model.final_layer.linear.weight"
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    st.save_file(sd, str(bad))
    code, out = run("verify", bad, "-r", sd35["fp32"], "--config-from", sd35["folder"],
                    "--prompts", sd35["prompts"], *FAST)
    assert code == 10, out
    line = one_line(out)
    assert "nan.safetensors" in line and "NaN/Inf in the latents after step 1" in line, line


def test_turbo_renders_with_its_own_defaults(sd35):
    """sd3.5_large_turbo's file name makes it the Turbo variant: 4 steps without guidance
    (the dry run resolves the settings without rendering)."""
    turbo = sd35["dir"] / "sd3.5_large_turbo.safetensors"
    if not turbo.exists():
        turbo.symlink_to(sd35["fp16"])
    code, out = run("verify", turbo, "-r", turbo, "--config-from", sd35["folder"],
                    "--prompts", sd35["prompts"], "--size", "32", "--dry-run", "--json")
    assert code == 0, out
    d = json.loads(out)
    assert d["settings"]["guidance"] == 0.0 and d["settings"]["steps"] == 4, d
    assert d["settings"]["sampler"] == "flow-euler"
    code, out = run("verify", turbo, "-r", turbo, "--size", "40", "--dry-run")
    assert code == 2 and "multiple of 16" in one_line(out)


def test_sd3_pipeline_pieces_come_from_data():
    """Without a model folder the scheduler is the one convkit ships for the architecture
    (formats/configs/<arch>/scheduler.json: flow-matching Euler, shift 3.0), and the pipeline's
    slots follow formats/<arch>.toml (each text encoder's tokenizer; the IP-Adapter slots the
    release leaves empty)."""
    import inspect

    import diffusers

    from convkit import archs
    from convkit.render import pipeline_slots, scheduler_for
    from convkit.verify.settings import settings_for

    for name in ("sd3_medium", "sd35_medium", "sd35_large", "sd35_large_turbo"):
        a = archs.get(name)
        s = settings_for(name, None)
        sch = scheduler_for(a, [], s.scheduler_class, **s.scheduler_overrides)
        assert type(sch).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert sch.config.shift == 3.0 and not sch.config.use_dynamic_shifting
        slots = pipeline_slots(a)
        assert {"tokenizer", "tokenizer_2", "tokenizer_3", "image_encoder"} <= set(slots)
        init = set(inspect.signature(getattr(diffusers, a.pipeline).__init__).parameters)
        assert init - {"self", "scheduler"} == set(slots)
    assert [settings_for(n, None).guidance for n in
            ("sd3_medium", "sd35_medium", "sd35_large", "sd35_large_turbo")] == [7.0, 4.5, 3.5, 0.0]
