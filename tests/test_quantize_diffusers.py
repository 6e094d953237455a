"""diffusers-folder input: quantizing the folder gives the same tensors as quantizing the
single file of the same model (names mapped with convkit.keymap, fused tensors assembled)."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from convkit import tiny
from convkit.quantize import quantize


@functools.lru_cache(maxsize=None)
def pair(arch: str) -> tuple[Path, Path]:
    d = Path(tempfile.mkdtemp(prefix="convkit-qd-"))
    m = tiny.build(arch, 0)
    folder = tiny.save_diffusers(m, d / "folder")
    single = tiny.save_single_file(m, d / "single.safetensors",
                                   layout="bfl" if arch.startswith("flux") else "sgm")
    return folder, single


def _gguf_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}


@pytest.mark.parametrize("arch,target", [("sdxl", "gguf:Q4_K_M"), ("flux_dev", "gguf:Q5_K_S"),
                                         ("sd15", "gguf:Q8_0")])
def test_folder_equals_single_file_gguf(tmp_path, arch, target):
    """Flux exercises the fused qkv / linear1 tensors (several sources per output tensor)."""
    folder, single = pair(arch)
    a = quantize(folder, tmp_path / "a.gguf", target)
    quantize(single, tmp_path / "b.gguf", target)
    assert "diffusers folder" in a.plan.notes[0]
    ta, tb = _gguf_tensors(tmp_path / "a.gguf"), _gguf_tensors(tmp_path / "b.gguf")
    assert ta == tb
    if arch.startswith("flux"):
        assert any(".qkv." in k for k in ta) and any("linear1" in k for k in ta)


@pytest.mark.parametrize("arch,target", [("sdxl", "fp8-e4m3fn"), ("sd15", "nf4")])
def test_folder_equals_single_file_safetensors(tmp_path, arch, target):
    """The whole checkpoint: UNet, VAE (conv1x1 attention), CLIP-L + OpenCLIP (fused in_proj,
    position_ids / logit_scale extras)."""
    folder, single = pair(arch)
    quantize(folder, tmp_path / "a.safetensors", target)
    quantize(single, tmp_path / "b.safetensors", target)
    with safe_open(tmp_path / "a.safetensors", "pt") as fa, \
            safe_open(tmp_path / "b.safetensors", "pt") as fb:
        assert list(fa.keys()) == list(fb.keys())
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k
        ma, mb = fa.metadata(), fb.metadata()
        assert ma["convkit.quant_report"] == mb["convkit.quant_report"]


def test_folder_dry_run_lists_fused_tensors(tmp_path):
    folder, _ = pair("flux_dev")
    res = quantize(folder, tmp_path / "x.gguf", "gguf:Q8_0", dry_run=True)
    names = [i.name for i in res.plan.items]
    assert "double_blocks.0.img_attn.qkv.weight" in names
    assert not (tmp_path / "x.gguf").exists()

