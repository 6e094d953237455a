"""merge-lora's row-chunk streaming gives the whole-tensor path's results: bit-identical in
normal chunks, and to rounding with chunks of a few rows (BLAS uses other kernels there)."""
from __future__ import annotations

import pytest
import safetensors.torch as st
import torch

import convkit.chunked
import convkit.lora.merge as M
from convkit.convert import convert
from convkit.lora import convert_lora, merge_lora
from convkit.sources import open_source

from tests.lora_helpers import kohya_diffusers_paths, peft, random_factors


def _whole_tensor_execute(monkeypatch):
    real = M.execute

    def whole(plan, transform, **kw):
        for k in ("chunk_fn", "elems_of", "force"):
            kw.pop(k, None)
        return real(plan, transform, **kw)

    monkeypatch.setattr(M, "execute", whole)


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
    monkeypatch.setattr(convkit.chunked, "CHUNK_BYTES", chunk)   # many chunks per tensor
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
                    _whole_tensor_execute(mp)
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
    from convkit.lora.merge import LoraSpec, collect_patches
    from convkit.lora.rows import RowMerger
    from convkit.lora.table import table_for_source

    _, single, _, _ = sdxl
    d, _ = loras
    with open_source(single) as src:
        table = table_for_source(src)
        files = [(LoraSpec(p), read_lora(p)) for p in (d / "sgm.safetensors",
                                                        d / "mixed.safetensors")]
        patches, _ = collect_patches(table, files, False)
        rows = RowMerger(table, patches, CastContext())

        class It:
            def __init__(self, key):
                self.key, self.shape = key, tuple(src.info(key).shape)

        whole = {k for k in patches if rows.elems_of(It(k), 1 << 20) == 0}
        chunked = set(patches) - whole
        for _, lf in files:
            lf.close()
    assert any("in_proj_weight" in k for k in chunked)
    assert any("attn1.to_q" in k for k in whole) and any("attn2.to_k" in k for k in whole)
    assert len(whole) == 2 and len(chunked) > 100
