"""merge-lora on the engine: row chunks give the whole-tensor path's results, bit-identical in
normal chunks and to rounding with chunks of a few rows (BLAS uses other kernels there); and
convert-lora / extract-lora write through the engine too (plan first, ``--dry-run`` writes
nothing)."""
from __future__ import annotations

import json

import pytest
import safetensors.torch as st
import torch

import convkit.engine.executor as X
from convkit.convert import convert
from convkit.lora import convert_lora, merge_lora
from convkit.lora.rows import MergeOp
from convkit.sources import open_source

from tests.lora_helpers import kohya_diffusers_paths, peft, random_factors


def _whole_tensors(monkeypatch):
    """Every patched tensor as one whole-tensor item (merge.apply_patch), as before row chunks."""
    real = MergeOp.granule

    def whole(self, it):
        return 0 if it.key in self.patches else real(self, it)

    monkeypatch.setattr(MergeOp, "granule", whole)


def _load(path):
    with open_source(path) as s:
        return {k: s.load(k) for k in s.keys()}


@pytest.fixture(scope="module")
def loras(sdxl, tmp_path_factory):
    m, single, _, _ = sdxl
    d = tmp_path_factory.mktemp("stream")
    f = random_factors(m, seed=9, rank=3)
    st.save_file(kohya_diffusers_paths(f), d / "k.safetensors")
    st.save_file(peft(f, fold=False), d / "p.safetensors")
    # SGM names: OpenCLIP q/k/v stacked into one fused in_proj LoRA (rows of one tensor)
    convert_lora(d / "p.safetensors", d / "sgm.safetensors", "kohya", base=single)
    # LoHa + DoRA modules: whole-tensor items in the same stream as row-chunked ones
    unet = m.components["unet"].state_dict()
    g = torch.Generator().manual_seed(4)
    sd = dict(st.load_file(d / "k.safetensors"))
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "lora_unet_" + n.replace(".", "_")
    w = unet[n + ".weight"]
    for key in [x for x in sd if x.startswith(k + ".")]:
        del sd[key]
    sd |= {k + ".hada_w1_a": torch.randn(w.shape[0], 2, generator=g) * 0.1,
           k + ".hada_w1_b": torch.randn(2, w.shape[1], generator=g) * 0.1,
           k + ".hada_w2_a": torch.randn(w.shape[0], 2, generator=g) * 0.1,
           k + ".hada_w2_b": torch.randn(2, w.shape[1], generator=g) * 0.1}
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    k = "lora_unet_" + n.replace(".", "_")
    sd[k + ".dora_scale"] = unet[n + ".weight"].norm(dim=1, keepdim=True) * 1.1
    st.save_file(sd, d / "mixed.safetensors")
    half = d / "base16.safetensors"
    convert(single, half, "fp16")
    return d, half


@pytest.mark.parametrize("chunk", [4096, 8 << 20])
def test_row_chunks_equal_whole_tensor_path(sdxl, loras, tmp_path, monkeypatch, chunk):
    _, single, folder, _ = sdxl
    d, half = loras
    monkeypatch.setattr(X, "CHUNK_BYTES", chunk)   # 4096: many chunks per tensor
    cases = [(single, [d / "k.safetensors"], "fp16"),
             (single, [d / "sgm.safetensors", f"{d / 'mixed.safetensors'}:0.6"], None),
             (half, [f"{d / 'p.safetensors'}:-0.7", d / "sgm.safetensors"], "bf16"),
             (half, [d / "mixed.safetensors"], None),
             (folder, [d / "sgm.safetensors"], "fp16")]
    for i, (base, loras_, dtype) in enumerate(cases):
        outs = []
        for mode in ("rows", "whole"):
            with monkeypatch.context() as mp:
                if mode == "whole":
                    _whole_tensors(mp)
                out = tmp_path / (f"{mode}{i}" + ("" if base == folder else ".safetensors"))
                merge_lora(base, loras_, out, dtype=dtype)
                outs.append(_load(out))
        rows, whole = outs
        assert rows.keys() == whole.keys()
        for k in whole:
            if chunk > 4096:
                assert torch.equal(rows[k], whole[k]), (i, k)
            else:
                tol = {} if whole[k].dtype != torch.float32 else {"rtol": 1e-6, "atol": 1e-7}
                torch.testing.assert_close(rows[k], whole[k], **tol)  # one rounding step


def test_row_ops_decide_per_tensor(sdxl, loras):
    """Plain LoRAs (incl. fused in_proj rows) go by rows; LoHa / DoRA tensors whole."""
    from convkit.casts import CastContext
    from convkit.lora.formats import read_lora
    from convkit.lora.merge import LoraSpec, apply_patch, collect_patches
    from convkit.lora.table import table_for_source

    _, single, _, _ = sdxl
    d, _ = loras
    with open_source(single) as src:
        table = table_for_source(src)
        files = [(LoraSpec(p), read_lora(p)) for p in (d / "sgm.safetensors",
                                                        d / "mixed.safetensors")]
        patches, _ = collect_patches(table, files, False)
        op = MergeOp(table, patches, CastContext(), src, apply_patch)

        class It:
            def __init__(self, key):
                self.key, self.shape = key, tuple(src.info(key).shape)

        whole = {k for k in patches if op.granule(It(k)) == 0}
        chunked = set(patches) - whole
        for _, lf in files:
            lf.close()
    assert any("in_proj_weight" in k for k in chunked)
    assert any("attn1.to_q" in k for k in whole) and any("attn2.to_k" in k for k in whole)
    assert len(whole) == 2 and len(chunked) > 100


def test_convert_lora_plans_then_streams(sdxl, loras, tmp_path):
    """convert-lora: a plan from the header (dry run: printed, nothing read or written), one item
    per output module or stacked group; the written file keeps ss_*/modelspec.* metadata and gets
    provenance with this step appended."""
    _, single, _, _ = sdxl
    d, _ = loras
    src = tmp_path / "in.safetensors"
    sd = st.load_file(d / "p.safetensors")
    prior = json.dumps([{"op": "extract-lora", "convkit": "0"}])
    st.save_file(sd, src, metadata={"ss_network_dim": "3", "modelspec.title": "style",
                                    "lora_adapter_metadata": "{}", "convkit.steps": prior})
    out = tmp_path / "kohya.safetensors"
    r = convert_lora(src, out, "kohya", base=single, dtype="fp16", dry_run=True)
    assert r.dry_run and not out.exists()
    text = r.plan.format()
    assert "rename" in text and "F32 -> F16" in text and str(out) in text
    assert r.plan.to_dict()["out_bytes"] > 0
    r = convert_lora(src, out, "kohya", base=single, dtype="fp16")
    assert not r.dry_run and r.to_dict()["tensors"] == len(st.load_file(out))
    meta = open_source(out).metadata
    assert meta["ss_network_dim"] == "3" and meta["modelspec.title"] == "style"
    assert "lora_adapter_metadata" not in meta and meta["convkit.source"] == "in.safetensors"
    steps = json.loads(meta["convkit.steps"])
    assert [s["op"] for s in steps] == ["extract-lora", "convert-lora"]
    assert steps[-1]["format"] == "kohya" and steps[-1]["dtype"] == "fp16"
    # the same numbers as loading every tensor and writing them (the old path)
    ref = tmp_path / "ref.safetensors"
    convert_lora(src, ref, "kohya", base=single)
    got, want = st.load_file(out), st.load_file(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == (torch.float16 if got[k].ndim else torch.float32), k
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-3, atol=1e-6)


def test_lora_formats_come_from_the_registry(sdxl, loras, tmp_path):
    from convkit import registry
    from convkit.errors import UnknownNameError
    from convkit.lora import data

    assert registry.canonical("lora-format") == sorted(data.FORMATS) == ["comfy", "kohya", "peft"]
    assert registry.get("lora-format", "peft").spec["fold_alpha"] is True
    d, _ = loras
    with pytest.raises(UnknownNameError, match="did you mean 'peft'"):
        convert_lora(d / "p.safetensors", tmp_path / "x.safetensors", "pefts", arch="sdxl")
    assert not (tmp_path / "x.safetensors").exists()
