"""Reading diffusers model folders saved with a quantization_config (convkit.sources.hf_quant).

The folders are the libraries' own: ``convkit quantize --to quanto:*|torchao:int8wo`` writes
exactly what diffusers' ``save_pretrained`` writes (tests/test_quantize_hf_libs.py proves it);
quanto int2 and bitsandbytes 8-bit are saved by diffusers itself (see :func:`bnb8_folder`).
Every decoded weight must equal the library's own dequantization (the model diffusers reloads
from the folder; bitsandbytes' ``int8_vectorwise_dequant``), bit for bit, and be within the
quantization's error of the fp32 source; the logical keys are exactly the model's state_dict
keys; a damaged folder gives one error naming the tensor.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from safetensors import safe_open

from convkit.errors import InputFormatError
from convkit.quantize import quantize
from convkit.sources import hf_quant, open_source

pytest.importorskip("optimum.quanto")
pytest.importorskip("torchao")

from tests._quanto import one_build_at_a_time  # noqa: E402

one_build_at_a_time()

WEIGHTS = "diffusion_pytorch_model.safetensors"
#: folder kind -> (storage label of the decoded weights, relative RMSE bound vs the fp32 source)
KINDS = {"quanto:int8": ("quanto:qint8", 0.01), "quanto:int4": ("quanto:qint4", 0.15),
         "quanto:fp8": ("quanto:qfloat8_e4m3fn", 0.05), "quanto:int2": ("quanto:qint2", 0.6),
         "torchao:int8wo": ("torchao:Int8Tensor", 0.01), "bnb:int8": ("bnb:int8", 0.01)}
AUX = ("._data", "._scale", "._shift", ".input_scale", ".output_scale", "_qdata", "_scale",
       "_zero_point", ".SCB", ".weight_format")

_FOLDERS: dict[str, Path] = {}


def _quiet():
    warnings.simplefilter("ignore")


def bnb8_folder(unet_folder: Path, out: Path) -> Path:
    """bitsandbytes 8-bit as diffusers saves it: ``UNet2DConditionModel.from_pretrained(...,
    quantization_config=BitsAndBytesConfig(load_in_8bit=True))`` then ``save_pretrained``.

    diffusers refuses to *quantize* without a GPU ("No GPU found. A GPU is needed for
    quantization.", ``BnB8BitDiffusersQuantizer.validate_environment``), but bitsandbytes
    (>= 0.45) quantizes ``Int8Params`` on the CPU with the same ``int8_vectorwise_quant``. So the
    GPU check alone is skipped and the model is placed on the CPU (``device_map``); module
    replacement, quantization, ``Linear8bitLt._save_to_state_dict`` (weight, SCB, weight_format)
    and ``save_pretrained`` are diffusers' and bitsandbytes' own code."""
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import (
        BnB8BitDiffusersQuantizer,
    )

    check = BnB8BitDiffusersQuantizer.validate_environment
    BnB8BitDiffusersQuantizer.validate_environment = lambda self, *a, **k: None
    try:
        with warnings.catch_warnings():
            _quiet()
            m = UNet2DConditionModel.from_pretrained(
                str(unet_folder), quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                torch_dtype=torch.float32, device_map={"": "cpu"})
            m.save_pretrained(str(out))
    finally:
        BnB8BitDiffusersQuantizer.validate_environment = check
    return out


def diffusers_quanto_folder(unet_folder: Path, out: Path, weights_dtype: str) -> Path:
    """diffusers' own QuantoConfig load + save_pretrained (for int2, which convkit does not
    write)."""
    from diffusers import QuantoConfig, UNet2DConditionModel

    with warnings.catch_warnings():
        _quiet()
        m = UNet2DConditionModel.from_pretrained(
            str(unet_folder), quantization_config=QuantoConfig(weights_dtype=weights_dtype),
            torch_dtype=torch.float32)
        m.save_pretrained(str(out))
    return out


def folder(kind: str, sdxl, tmp_path_factory) -> Path:
    if kind not in _FOLDERS:
        _, single, base, _ = sdxl
        out = tmp_path_factory.mktemp("hfq") / kind.replace(":", "_")
        if kind == "bnb:int8":
            bnb8_folder(base / "unet", out)
        elif kind == "quanto:int2":
            diffusers_quanto_folder(base / "unet", out, "int2")
        else:
            quantize(single, out, kind)
        _FOLDERS[kind] = out
    return _FOLDERS[kind]


def library_dequantized(kind: str, path: Path, ref: dict) -> dict[str, torch.Tensor]:
    """{weight key: the library's own dequantization} for every quantized Linear weight, each
    loaded the way the library itself loads the folder (``ref``: the float model's state_dict,
    for the Linear shapes)."""
    sd = st.load_file(path / WEIGHTS)
    out = {}
    if kind == "bnb:int8":
        import bitsandbytes as bnb

        for k, scb in sd.items():
            if k.endswith(".SCB"):
                w = k[: -len("SCB")] + "weight"
                out[w] = bnb.functional.int8_vectorwise_dequant(sd[w], scb)
        return out
    if kind.startswith("torchao"):
        # what diffusers' TorchAoHfQuantizer.maybe_update_state_dict does with the file
        from torchao.prototype.safetensors.safetensors_support import (
            unflatten_tensor_state_dict,
        )

        with safe_open(path / WEIGHTS, "pt") as f:
            got, _ = unflatten_tensor_state_dict(sd, f.metadata())
        return {k: t.dequantize().float() for k, t in got.items() if type(t) is not torch.Tensor}
    # quanto: a QLinear loads its module's part of the state dict, as in the reloaded model
    # (QModuleMixin._load_from_state_dict -> WeightQ*Tensor.load_from_state_dict, optimize())
    from optimum.quanto import QLinear, qtypes

    qtype = qtypes[{"int8": "qint8", "int4": "qint4", "int2": "qint2",
                    "fp8": "qfloat8"}[kind.split(":")[1]]]
    for k in sd:
        if k.endswith(".weight._scale"):
            mod = k[: -len(".weight._scale")]
            out_f, in_f = ref[mod + ".weight"].shape
            ql = QLinear(in_f, out_f, bias=mod + ".bias" in sd, weights=qtype)
            ql.load_state_dict({n[len(mod) + 1:]: t for n, t in sd.items()
                                if n.startswith(mod + ".")}, strict=False)
            with torch.no_grad():
                out[mod + ".weight"] = ql.weight.dequantize().float()
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_decoded_like_the_library(sdxl, tmp_path_factory, kind):
    model, _, _, _ = sdxl
    path = folder(kind, sdxl, tmp_path_factory)
    ref = model.components["unet"].state_dict()
    label, bound = KINDS[kind]
    lib = library_dequantized(kind, path, ref)
    assert len(lib) > 300
    with open_source(path) as v:
        assert not set(lib) - set(v.keys()), (
            "quantized weights missing from the view: WeightsView must list a decoder whose "
            "logical key is not a stored key (quanto/torchao: X.weight from X.weight._data / "
            "X._weight_qdata) in place of its hidden main tensor (convkit/sources/view.py)")
        assert set(v.keys()) == set(ref)
        assert not [k for k in v.keys() if k.endswith(AUX)]
        decoded = {k for k in v.keys() if v.info(k).storage == label}
        assert decoded == set(lib)
        worst = 0.0
        for k in sorted(decoded):
            x = v.load(k)
            assert x.dtype == torch.float32 and tuple(x.shape) == tuple(ref[k].shape), k
            assert torch.equal(x, lib[k]), k
            r = ref[k].float()
            worst = max(worst, float((x - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt()))
        assert worst < bound
        # ranges of rows (the engine's chunked reads) give the same values
        g = v.granule(k)
        if kind in ("quanto:int8", "quanto:fp8", "torchao:int8wo", "bnb:int8"):
            assert g == ref[k].shape[1] and v.chunkable(k)
            for k in sorted(decoded)[:40]:
                whole = v.load(k).reshape(-1)
                out = torch.empty_like(whole)
                step = 3 * v.granule(k)
                for a in range(0, whole.numel(), step):
                    n = min(step, whole.numel() - a)
                    v.read_logical(k, a, n, out[a:a + n])
                assert torch.equal(out, whole), k
        else:
            assert g == 0
            # quanto picks a group size per Linear: per-row and grouped weights are both here
            assert {v.decoder(k).group_size for k in decoded} == {None, 32}
        # everything else is the stored float tensor
        for k in sorted(set(ref) - decoded)[:50]:
            assert torch.equal(v.load(k), ref[k]), k


# ----------------------------------------------------------------------------- damaged folders


def _copy(src: Path, dst: Path, edit) -> Path:
    """``src`` with its weights rewritten by ``edit(tensors, metadata)``."""
    shutil.copytree(src, dst)
    with safe_open(src / WEIGHTS, "pt") as f:
        meta = f.metadata()
    sd = st.load_file(src / WEIGHTS)
    edit(sd, meta)
    st.save_file(sd, dst / WEIGHTS, metadata=meta)
    return dst


L = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
G = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"     # in 160: int4 groups of 32


def _drop(key):
    return lambda sd, meta: sd.pop(key)


def _cut(key, rows=1):
    def edit(sd, meta):
        sd[key] = sd[key][:-rows].clone()
    return edit


CASES = [
    ("quanto:int8", _drop(L + ".weight._scale"), L + ".weight", "_scale"),
    ("quanto:int8", _cut(L + ".weight._scale"), L + ".weight._scale", "does not fit"),
    ("quanto:fp8", _cut(L + ".weight._scale"), L + ".weight._scale", "does not fit"),
    ("quanto:int4", _drop(G + ".weight._shift"), G + ".weight", "_shift"),
    ("quanto:int4", _cut(G + ".weight._scale", 2), G + ".weight._scale", "group of 32"),
    ("quanto:int4", _cut(G + ".weight._data._data"), G + ".weight._data._data", "expected"),
    ("torchao:int8wo", _drop(L + "._weight_scale"), L + ".weight", "_weight_scale"),
    ("torchao:int8wo", _cut(L + "._weight_scale"), L + "._weight_scale", "does not fit"),
    ("bnb:int8", _drop(L + ".SCB"), L + ".weight", "without its SCB"),
    ("bnb:int8", _cut(L + ".SCB"), L + ".SCB", "does not fit"),
]


@pytest.mark.parametrize("kind,edit,key,words", CASES,
                         ids=[f"{c[0]}-{c[2].rsplit('.', 1)[-1]}-{i}" for i, c in enumerate(CASES)])
def test_damaged_folder_names_the_tensor(sdxl, tmp_path_factory, tmp_path, kind, edit, key, words):
    bad = _copy(folder(kind, sdxl, tmp_path_factory), tmp_path / "bad", edit)
    with pytest.raises(InputFormatError) as e:
        open_source(bad)
    err = e.value
    assert type(err) is InputFormatError, str(err)          # one problem, not a group
    assert err.key == key and words in str(err) and str(bad) in str(err)


def test_quanto_dtype_or_library_missing(sdxl, tmp_path_factory, tmp_path, monkeypatch):
    src = folder("quanto:int8", sdxl, tmp_path_factory)
    bad = shutil.copytree(src, tmp_path / "q")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["weights_dtype"] = "int3"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputFormatError, match="weights_dtype 'int3' cannot be decoded") as e:
        open_source(bad)
    assert "start from the unquantized model" in str(e.value)
    monkeypatch.setattr(hf_quant, "_import", lambda lib: None)
    for kind, pkg in (("quanto:int8", "pip install optimum-quanto"),
                      ("torchao:int8wo", "pip install torchao")):
        with pytest.raises(InputFormatError, match=pkg) as e:
            open_source(folder(kind, sdxl, tmp_path_factory))
        assert type(e.value) is InputFormatError


def test_torchao_metadata_missing(sdxl, tmp_path_factory, tmp_path):
    def strip(sd, meta):
        meta.clear()
        meta["format"] = "pt"
    bad = _copy(folder("torchao:int8wo", sdxl, tmp_path_factory), tmp_path / "t", strip)
    with pytest.raises(InputFormatError, match="without torchao's safetensors metadata"):
        open_source(bad)


def test_quanto_parts_without_config(sdxl, tmp_path_factory, tmp_path):
    """quanto tensors whose config.json lost its quantization_config: said once, not 300
    times, and never shown as plain tensors."""
    bad = shutil.copytree(folder("quanto:int4", sdxl, tmp_path_factory), tmp_path / "q")
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputFormatError, match="without a quantization_config") as e:
        open_source(bad)
    assert type(e.value) is InputFormatError


def test_int4_shape_needs_the_model_config(sdxl, tmp_path_factory, tmp_path):
    """Packed int4 data does not show its weight's shape: it comes from the model the config
    names (or the module's bias); without either, one error says so."""
    bad = shutil.copytree(folder("quanto:int4", sdxl, tmp_path_factory), tmp_path / "q")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["_class_name"] = "NoSuchModel2DModel"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputFormatError, match=r"cannot tell the shape of \d+ qint4") as e:
        open_source(bad)
    assert type(e.value) is InputFormatError
    assert e.value.key.rsplit(".", 2)[1] in ("to_q", "to_k", "to_v")   # no bias: no shape


@pytest.mark.parametrize("kind", ["quanto:int4", "torchao:int8wo", "bnb:int8"])
def test_pipeline_folder(sdxl, tmp_path_factory, tmp_path, kind):
    """The quantized UNet inside a pipeline folder (model_index.json): keys 'unet/...'."""
    _, _, base, _ = sdxl
    pipe = shutil.copytree(base, tmp_path / "pipe")
    shutil.rmtree(pipe / "unet")
    shutil.copytree(folder(kind, sdxl, tmp_path_factory), pipe / "unet")
    with open_source(base) as ref, open_source(pipe) as v:
        assert set(v.keys()) == set(ref.keys())
        k = f"unet/{G}.weight"
        assert v.info(k).storage == KINDS[kind][0] and v.info(k).shape == (40, 160)
        r, x = ref.load(k).float(), v.load(k)
        assert float((x - r).norm() / r.norm()) < KINDS[kind][1]
        assert torch.equal(v.load("text_encoder/final_layer_norm.weight"),
                           ref.load("text_encoder/final_layer_norm.weight"))


def test_torchao_sharded_bf16(sdxl, tmp_path):
    """Shards as save_pretrained(max_shard_size=...) writes them (every shard carries the whole
    torchao metadata; diffusers merges it), bf16 model: Int8Tensor.dequantize() in bf16."""
    from torchao.prototype.safetensors.safetensors_support import (
        unflatten_tensor_state_dict,
    )

    from convkit.quantize import parse_target
    from convkit.quantize.hf_libs import quantize_hf

    model, single, _, _ = sdxl
    out = tmp_path / "ao"
    quantize_hf(single, out, parse_target("torchao:int8wo"), rest_dtype="bf16",
                max_shard_size="300KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    sd, meta = {}, {}
    for f in shards:
        sd.update(st.load_file(f))
        with safe_open(f, "pt") as h:
            meta.update(h.metadata())
    lib, _ = unflatten_tensor_state_dict(sd, meta)
    ref = model.components["unet"].state_dict()
    with open_source(out) as v:
        assert set(v.keys()) == set(ref)
        n = 0
        for k, t in lib.items():
            if type(t) is torch.Tensor:
                assert v.info(k).dtype == "BF16" and torch.equal(v.load(k), t)
                continue
            assert v.info(k).storage == "torchao:Int8Tensor" and t.dtype == torch.bfloat16
            assert torch.equal(v.load(k), t.dequantize().float()), k
            n += 1
        assert n > 300


def bnb4_folder(unet_folder: Path, out: Path, quant_type: str, double: bool) -> Path:
    """bitsandbytes 4-bit as diffusers saves it (``BitsAndBytesConfig(load_in_4bit=True)`` +
    ``save_pretrained``); like :func:`bnb8_folder`, only diffusers' GPU check is skipped:
    bitsandbytes >= 0.45 quantizes ``Params4bit`` on the CPU."""
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    check = BnB4BitDiffusersQuantizer.validate_environment
    BnB4BitDiffusersQuantizer.validate_environment = lambda self, *a, **k: None
    try:
        with warnings.catch_warnings():
            _quiet()
            cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                     bnb_4bit_use_double_quant=double,
                                     bnb_4bit_compute_dtype=torch.float32)
            m = UNet2DConditionModel.from_pretrained(
                str(unet_folder), quantization_config=cfg, torch_dtype=torch.float32,
                device_map={"": "cpu"})
            m.save_pretrained(str(out))
    finally:
        BnB4BitDiffusersQuantizer.validate_environment = check
    return out


@pytest.mark.parametrize("quant_type,double", [("nf4", False), ("fp4", False), ("nf4", True)])
def test_diffusers_bnb4_folder(quant_type, double, sdxl, tmp_path):
    """The diffusers-bitsandbytes 4-bit layout (the same tensors as Forge's) through the view:
    every 4-bit weight equals bitsandbytes' own dequantize of the flattened weight, the key set
    is the UNet's state dict, and convert to fp32 writes no quant state."""
    import bitsandbytes.functional as F

    from convkit.convert import convert

    def _rel(a, b):
        return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())

    _, _, base, _ = sdxl
    out = bnb4_folder(base / "unet", tmp_path / "bnb4", quant_type, double)
    stored = {}
    for f in sorted(out.glob("*.safetensors")):
        stored.update(st.load_file(f))
    ref = st.load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    with open_source(out) as v:
        assert set(v.keys()) == set(ref)
        four = [k for k in v.keys() if v.info(k).storage.startswith(quant_type)]
        assert len(four) > 20
        for k in four:
            qs = F.QuantState.from_dict({n[len(k) + 1:]: t for n, t in stored.items()
                                         if n.startswith(k + ".")}, device=torch.device("cpu"))
            shape = tuple(qs.shape)
            qs.shape = torch.Size([1, math.prod(shape)])
            theirs = F.dequantize_4bit(stored[k].reshape(-1, 1), qs).float().reshape(shape)
            assert torch.equal(v.load(k), theirs), k
            assert _rel(v.load(k), ref[k]) < 0.15, k
    convert(out, tmp_path / "fp32", "fp32")
    got = st.load_file(tmp_path / "fp32" / "diffusion_pytorch_model.safetensors")
    assert set(got) == set(ref) and all(t.dtype == torch.float32 for t in got.values()
                                        if t.is_floating_point())
    cfg = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert "quantization_config" not in cfg
