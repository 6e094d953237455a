"""convert --layout: single-file names <-> diffusers names, streaming, on the tiny real-class
models; fused tensors split/placed by row ranges (chunked, any worker count); every stored
tensor read once; quantized inputs decoded through the view."""
from __future__ import annotations

import json

import pytest
import torch

from convkit import archs, keymap, tiny
from convkit.casts import CastContext
from convkit.convert import convert
from convkit.engine import execute
from convkit.engine import executor as executor_mod
from convkit.layouts.convert import plan_layout
from convkit.sources import open_source
from convkit.sources.view import WeightsView

DM = {"sd15": "unet", "sdxl": "unet", "sdxl_refiner": "unet", "flux_dev": "transformer",
      "flux_schnell": "transformer"}
ONE = {"unet": ("sgm-unet", "diffusers-unet"), "transformer": ("bfl", "diffusers-transformer")}


def _tensors(path):
    with open_source(path) as s:
        return {k: (s.info(k).dtype, s.load(k).clone()) for k in s.keys()}


def _same(a, b):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k][0] == b[k][0], (k, a[k][0], b[k][0])
        x, y = a[k][1].reshape(-1), b[k][1].reshape(-1)
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), k     # bit for bit


@pytest.fixture(scope="module")
def tinies():
    return {a: tiny.build(a) for a in DM}


@pytest.mark.parametrize("arch", list(DM))
def test_diffusion_model_round_trip_is_bit_exact(tmp_path, tinies, arch):
    t = tinies[arch]
    comp = DM[arch]
    single = tiny.save_single_file(t, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    s_lay, d_lay = ONE[comp]
    convert(single, tmp_path / "d.safetensors", "bf16", layout=d_lay)
    convert(tmp_path / "d.safetensors", tmp_path / "s.safetensors", "bf16", layout=s_lay)
    # the diffusers names hold the model's own tensors
    d = _tensors(tmp_path / "d.safetensors")
    ref = t.state_dicts()[comp]
    assert set(d) == set(ref)
    for k, v in ref.items():
        assert torch.equal(d[k][1], v.to(torch.bfloat16)), k
    # and back: the single file's diffusion model, names without the checkpoint prefix
    pre = archs.get(arch).layout(archs.get(arch).single_file_layout).prefixes[comp]
    orig = {k[len(pre):]: v for k, v in _tensors(single).items() if k.startswith(pre)}
    _same(orig, _tensors(tmp_path / "s.safetensors"))


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("arch", ["flux_dev", "sdxl"])
def test_fused_rows_equal_the_key_map_in_chunks(tmp_path, tinies, monkeypatch, arch, workers):
    """Tiny chunks cut the fused tensors (Flux qkv / linear1 / adaLN halves, OpenCLIP in_proj)
    across their part boundaries; the result equals keymap.to_diffusers/to_single_file."""
    monkeypatch.setattr(executor_mod, "CHUNK_BYTES", 4096)
    t = tinies[arch]
    single = tiny.save_single_file(t, tmp_path / "m.safetensors")
    with open_source(single) as src:
        det = archs.detect(src)
        plan = plan_layout(src, det, tmp_path / "dfs", "diffusers", None, CastContext())
        actions = {i.action for i in plan.items}
        assert "split rows" in actions
        execute(plan, workers=workers)
        sd = {k: src.load(k) for k in src.keys()}
    want = keymap.arch_to_diffusers(arch, sd, configs={c: v["config"] for c, v in
                                                       t.spec["components"].items()})
    for comp, ref in want.items():
        got = _folder_tensors(tmp_path / "dfs" / comp)
        ref = {_spell(comp, arch, k): v for k, v in ref.items()}
        assert set(got) == set(ref), (comp, sorted(set(got) ^ set(ref))[:4])
        for k, v in ref.items():
            assert torch.equal(got[k], v), (comp, k)
    # and back into one file, in chunks, equal to the original single file
    with open_source(tmp_path / "dfs") as src:
        det = archs.detect(src)
        plan = plan_layout(src, det, tmp_path / "back.safetensors", "single-file", None,
                           CastContext())
        assert "place rows" in {i.action for i in plan.items}
        execute(plan, workers=workers)
    _same(_tensors(single), _tensors(tmp_path / "back.safetensors"))


def _spell(comp, arch, k):
    kind = archs.get(arch).components[comp].keymap
    return k if kind != "clip_l" or k.startswith("text_model.") else "text_model." + k


def _folder_tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_every_stored_tensor_is_read_once(tmp_path, tinies, monkeypatch):
    """One pass: elements read per source key equal its size (fused tensors read once for all
    their parts), for single -> diffusers and back."""
    counts: dict[str, int] = {}
    real_read, real_load = WeightsView.read_logical, WeightsView.load

    def read(self, key, start, count, out, scratch=None):
        counts[key] = counts.get(key, 0) + count
        return real_read(self, key, start, count, out, scratch)

    def load(self, key):
        t = real_load(self, key)
        counts[key] = counts.get(key, 0) + t.numel()
        return t

    single = tiny.save_single_file(tinies["flux_dev"], tmp_path / "m.safetensors")
    for src_path, out, lay in [(single, tmp_path / "d", "diffusers"),
                               (tmp_path / "d", tmp_path / "s.safetensors", "single-file")]:
        with open_source(src_path) as src:
            det = archs.detect(src)
            plan = plan_layout(src, det, out, lay, None, CastContext())
            sizes = {k: src.info(k).numel for k in src.keys()}
            counts.clear()
            monkeypatch.setattr(WeightsView, "read_logical", read)
            monkeypatch.setattr(WeightsView, "load", load)
            execute(plan, workers=2)
            monkeypatch.undo()
        read_keys = {k: n for k, n in counts.items()}
        # single-file-only buffers (position_ids) were read at planning, into the metadata
        wanted = {k: n for k, n in sizes.items() if not k.endswith("position_ids")}
        assert read_keys == wanted


def test_quantized_input_is_decoded_into_the_new_layout(tmp_path, tinies):
    from convkit.quantize import quantize

    single = tiny.save_single_file(tinies["flux_dev"], tmp_path / "m.safetensors",
                                   dtype=torch.bfloat16)
    quantize(single, tmp_path / "q.gguf", "gguf:Q8_0")
    r = convert(tmp_path / "q.gguf", tmp_path / "d.safetensors", "fp16",
                layout="diffusers-transformer")
    assert any("dequantized" in n for n in r.plan.notes)
    with open_source(tmp_path / "q.gguf") as q:
        det = archs.detect(q)
        ref = keymap.to_diffusers("flux", {k: q.load(k) for k in q.keys()})
    with open_source(tmp_path / "d.safetensors") as out:
        assert not any(k.startswith("convkit.quantization") for k in out.metadata)
        assert set(out.keys()) == set(ref)
        for k, v in ref.items():
            assert torch.equal(out.load(k), v.to(torch.float16)), k
    assert det.layout.naming == "bfl"


def test_dry_run_writes_nothing_and_shows_the_transforms(tmp_path, tinies):
    from click.testing import CliRunner

    from convkit.cli import main

    single = tiny.save_single_file(tinies["sdxl"], tmp_path / "m.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(main, ["convert", str(single), str(tmp_path / "out"), "--layout",
                                  "diffusers", "--dtype", "fp32", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "split rows" in r.output and "transpose" in r.output and "1x1 conv" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    r = CliRunner().invoke(main, ["convert", str(single), str(tmp_path / "out"), "--layout",
                                  "diffusers", "--dry-run", "--json"])
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["layout"] == "sgm" and d["plan"]["folder"]
