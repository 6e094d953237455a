"""--extras DIR --extras-format gguf: text encoders / VAE in the GGUF form their loaders take.

The loaders' name conversions are reimplemented here as test data, copied from their sources:
ComfyUI-GGUF loader.py (T5_SD_MAP + sd_map_replace, TXT_ARCH_LIST; city96/ComfyUI-GGUF 795e451)
and stable-diffusion.cpp name_conversion.cpp (t5_name_map + replace_with_name_map,
convert_open_clip_to_hf_clip_name, the --clip_l/--clip_g/--t5xxl/--vae prefixes of
stable-diffusion.cpp and convert_tensor_name; leejet/stable-diffusion.cpp 97d2990). The forward
T5 names are checked against gguf-py's own tensor mapping (get_tensor_name_map(T5ENCODER)).
"""
from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path

import gguf
import pytest
import safetensors.torch as st
import torch
from click.testing import CliRunner

from convkit import tiny
from convkit.cli import main
from convkit.errors import OutputExistsError, UnknownNameError, UsageError
from convkit.keymap._data import load_toml
from convkit.quantize import quantize
from convkit.quantize.extras_gguf import rename, rename_table
from convkit.sources import open_source

from tests.test_quantize_gguf import BOUND, _field, _rel  # per-type error bounds, GGUF helpers

T5_PREFIX = "text_encoders.t5xxl.transformer."

# --- ComfyUI-GGUF loader.py -----------------------------------------------------------------
COMFY_TXT_ARCH_LIST = {"t5", "t5encoder", "llama", "qwen2vl", "qwen3", "qwen3vl"}
COMFY_T5_SD_MAP = {
    "enc.": "encoder.",
    ".blk.": ".block.",
    "token_embd": "shared",
    "output_norm": "final_layer_norm",
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_norm": "layer.0.layer_norm",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_norm": "layer.1.layer_norm",
}


def comfy_sd_map_replace(name: str) -> str:
    for s, d in COMFY_T5_SD_MAP.items():
        name = name.replace(s, d)
    return name


# --- stable-diffusion.cpp name_conversion.cpp -----------------------------------------------
SDCPP_T5_NAME_MAP = [
    ("enc.", "encoder."), ("blk.", "block."), ("output_norm.", "final_layer_norm."),
    ("attn_q.", "layer.0.SelfAttention.q."), ("attn_k.", "layer.0.SelfAttention.k."),
    ("attn_v.", "layer.0.SelfAttention.v."), ("attn_o.", "layer.0.SelfAttention.o."),
    ("attn_norm.", "layer.0.layer_norm."), ("ffn_norm.", "layer.1.layer_norm."),
    ("ffn_up.", "layer.1.DenseReluDense.wi_1."), ("ffn_down.", "layer.1.DenseReluDense.wo."),
    ("ffn_gate.", "layer.1.DenseReluDense.wi_0."),
    ("attn_rel_b.", "layer.0.SelfAttention.relative_attention_bias."), ("token_embd.", "shared."),
]
SDCPP_OPEN_CLIP_MODEL = {
    "model.ln_final.bias": "transformer.text_model.final_layer_norm.bias",
    "model.ln_final.weight": "transformer.text_model.final_layer_norm.weight",
    "model.positional_embedding": "transformer.text_model.embeddings.position_embedding.weight",
    "model.token_embedding.weight": "transformer.text_model.embeddings.token_embedding.weight",
    "model.text_projection": "transformer.text_model.text_projection",
}
SDCPP_OPEN_CLIP_RESBLOCK = {
    "attn.in_proj_bias": "self_attn.in_proj.bias",
    "attn.in_proj_weight": "self_attn.in_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "ln_1.bias": "layer_norm1.bias", "ln_1.weight": "layer_norm1.weight",
    "ln_2.bias": "layer_norm2.bias", "ln_2.weight": "layer_norm2.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias", "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias", "mlp.c_proj.weight": "mlp.fc2.weight",
}
# --clip_l / --clip_g / --t5xxl / --vae file prefixes and what convert_tensor_name makes of them
SDCPP_FLAG_PREFIX = {  # (flag prefix for unet versions, for Flux)
    "clip_l": ("cond_stage_model.transformer.", "text_encoders.clip_l.transformer."),
    "openclip": ("cond_stage_model.1.transformer.", "text_encoders.clip_g.transformer."),
    "t5": ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl.transformer."),
    "vae": ("first_stage_model.", "first_stage_model."),
}
SDCPP_FULL_PREFIX = [  # convert_tensor_name prefix_map entries for full checkpoints
    ("vae.", "first_stage_model."), ("conditioner.embedders.0.", "cond_stage_model."),
    ("conditioner.embedders.1.", "cond_stage_model.1."),
]
SDCPP_COND_PREFIXES = ["cond_stage_model.1.", "cond_stage_model.", "conditioner.embedders.",
                       "text_encoders."]


def sdcpp_open_clip(name: str) -> str:
    name = SDCPP_OPEN_CLIP_MODEL.get(name, name)
    p = "model.transformer.resblocks."
    if name.startswith(p):
        idx, _, suffix = name[len(p):].partition(".")
        if suffix in SDCPP_OPEN_CLIP_RESBLOCK:
            name = "transformer.text_model.encoder.layers." + idx + "." + \
                SDCPP_OPEN_CLIP_RESBLOCK[suffix]
    return name


def sdcpp_name(name: str) -> str:
    """convert_tensor_name for the cond-stage / first-stage parts (LDM VAE names unchanged)."""
    for old, new in SDCPP_FULL_PREFIX:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    for p in SDCPP_COND_PREFIXES:
        if name.startswith(p):
            rest = name[len(p):]
            if "t5xxl" in rest:
                for s, d in SDCPP_T5_NAME_MAP:
                    rest = rest.replace(s, d, 1)
            else:
                rest = sdcpp_open_clip(rest)
            return p + rest
    return name


# ------------------------------------------------------------------------------------ fixtures


@functools.lru_cache(maxsize=None)
def model(arch: str):
    return tiny.build(arch, 0)


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str) -> Path:
    """All-in-one single file: ComfyUI layout for Flux (T5 inside), SGM for SDXL."""
    d = Path(tempfile.mkdtemp(prefix="convkit-x-"))
    return tiny.save_single_file(model(arch), d / f"{arch}.safetensors", torch.float32)


@functools.lru_cache(maxsize=None)
def source(arch: str) -> dict[str, torch.Tensor]:
    return st.load_file(checkpoint(arch))


def read_gguf(path: Path) -> tuple[gguf.GGUFReader, dict[str, tuple[str, torch.Tensor]]]:
    """{name: (type, dequantized tensor in the loader's shape)} through gguf-py alone."""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        shape = tuple(int(v) for v in reversed(t.shape.tolist()))   # as ComfyUI-GGUF does
        deq = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, torch.from_numpy(deq.copy()).reshape(shape))
    return r, out


def run(arch: str, tmp: Path, layout: str, qtype: str | None = None, **kw):
    res = quantize(checkpoint(arch), tmp / "m.gguf", "gguf:Q8_0", layout=layout,
                   extras_dir=tmp / "x", extras_format="gguf", extras_type=qtype, **kw)
    return res, {Path(p).name: Path(p) for p in res.extras or []}


# ------------------------------------------------------------------------------------ data


def test_t5_map_is_llama_cpp_mapping():
    """Every rule of formats/keymaps/t5_gguf.toml = gguf-py's T5ENCODER tensor mapping."""
    nmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, 3)
    allowed = {gguf.TENSOR_NAMES[t].format(bid=b) + ".weight"
               for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.T5ENCODER] for b in range(3)}
    table = rename_table("t5_gguf")
    names = load_toml("t5_gguf")["names"]
    assert len(table) == len(names) == 12
    for src_pat, dst in names.items():
        for b in range(3):
            src = src_pat.format(bid=b)
            got = rename(table, src)
            assert got == dst.format(bid=b)
            assert got == nmap.get_name(src, try_suffixes=(".weight",)), src
            assert got in allowed
            assert comfy_sd_map_replace(got) == src            # ComfyUI-GGUF maps it back


# ------------------------------------------------------------------------------------ comfy


@pytest.mark.parametrize("qtype", [None, "Q5_K", "F16"])
def test_t5_comfy_gguf_loads_as_t5(tmp_path, qtype):
    res, files = run("flux_dev", tmp_path, "comfy", qtype)
    want = qtype or "Q8_0"
    assert sorted(files) == ["m.text_encoder.safetensors", "m.text_encoder_2.gguf",
                             "m.vae.safetensors"]
    r, got = read_gguf(files["m.text_encoder_2.gguf"])
    arch = _field(r, "general.architecture")
    assert arch == "t5encoder" and arch in COMFY_TXT_ARCH_LIST
    assert _field(r, "general.quantization_version") == 2
    ft = {"Q8_0": "MOSTLY_Q8_0", "Q5_K": "MOSTLY_Q5_K_S", "F16": "MOSTLY_F16"}[want]
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType[ft])
    assert not [k for k in r.fields if k.startswith("comfy.gguf.orig_shape.")]

    src = {k[len(T5_PREFIX):]: v for k, v in source("flux_dev").items() if k.startswith(T5_PREFIX)}
    nblocks = 1 + max(int(k.split(".")[2]) for k in src if k.startswith("encoder.block."))
    nmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, nblocks)
    expected = {nmap.get_name(k, try_suffixes=(".weight",)): k for k in src}
    assert None not in expected and set(got) == set(expected)       # key by key, nothing else
    fallbacks = {}
    for name, (qt, deq) in got.items():
        hf = expected[name]
        shape = tuple(src[hf].shape)
        assert deq.shape == shape, name
        if len(shape) == 1 or name.endswith("attn_rel_b.weight"):
            assert qt == "F32", name
        elif qt != want:                        # only a block-size fallback may differ
            bs = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[want]][0]
            assert shape[-1] % bs, (name, qt)
            fallbacks[name] = qt
        if qt not in ("F32", "F16", "BF16"):
            assert shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qt]][0] == 0
        assert _rel(deq, src[hf]) <= BOUND[qt] + 1e-7, (name, qt)
    if want == "Q5_K":
        assert fallbacks and set(fallbacks.values()) == {"Q5_1"}   # rows of 32/64 < 256

    # ComfyUI-GGUF: gguf_clip_loader -> sd_map_replace(T5_SD_MAP) -> ComfyUI's T5 (HF names)
    loaded = {comfy_sd_map_replace(n): deq for n, (_, deq) in got.items()}
    # stable-diffusion.cpp takes the same file with --t5xxl (its t5_name_map)
    assert {sdcpp_name(T5_PREFIX + n)[len(T5_PREFIX):] for n in got} == set(loaded)
    assert set(loaded) == set(src)
    # a real transformers T5EncoderModel takes it strictly (encoder.embed_tokens is tied to
    # shared in transformers; ComfyUI's T5 has only shared)
    from transformers import T5Config, T5EncoderModel

    cfg = tiny.spec("flux_dev")["components"]["text_encoder_2"]["config"]
    m = T5EncoderModel(T5Config(**cfg)).eval()
    loaded["encoder.embed_tokens.weight"] = loaded["shared.weight"]
    m.load_state_dict({k: v.float() for k, v in loaded.items()}, strict=True)
    ref = model("flux_dev").components["text_encoder_2"]
    ids = torch.randint(0, cfg["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = m(input_ids=ids).last_hidden_state
        b = ref(input_ids=ids).last_hidden_state
    out_err = _rel(a, b)
    assert out_err < 3.5 * BOUND[{"Q5_K": "Q5_1"}.get(want, want)], out_err
    # the report stored in the file and returned describe the same tensors
    rep = res.extras_reports[str(files["m.text_encoder_2.gguf"])]
    assert {e.name for e in rep.tensors} == {n for n, (q, _) in got.items() if q != "F32"}


@functools.lru_cache(maxsize=None)
def wide_t5_checkpoint():
    """The tiny Flux with a wider real T5 (rows of 256/512, so K-quants need no fallback)."""
    from transformers import T5Config, T5EncoderModel

    cfg = {**tiny.spec("flux_dev")["components"]["text_encoder_2"]["config"],
           "d_model": 256, "d_kv": 64, "num_heads": 4, "d_ff": 512}
    t5 = T5EncoderModel(T5Config(**cfg)).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, prm in sorted(t5.named_parameters()):
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.02 + (1.0 if prm.ndim == 1 else 0.0))
    sd = {k: v for k, v in source("flux_dev").items() if not k.startswith(T5_PREFIX)}
    sd.update({T5_PREFIX + k: v.contiguous() for k, v in t5.state_dict().items()
               if k != "encoder.embed_tokens.weight"})
    path = Path(tempfile.mkdtemp(prefix="convkit-x-")) / "wide.safetensors"
    st.save_file(sd, path)
    return path, t5, cfg


@pytest.mark.parametrize("qtype", ["Q6_K", "Q4_K", "Q4_0"])
def test_t5_k_quants_forward(tmp_path, qtype):
    from transformers import T5Config, T5EncoderModel

    path, ref, cfg = wide_t5_checkpoint()
    quantize(path, tmp_path / "m.gguf", "gguf:Q8_0", extras_dir=tmp_path / "x",
             extras_format="gguf", extras_type=qtype)
    r, got = read_gguf(tmp_path / "x" / "m.text_encoder_2.gguf")
    types = {n: q for n, (q, _) in got.items()}
    assert {q for n, q in types.items() if n.endswith(("norm.weight", "attn_rel_b.weight"))} \
        == {"F32"}
    assert {q for n, q in types.items()
            if not n.endswith(("norm.weight", "attn_rel_b.weight"))} == {qtype}   # no fallback
    loaded = {comfy_sd_map_replace(n): v.float() for n, (_, v) in got.items()}
    loaded["encoder.embed_tokens.weight"] = loaded["shared.weight"]
    m = T5EncoderModel(T5Config(**cfg)).eval()
    m.load_state_dict(loaded, strict=True)
    ids = torch.randint(0, cfg["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = _rel(m(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)
    for name, (q, deq) in got.items():
        src = ref.state_dict()[comfy_sd_map_replace(name)]
        assert _rel(deq, src) <= BOUND[q] + 1e-7, (name, q)
    # errors of ~14 matrices add up through the 2 blocks: ~2.6x the weight error, any type
    assert err < 3.5 * BOUND[qtype], err


def test_comfy_components_without_gguf_loader_stay_safetensors(tmp_path):
    res, files = run("sdxl", tmp_path, "comfy")
    assert sorted(files) == ["m.text_encoder.safetensors", "m.text_encoder_2.safetensors",
                             "m.vae.safetensors"]
    notes = [n for n in res.plan.notes if n.startswith("extras:")]
    assert len(notes) == 3 and all("safetensors, not GGUF" in n and "\n" not in n for n in notes)
    assert any("TXT_ARCH_LIST" in n for n in notes) and any("VAE" in n for n in notes)
    sd = source("sdxl")
    with open_source(files["m.vae.safetensors"]) as v:       # the existing behaviour
        assert set(v.keys()) == {k[len("first_stage_model."):] for k in sd
                                 if k.startswith("first_stage_model.")}
        assert torch.equal(v.load("decoder.conv_out.weight"),
                           sd["first_stage_model.decoder.conv_out.weight"])
    assert not list((tmp_path / "x").glob("*.tmp*"))


# ------------------------------------------------------------------------------------ sd.cpp


@pytest.mark.parametrize("arch", ["flux_dev"])
def test_sdcpp_extras_names_are_what_sdcpp_builds(tmp_path, arch):
    res, files = run(arch, tmp_path, "sdcpp", "Q8_0")
    assert sorted(files) == ["m.text_encoder.gguf", "m.text_encoder_2.gguf", "m.vae.gguf"]
    m = model(arch)
    sd = source(arch)
    det_prefix = {"flux_dev": {"text_encoder": "text_encoders.clip_l.transformer.",
                               "text_encoder_2": T5_PREFIX, "vae": "vae."},
                  "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.",
                           "text_encoder_2": "conditioner.embedders.1.model.",
                           "vae": "first_stage_model."}}[arch]
    for comp, prefix in det_prefix.items():
        kind = m.spec["components"][comp]["class"]
        kind = {"CLIPTextModel": "clip_l", "CLIPTextModelWithProjection": "openclip",
                "T5EncoderModel": "t5", "AutoencoderKL": "vae"}[kind]
        r, got = read_gguf(files[f"m.{comp}.gguf"])
        assert r.get_field("general.architecture") is None       # as sd.cpp's convert writes
        flag = SDCPP_FLAG_PREFIX[kind][arch == "flux_dev"]
        internal = {sdcpp_name(flag + n): n for n in got}        # what sd.cpp makes of the file
        full = {sdcpp_name(k): k for k in sd if k.startswith(prefix)
                and not k.endswith(("position_ids", "logit_scale"))}
        assert set(internal) == set(full), comp                 # = the full checkpoint's names
        for iname, n in internal.items():
            qt, deq = got[n]
            ref = sd[full[iname]]
            assert deq.shape == ref.shape, n
            assert _rel(deq, ref) <= BOUND[qt] + 1e-7, (n, qt)
            if ref.ndim == 1 or "relative_attention_bias" in n:
                assert qt == "F32", n
            elif "embedding" in n:
                assert qt == "F16", n                            # sd.cpp's keep list
            elif ref.shape[-1] % 32 == 0:
                assert qt == "Q8_0", n
            else:
                assert qt == "F16", n                            # rows of 3 / 1: fallback
    notes = [n for n in res.plan.notes if n.startswith("extras:")]
    assert len(notes) == 3 and all("stable-diffusion.cpp --" in n for n in notes)


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sdxl_refiner"])
def test_sdcpp_unet_models_bundle_instead_of_extras(tmp_path, arch):
    """SD1/SDXL: sd.cpp cannot place separate text-encoder files next to a UNet-only GGUF
    (docs/loaders.md), so they are in the main file (tests/test_quantize_gguf.py) and --extras
    writes nothing for them."""
    res, files = run(arch, tmp_path, "sdcpp")
    assert files == {}
    assert set(res.plan.bundled) == set(res.plan.detection.component_keys) - {"unet"}
    assert any("already in m.gguf" in n for n in res.plan.notes)


# ------------------------------------------------------------------------------------ bad input


def test_unknown_extras_type_suggests(tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'Q8_0'"):
        run("flux_dev", tmp_path, "comfy", "Q8")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "x").exists()
    r = CliRunner().invoke(main, ["quantize", str(checkpoint("flux_dev")), str(tmp_path / "m.gguf"),
                                  "--to", "gguf:Q8_0", "--extras", str(tmp_path / "x"),
                                  "--extras-format", "gguf", "--extras-type", "q4_km"])
    assert r.exit_code == 2 and "did you mean" in r.output
    with pytest.raises(UsageError, match="--extras-format gguf only"):
        quantize(checkpoint("flux_dev"), tmp_path / "m.gguf", "gguf:Q8_0",
                 extras_dir=tmp_path / "x", extras_type="Q8_0")
    with pytest.raises(UsageError, match="need --extras DIR"):
        quantize(checkpoint("flux_dev"), tmp_path / "m.gguf", "gguf:Q8_0", extras_format="gguf")


def test_t5_tensor_without_gguf_name_is_refused(tmp_path):
    sd = dict(source("flux_dev"))
    bad = T5_PREFIX + "encoder.block.0.layer.1.DenseReluDense.wi.weight"   # T5 v1.0, not gated
    sd[bad] = torch.randn(64, 32) * 0.02
    src = tmp_path / "t5v10.safetensors"
    st.save_file(sd, src)
    with pytest.raises(UsageError, match="DenseReluDense.wi.weight"):
        quantize(src, tmp_path / "m.gguf", "gguf:Q8_0", extras_dir=tmp_path / "x",
                 extras_format="gguf")
    assert not (tmp_path / "m.gguf").exists() and list((tmp_path / "x").iterdir()) == []


def test_existing_extra_checked_up_front_and_cli(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "m.text_encoder_2.gguf").write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        run("flux_dev", tmp_path, "comfy")
    assert not (tmp_path / "m.gguf").exists()                 # nothing written at all
    assert (tmp_path / "x" / "m.text_encoder_2.gguf").read_bytes() == b"keep me"
    r = CliRunner().invoke(main, ["quantize", str(checkpoint("flux_dev")), str(tmp_path / "m.gguf"),
                                  "--to", "gguf:Q8_0", "--extras", str(tmp_path / "x"),
                                  "--extras-format", "gguf", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert "m.text_encoder_2.gguf (15 tensors measured" in r.output
    assert r.output.count("note: extras:") == 3
    assert gguf.GGUFReader(tmp_path / "x" / "m.text_encoder_2.gguf").tensors
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [
        "m.text_encoder.safetensors", "m.text_encoder_2.gguf", "m.vae.safetensors"]


def test_dry_run_writes_nothing(tmp_path):
    (tmp_path / "x").mkdir()
    res = quantize(checkpoint("flux_dev"), tmp_path / "m.gguf", "gguf:Q8_0",
                   extras_dir=tmp_path / "x", extras_format="gguf", layout="sdcpp",
                   extras_type="Q4_0", dry_run=True)
    assert res.extras is None and list((tmp_path / "x").iterdir()) == []
    notes = [n for n in res.plan.notes if n.startswith("extras:")]
    assert any("GGUF Q4_0" in n and "--t5xxl" in n for n in notes)
    assert len(notes) == 3
    assert re.search(r"left out: text_model\.embeddings\.position_ids", " ".join(notes))
