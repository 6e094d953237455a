"""Components of any artifact as real diffusers/transformers modules, loaded through the
logical-weights view: the same weights (and outputs) as the model they were saved from."""
from __future__ import annotations

import pytest
import torch

from convkit import archs
from convkit.loading import load_component
from convkit.quantize import quantize
from convkit.sources import open_source


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("form", ["single", "folder"])
def test_every_component_equals_the_saved_model(sdxl, form):
    model, single, folder, _ = sdxl
    path = single if form == "single" else folder
    with open_source(path) as src:
        det = archs.detect(src)
        for comp, original in model.components.items():
            m, r = load_component(src, det, comp)
            assert "tiny" in r.source, r.source
            _same_weights(m, original)
            assert not m.training
    # the UNet computes what the original computes, bit for bit
    with open_source(path) as src:
        unet, _ = load_component(src, archs.detect(src), "unet")
    orig = model.components["unet"]
    g = torch.Generator().manual_seed(0)
    cfg = orig.config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 5, cfg.cross_attention_dim, generator=g)
    cond = {"text_embeds": torch.randn(1, cfg.projection_class_embeddings_input_dim
                                       - 6 * cfg.addition_time_embed_dim, generator=g),
            "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]])}
    with torch.no_grad():
        a = unet(x, 500, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample
        b = orig(x, 500, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample
    assert torch.equal(a, b)


def test_text_encoder_position_ids_exist(sdxl):
    _, single, _, _ = sdxl
    with open_source(single) as src:
        te, _ = load_component(src, archs.detect(src), "text_encoder")
    ids = dict(te.named_buffers())
    pos = next(v for k, v in ids.items() if k.endswith("position_ids"))
    assert pos.device.type == "cpu" and torch.equal(pos.reshape(-1), torch.arange(pos.numel()))
    with torch.no_grad():
        out = te(torch.tensor([[1, 2, 3, 4]]))
    assert torch.isfinite(out.last_hidden_state).all()


def test_quantized_unet_holds_the_decoded_weights(sdxl, tmp_path):
    """A Q8_0 GGUF (ComfyUI-GGUF layout, UNet only) loads as a UNet whose weights are the
    view's decoded values."""
    _, single, _, _ = sdxl
    q = tmp_path / "q.gguf"
    quantize(single, q, "gguf:Q8_0")
    with open_source(q) as src:
        det = archs.detect(src)
        unet, _ = load_component(src, det, "unet")
        with open_source(single) as ref:
            ref_unet, _ = load_component(ref, archs.detect(ref), "unet")
        sd, rd = unet.state_dict(), ref_unet.state_dict()
        assert sd.keys() == rd.keys()
        worst = max(float((sd[k] - rd[k]).abs().max() / rd[k].abs().max().clamp(min=1e-12))
                    for k in sd if rd[k].is_floating_point() and rd[k].numel())
        assert 0 < worst < 0.02          # Q8_0: quantized (not copied), within its bound


def test_missing_component_is_named(sdxl, tmp_path):
    _, single, _, _ = sdxl
    q = tmp_path / "q.gguf"
    quantize(single, q, "gguf:Q8_0")
    with open_source(q) as src:
        with pytest.raises(Exception, match="no 'vae' in this input"):
            load_component(src, archs.detect(src), "vae")
