"""convkit verify's mechanics on the tiny (random) SDXL: the stored-weight rendering path, the
report, the cache, kinds, dry-run and bad input. Gate behaviour on a model that draws is in
test_verify_demo.py."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import safetensors.torch as st
import torch

from convkit.convert import convert
from convkit.quantize import quantize
from convkit.render import pipeline_for
from tests.test_read_path_bad_input import one_line, run

FAST = ["--size", "32", "--steps", "2"]
pytestmark = pytest.mark.xdist_group("verify")     # the module's files are built once


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(sdxl, tmp_path_factory):
    _, single, folder, _ = sdxl
    d = tmp_path_factory.mktemp("verify")
    out = {"fp32": single, "folder": folder}
    convert(single, d / "fp16.safetensors", "fp16")
    out["fp16"] = d / "fp16.safetensors"
    for target, name in (("gguf:Q8_0", "q8.gguf"), ("nf4", "nf4.safetensors"),
                         ("fp8-scaled", "fp8s.safetensors")):
        quantize(single, d / name, target)
        out[target] = d / name
    prompts = d / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n# a comment\na green square\n")
    out["prompts"] = prompts
    out["dir"] = d
    return out


def _draw(pipe):
    o = pipe("a red circle", num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
             generator=torch.Generator().manual_seed(3), output_type="np")
    return np.asarray(o.images[0])


@pytest.mark.parametrize("which", ["fp16", "gguf:Q8_0", "nf4", "fp8-scaled"])
def test_stored_weights_render_like_decoded_weights(files, which):
    """Layers holding their stored encoding and decoding it as they run compute with exactly
    the values the view decodes up front; the stored bytes are the file's, not fp32's."""
    from convkit.loading import stored_bytes

    path, folder = files[which], files["folder"]
    base = files["fp32"] if which.startswith("gguf") else None   # a GGUF holds the UNet alone
    eager = pipeline_for(path, base=base, config_from=folder)
    lazy = pipeline_for(path, base=base, config_from=folder, keep_stored=True)
    assert np.array_equal(_draw(lazy), _draw(eager))
    held = stored_bytes(lazy.unet)
    fp32 = sum(p.numel() * 4 for p in eager.unet.parameters())
    assert 0 < held < fp32 * 0.6
    # a layer's decoded weight is released after it runs
    lin = next(m for m in lazy.unet.modules() if getattr(m, "_convkit_stored", None) is not None)
    assert lin.weight.device.type == "meta"


def test_verify_passes_reports_and_caches(files, tmp_path):
    rep = tmp_path / "rep"
    code, out = run("verify", files["fp16"], files["gguf:Q8_0"], "-r", files["fp32"],
                    "--base", files["fp32"], "--config-from", files["folder"],
                    "--prompts", files["prompts"], *FAST,
                    "--report", rep, "--json")
    d = json.loads(out)
    kinds = {a["name"]: a["kind"] for a in d["artifacts"]}
    assert kinds == {"fp16.safetensors": "fp16", "q8.gguf": "int8"}
    fp16 = d["artifacts"][0]
    assert fp16["ok"] and fp16["mean"]["psnr"] > 40, fp16
    assert [p["seed"] for p in d["prompts"]] == [0, 2]   # line numbers, comment skipped
    # the report: every PNG, the contact sheet with one tile per prompt x (reference + 2)
    assert sorted(p.name for p in rep.iterdir()) == ["contact_sheet.png", "images",
                                                      "report.html", "report.json"]
    pngs = sorted(rep.glob("images/*/*.png"))
    assert len(pngs) == 2 * 3
    from PIL import Image
    from convkit.verify.report import TILE_MIN
    with Image.open(rep / "contact_sheet.png") as im:
        assert im.width >= 3 * TILE_MIN and im.height >= 2 * TILE_MIN
    html = (rep / "report.html").read_text()
    assert html.count("<img src='data:image/png;base64,") == 6
    on_disk = json.loads((rep / "report.json").read_text())
    assert on_disk["artifacts"][1]["files"][0].startswith("images/")
    assert code == (0 if d["ok"] else 10)
    # the reference is rendered once: a second run takes every render from the cache
    code2, out2 = run("verify", files["fp16"], "-r", files["fp32"], "--config-from",
                      files["folder"], "--prompts", files["prompts"], *FAST, "--json")
    d2 = json.loads(out2)
    assert d2["reference"]["render"]["rendered"] == 0
    assert d2["reference"]["render"]["cached"] == 2
    assert d2["artifacts"][0]["images"] == fp16["images"]


def test_nan_in_a_unet_weight_fails_with_the_gate_code(files, tmp_path):
    # (a conv: torch's CPU attention ignores a NaN query channel at the 4-token sequences of
    # a 32-pixel tiny render; test_verify_demo plants one in attention at the demo's size)
    sd = st.load_file(str(files["fp16"]))
    k = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    st.save_file(sd, bad)
    code, out = run("verify", bad, "-r", files["fp32"], "--config-from", files["folder"],
                    "--prompts", files["prompts"], *FAST)
    assert code == 10
    line = one_line(out)
    assert "nan.safetensors" in line and "NaN/Inf in the latents" in line and "prompt" in line


def test_must_differ_from_fails_an_identical_render(files):
    code, out = run("verify", files["fp16"], "-r", files["fp32"], "--config-from",
                    files["folder"], "--prompts", files["prompts"], *FAST,
                    "--must-differ-from", files["fp32"], "--json")
    assert code == 10
    a = json.loads(out.split("\nconvkit: error")[0])["artifacts"][0]
    assert any("renders like" in f for f in a["failures"])


def test_dry_run_checks_and_renders_nothing(files, tmp_path):
    code, out = run("verify", files["nf4"], files["fp8-scaled"], "-r", files["fp32"],
                    "--config-from", files["folder"], "--prompts", files["prompts"], *FAST,
                    "--dry-run", "--json", "--report", tmp_path / "rep")
    assert code == 0, out
    d = json.loads(out)
    assert [a["kind"] for a in d["artifacts"]] == ["int4", "fp8"]
    assert d["renders"] == 2 * 4
    assert not (tmp_path / "rep").exists() and not list(tmp_path.glob(".rep*"))
    assert not (tmp_path / "cache" / "renders").exists()


def test_kind_from_storage():
    from collections import Counter

    from convkit.verify.gate import kind_for
    assert kind_for(Counter({"F16": 10}), "F32") == "fp16"
    assert kind_for(Counter({"F16": 10}), "F16") == "lossless"
    assert kind_for(Counter({"F32": 10}), "F16") == "lossless"
    assert kind_for(Counter({"BF16": 10}), "F16") == "bf16"
    assert kind_for(Counter({"Q8_0": 8, "F32": 3}), "F16") == "int8"
    assert kind_for(Counter({"Q4_K": 8, "Q8_0": 1, "F16": 2}), "F16") == "int4"
    assert kind_for(Counter({"nf4+dq": 3}), "F16") == "int4"
    assert kind_for(Counter({"F8_E4M3*scale": 3, "BF16": 1}), "BF16") == "fp8"
    assert kind_for(Counter({"F16": 1}), "F16", is_lora=True) == "lora"


def test_gate_metrics_are_torchmetrics(files):
    """PSNR/SSIM on 8-bit images, equal images inf / 1."""
    from convkit.verify import gate
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert gate.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-6)
    assert gate.psnr(a, a) == math.inf and gate.ssim(a, a) == 1.0
    assert 0.8 < gate.ssim(a, b) < 1.0


# -- bad input: one line, non-zero exit, nothing written ------------------------------------

def _no_report(tmp_path):
    assert not (tmp_path / "rep").exists() and not list(tmp_path.glob(".rep*"))


def test_bad_input_different_architectures(files, tmp_path):
    from convkit import tiny
    sd15 = tiny.save_single_file(tiny.build("sd15", 0), tmp_path / "sd15.safetensors")
    code, out = run("verify", sd15, "-r", files["fp32"], "--report", tmp_path / "rep", *FAST)
    assert code == 2
    line = one_line(out)
    assert "Stable Diffusion 1.5" in line or "SD" in line
    assert "reference is Stable Diffusion XL" in line
    _no_report(tmp_path)


def test_bad_input_unet_only_and_lora_without_base(files, tmp_path, factors):
    unet = tmp_path / "unet.safetensors"
    convert(files["fp32"], unet, "fp16", components="unet")
    code, out = run("verify", unet, "-r", files["fp32"], "--report", tmp_path / "rep", *FAST)
    assert code == 2 and "--base" in one_line(out) and "unet.safetensors" in out
    from tests.lora_helpers import kohya_diffusers_paths
    lora = tmp_path / "lora.safetensors"
    st.save_file(kohya_diffusers_paths(factors), lora)
    code, out = run("verify", lora, "-r", files["fp32"], "--report", tmp_path / "rep", *FAST)
    assert code == 2 and "LoRA" in one_line(out) and "--base" in out
    _no_report(tmp_path)


@pytest.mark.parametrize("content,needle", [(b"", "no prompts"),
                                            (b"\xff\xfe a cat\n", "not UTF-8")])
def test_bad_prompt_files(files, tmp_path, content, needle):
    p = tmp_path / "prompts.txt"
    p.write_bytes(content)
    code, out = run("verify", files["fp16"], "-r", files["fp32"], "--prompts", p,
                    "--report", tmp_path / "rep", *FAST)
    assert code == 3 and needle in one_line(out) and "prompts.txt" in out
    _no_report(tmp_path)


def test_bad_size_gate_key_and_report_folder(files, tmp_path):
    code, out = run("verify", files["fp16"], "-r", files["fp32"], "--size", "100")
    assert code == 2 and "multiple of 8" in one_line(out)
    code, out = run("verify", files["fp16"], "-r", files["fp32"], "--gate", "ssmi=0.9")
    assert code == 2 and "did you mean 'ssim'" in one_line(out)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, out = run("verify", files["fp16"], "-r", files["fp32"], "--report", busy, *FAST)
    assert code == 2 and "not empty" in one_line(out)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = run("verify", files["fp16"], "-r", files["fp32"], "--report", blocker / "rep",
                    *FAST)
    assert code == 5 and "cannot write the report" in one_line(out)


@pytest.mark.parametrize("arch", ["sd15", "flux_dev"])
def test_other_architectures_render_and_pass(arch, tmp_path):
    """SD1.5 (Euler trailing) and Flux (flow-matching Euler, embedded guidance 3.5, sizes in
    16-pixel units; the T5 tokenizer from the model folder: the tiny T5 has a tiny vocabulary)."""
    from convkit import tiny

    m = tiny.build(arch, 0)
    layout = "comfy" if arch.startswith("flux") else None    # a full Flux checkpoint
    single = tiny.save_single_file(m, tmp_path / "m.safetensors", layout=layout)
    folder = tiny.save_diffusers(m, tmp_path / "folder", weights=False)
    convert(single, tmp_path / "m16.safetensors", "fp16")
    code, out = run("verify", tmp_path / "m16.safetensors", "-r", single, "--config-from", folder,
                    "--prompts", "demo", "--size", "32", "--steps", "2", "--json")
    assert code == 0, out
    d = json.loads(out)
    s = d["artifacts"][0]["render"]["settings"]
    assert s["sampler"] == ("flow-euler" if arch.startswith("flux") else "euler-trailing")
    assert s["guidance"] == (3.5 if arch == "flux_dev" else 0.0)
    assert d["artifacts"][0]["kind"] == "fp16" and d["artifacts"][0]["ok"]
    if arch.startswith("flux"):
        code, out = run("verify", tmp_path / "m16.safetensors", "-r", single, "--size", "40")
        assert code == 2 and "multiple of 16" in one_line(out)


def _alexnet_features():
    """torchvision's alexnet().features layer list (torchvision/models/alexnet.py)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))


def test_lpips_from_local_weights(files, tmp_path):
    """LPIPS v0.1 as the lpips package computes it (slices of AlexNet's features, unit-normalised
    over channels, 1x1 linear layers, spatial mean, sum), from the two published files' layouts
    or one whole state dict; nothing is downloaded."""
    from convkit.verify.lpips import LPIPS

    torch.manual_seed(0)
    feats = _alexnet_features()
    lins = [torch.rand(1, c, 1, 1) for c in (64, 192, 384, 256, 256)]
    tv = tmp_path / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, tv)
    lp = tmp_path / "alex.pth"
    torch.save({f"lin{j}.model.1.weight": w for j, w in enumerate(lins)}, lp)
    slices = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]
    whole = {f"net.slice{s + 1}.{i}.{n}": p for s, (a, b) in enumerate(slices)
             for i in range(a, b) for n, p in feats[i].named_parameters()}
    whole |= {f"lin{j}.model.1.weight": w for j, w in enumerate(lins)}
    one = tmp_path / "lpips_alex.safetensors"
    st.save_file(whole, one)

    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)

    def reference(x, y):
        shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
        scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
        t = [((torch.from_numpy(i).permute(2, 0, 1)[None].float() / 255 * 2 - 1) - shift) / scale
             for i in (x, y)]
        total = 0.0
        for j, (lo, hi) in enumerate(slices):
            t = [feats[lo:hi](u) for u in t]
            n = [u / (u.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for u in t]
            total += float(torch.nn.functional.conv2d((n[0] - n[1]) ** 2, lins[j]).mean())
        return total

    with torch.no_grad():
        want = reference(a, b)
    two, single = LPIPS.from_files([tv, lp]), LPIPS.from_files([one])
    assert two(a, b) == pytest.approx(want, rel=1e-5) and single(a, b) == pytest.approx(want,
                                                                                      rel=1e-5)
    assert two(a, a) == 0.0 and want > 0
    code, out = run("verify", files["fp16"], "-r", files["fp32"], "--config-from",
                    files["folder"], "--prompts", files["prompts"], *FAST, "--lpips-weights", one,
                    "--json")
    img = json.loads(out)["artifacts"][0]["images"][0]
    assert img["lpips"] is not None and img["lpips"] >= 0
    code, out = run("verify", files["fp16"], "-r", files["fp32"], "--lpips-weights", lp, *FAST)
    assert code == 3 and "not LPIPS AlexNet weights: missing" in one_line(out)
