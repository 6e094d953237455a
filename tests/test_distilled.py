"""The distilled SDXL family as users meet it (issue 12, item 3), on the trained demo SDXL:

* LCM-LoRA: kohya names over diffusers module paths (latent-consistency/lcm-lora-sdxl, trained
  by diffusers' train_lcm_distill_lora_sdxl.py: rank 64, an alpha, convs included) merges with
  zero unmatched keys and W + up@down·alpha/r·weight; the merge, stated `--sampler lcm`, gets
  the LCM scheduler from verify (and in a diffusers folder made from it).
* the 1-step Lightning model predicts x0, which nothing in its keys says: `--prediction sample`
  is recorded and carried by every later command (convert, a diffusers folder's scheduler,
  quantize fp8 / nf4 / gguf, split, assemble), and verify reads it.
* SDXL-Turbo's modelspec.* metadata is kept by every command that writes a model.
"""
from __future__ import annotations

import json

import pytest
import safetensors.torch as st
import torch

from convkit import archs, sampling
from convkit.loading import load_component
from convkit.sources import open_source
from convkit.tiny import DEMO_DIR
from tests.test_read_path_bad_input import one_line, run

pytestmark = pytest.mark.xdist_group("distilled")   # the module's files are built once

# the LoRA target modules of diffusers' train_lcm_distill_lora_sdxl.py (PEFT matches a module
# whose name is or ends with one of them): what lcm-lora-sdxl covers, convs included
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
               "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
               "upsamplers.0.conv", "time_emb_proj")
LCM_RANK, LCM_ALPHA = 64, 8.0

# the modelspec keys of Stability AI's released SDXL-Turbo single file (ModelSpec 1.0.0 names:
# sai_model_spec, architecture, implementation, title, ...); prediction_type is left out so
# that a stated one (below) cannot change any of these values
TURBO_SPEC = {"modelspec.sai_model_spec": "1.0.0",
              "modelspec.architecture": "stable-diffusion-xl-v1-base",
              "modelspec.implementation": "sgm",
              "modelspec.title": "Stable Diffusion XL Turbo (demo)",
              "modelspec.author": "StabilityAI",
              "modelspec.date": "2023-11-28",
              "modelspec.resolution": "512x512",
              "modelspec.license": "sai-nc-community",
              "modelspec.description": "SDXL-Turbo: a distilled 1-4 step model (ADD)"}


def _unet(path):
    with open_source(path) as src:
        det = archs.detect(src)
        m, _ = load_component(src, det, "unet")
    return m


def _json(text: str) -> dict:
    # diffusers' logger may add lines after the JSON (LCMScheduler on an Euler config)
    return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]


def _meta(path) -> dict[str, str]:
    with open_source(path) as src:
        return dict(src.metadata)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("distilled")
    base = DEMO_DIR / "base.safetensors"
    unet = _unet(base)
    # an LCM-LoRA in the released file's naming: lora_unet_ + the diffusers module path
    g = torch.Generator().manual_seed(5)
    sd, factors = {}, {}
    for name, mod in unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not any(name == t or name.endswith("." + t) for t in LCM_TARGETS):
            continue
        w = mod.weight
        r = min(LCM_RANK, w.shape[0], w[0].numel())
        down = torch.randn(r, *w.shape[1:], generator=g) * 0.05
        up = torch.randn(w.shape[0], r, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.05
        k = "lora_unet_" + name.replace(".", "_")
        sd |= {k + ".lora_down.weight": down, k + ".lora_up.weight": up,
               k + ".alpha": torch.tensor(LCM_ALPHA)}
        factors[name] = (up, down, r)
    lcm = d / "pytorch_lora_weights.safetensors"
    st.save_file(sd, lcm)
    # SDXL-Turbo-like metadata on the demo model
    turbo = d / "turbo.safetensors"
    st.save_file(st.load_file(str(base)), turbo, metadata=TURBO_SPEC)
    return {"dir": d, "base": base, "unet": unet, "lcm": lcm, "factors": factors,
            "turbo": turbo}


def _keeps_modelspec(meta: dict, where) -> None:
    missing = {k: v for k, v in TURBO_SPEC.items() if meta.get(k) != v}
    assert not missing, f"{where}: modelspec keys lost or changed: {missing}"


def test_lcm_lora_merges_whole_and_verify_samples_it_with_lcm(env):
    d = env["dir"]
    names = {"conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
             "time_emb_proj", "to_q", "to_out.0", "proj_in", "ff.net.2"}
    covered = {t for n in env["factors"] for t in names if n.endswith(t)}
    assert covered == names, names - covered          # the LoRA really has convs and linears
    out = d / "lcm-merged.safetensors"
    code, text = run("merge-lora", env["base"], f"{env['lcm']}:0.8", "-o", out,
                     "--sampler", "lcm", "--dtype", "fp32", "--json")
    assert code == 0, text
    rep = _json(text)["loras"][0]
    assert rep["unmatched"] == [] and rep["modules"] == len(env["factors"])
    assert rep["alpha_defaulted"] == 0
    # W + up@down * alpha/r * weight, read back through convkit's own loading view
    got = dict(_unet(out).named_parameters())
    base = dict(env["unet"].named_parameters())
    for suffix in ("resnets.0.conv1", "downsamplers.0.conv", "conv_shortcut",
                   "attn1.to_q", "ff.net.2", "time_emb_proj"):
        name = next(n for n in env["factors"] if n.endswith(suffix))
        up, down, r = env["factors"][name]
        w = base[name + ".weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (LCM_ALPHA / r) * 0.8
        torch.testing.assert_close(got[name + ".weight"], w + delta, atol=1e-6, rtol=1e-5,
                                   msg=name)
        assert (delta.abs() > 1e-4).any()
    meta = _meta(out)
    assert meta["convkit.sampler"] == "lcm"
    assert json.loads(meta["convkit.steps"])[-1]["sampler"] == "lcm"
    # verify: the merge says lcm, the reference (the base, which says nothing) keeps the
    # default; the pipeline the renderer builds for the merge from that plan has the LCM
    # scheduler (built, not rendered: renders are slow)
    code, text = run("verify", out, "-r", env["base"], "--size", "32", "--dry-run", "--json")
    assert code == 0, text
    plan = _json(text)
    own = plan["artifacts"][0]["settings"]
    assert own["sampler"] == "lcm" and plan["settings"]["sampler"] == "euler-trailing"
    assert plan["reference_settings"]["sampler"] == "euler-trailing"
    from convkit.verify.models import ModelRef
    from convkit.verify.renderer import _Renderer
    from convkit.verify.settings import RenderSettings
    r = _Renderer(ModelRef(out), RenderSettings(**own), d)
    r.prepare()
    pipe, _ = r._pipeline("diffusion_model")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    r.close()
    # the command line still wins
    code, text = run("verify", out, "-r", env["base"], "--sampler", "euler", "--size", "32",
                     "--dry-run", "--json")
    assert code == 0, text
    assert _json(text)["artifacts"][0]["settings"]["sampler"] == "euler"
    # a diffusers folder of the merge: its scheduler is the LCM one, where diffusers reads it
    folder = d / "lcm-diffusers"
    code, text = run("convert", out, folder, "--layout", "diffusers", "-q")
    assert code == 0, text
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "LCMScheduler"
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == \
        ["diffusers", "LCMScheduler"]
    from diffusers import LCMScheduler
    assert isinstance(LCMScheduler.from_pretrained(folder / "scheduler"), LCMScheduler)


def test_prediction_and_modelspec_carried_through_every_command(env):
    """merge-lora --prediction sample on an SDXL-Turbo-like file; every output made from it,
    and from those, says sample and keeps every modelspec key; verify reads it."""
    d = env["dir"]
    m1 = d / "lightning-1step.safetensors"
    code, text = run("merge-lora", env["turbo"], f"{env['lcm']}:0.3", "-o", m1,
                     "--prediction", "sample", "-q")
    assert code == 0, text
    outs = {"merge": m1}
    steps = [
        ("convert", ["convert", m1, d / "c16.safetensors", "--dtype", "fp16"], "c16.safetensors"),
        ("folder", ["convert", m1, d / "folder", "--layout", "diffusers"], "folder"),
        ("fp8", ["quantize", m1, d / "fp8.safetensors", "--to", "fp8-e4m3fn"], "fp8.safetensors"),
        ("nf4", ["quantize", m1, d / "nf4.safetensors", "--to", "nf4"], "nf4.safetensors"),
        ("gguf", ["quantize", m1, d / "q8.gguf", "--to", "gguf:Q8_0"], "q8.gguf"),
        ("split", ["split", m1, "-o", d / "parts", "--for", "comfyui"], "parts"),
    ]
    for name, args, made in steps:
        code, text = run(*args, "-q")
        assert code == 0, f"{name}: {text}"
        outs[name] = d / made
    # later steps from earlier outputs
    code, text = run("convert", outs["folder"], d / "back.safetensors", "--layout",
                     "single-file", "-q")
    assert code == 0, text
    outs["folder->single"] = d / "back.safetensors"
    parts = outs.pop("split")
    unet_part = next((parts / "diffusion_models").glob("*.safetensors"))
    te = sorted((parts / "text_encoders").glob("*.safetensors"))
    vae = next((parts / "vae").glob("*.safetensors"))
    for p in [unet_part, *te, vae]:
        outs[f"split:{p.name}"] = p
    clip_l = next(p for p in te if "clip_l" in p.name)
    clip_g = next(p for p in te if "clip_g" in p.name)
    code, text = run("assemble", "--unet", unet_part, "--clip-l", clip_l, "--clip-g", clip_g,
                     "--vae", vae, "-o", d / "asm.safetensors", "-q")
    assert code == 0, text
    outs["assemble"] = d / "asm.safetensors"
    for name, p in outs.items():
        meta = _meta(p)
        assert meta.get("convkit.prediction") == "sample", (name, meta.get("convkit.prediction"))
        _keeps_modelspec(meta, name)
    # the GGUF holds them as key/values (what gguf-py, ComfyUI-GGUF and sd.cpp read)
    from gguf import GGUFReader
    fields = GGUFReader(str(outs["gguf"])).fields
    val = lambda k: bytes(fields[k].parts[fields[k].data[0]]).decode()
    assert val("convkit.prediction") == "sample"
    assert all(val(k) == v for k, v in TURBO_SPEC.items())
    # a diffusers folder: where diffusers reads it
    cfg = json.loads((outs["folder"] / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "sample"
    # verify reads it (dry run: the settings each artifact would render with)
    code, text = run("verify", outs["gguf"], outs["nf4"], outs["assemble"], outs["folder"],
                     "-r", m1, "--base", m1, "--size", "32", "--dry-run", "--json")
    assert code == 0, text
    plan = _json(text)
    assert [a["settings"]["prediction"] for a in plan["artifacts"]] == ["sample"] * 4
    assert plan["reference_settings"]["prediction"] == "sample"
    # a stated value overrides an inherited one
    code, text = run("convert", m1, d / "eps.safetensors", "--prediction", "epsilon", "-q")
    assert code == 0, text
    assert _meta(d / "eps.safetensors")["convkit.prediction"] == "epsilon"
    code, text = run("verify", d / "eps.safetensors", "-r", m1, "--size", "32", "--dry-run",
                     "--json")
    assert _json(text)["artifacts"][0]["settings"]["prediction"] == "epsilon"


def test_stated_prediction_rewrites_a_contradicting_modelspec_key():
    meta = {"modelspec.prediction_type": "epsilon", "modelspec.title": "x"}
    step: dict = {}
    with sampling.stated(prediction="x0"):
        sampling.apply(meta, step)
    assert meta["convkit.prediction"] == "sample" and step == {"prediction": "sample"}
    assert meta["modelspec.prediction_type"] == sampling._data()["prediction"][
        "modelspec_values"]["sample"]
    # ModelSpec's own spelling of the same type is left alone
    meta = {"modelspec.prediction_type": "v"}
    with sampling.stated(prediction="v_prediction"):
        sampling.apply(meta, {})
    assert meta["modelspec.prediction_type"] == "v"


@pytest.mark.parametrize("args, fix", [
    (["--prediction", "x00"], "did you mean 'x0'"),
    (["--sampler", "lmc"], "did you mean 'lcm'"),
])
def test_unknown_sampling_names_fail_up_front(env, tmp_path, args, fix):
    for cmd in (["convert", env["base"], tmp_path / "o.safetensors"],
                ["quantize", env["base"], tmp_path / "o.gguf", "--to", "gguf:Q8_0"],
                ["merge-lora", env["base"], env["lcm"], "-o", tmp_path / "o.safetensors"]):
        code, text = run(*cmd, *args)
        line = one_line(text)
        assert code == 2 and fix in line and args[0] in line, line
        assert not list(tmp_path.iterdir())


def test_recipe_refuses_an_unknown_prediction(tmp_path):
    from tests.test_recipes_bad_input import recipe

    body = ('[artifacts.a]\nop = "convert"\ninput = "@model"\nprediction = "sampel"\n'
            'path = "a.safetensors"\n')
    out = tmp_path / "out"
    rc, text = run("run", recipe(tmp_path, body), "-o", out)
    line = one_line(text)
    assert rc == 2 and "artifacts.a.prediction" in line and "did you mean 'sample'" in line
    assert not out.exists()
