"""quanto:* / torchao:* targets: diffusers model folders.

The proof is diffusers itself: the folder convkit writes equals, file for file and tensor for
tensor (bit-identical), what diffusers writes when it loads the same tiny model with
``quantization_config=QuantoConfig(...)`` / ``TorchAoConfig(...)`` and calls ``save_pretrained``;
``from_pretrained`` reloads it on CPU as quantized modules whose dequantized weights are within
the stated bounds of the source, and the model runs.
"""
from __future__ import annotations

import functools
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from click.testing import CliRunner
from safetensors import safe_open

from convkit import tiny
from convkit.cli import main
from convkit.errors import InputFormatError, OutputExistsError, TensorValueError, UsageError
from convkit.quantize import parse_target, quantize
from convkit.quantize import hf_backends
from convkit.quantize.hf_libs import quantize_hf

pytest.importorskip("optimum.quanto")
pytest.importorskip("torchao")

from tests._quanto import one_build_at_a_time  # noqa: E402

one_build_at_a_time()

TARGETS = ["quanto:int8", "quanto:int4", "quanto:fp8", "torchao:int8wo"]
#: per-tensor relative RMSE of the dequantized weight (tiny models: Gaussian weights)
WEIGHT_BOUND = {"quanto:int8": 0.01, "quanto:int4": 0.12, "quanto:fp8": 0.035,
                "torchao:int8wo": 0.01}
#: relative error of the tiny fp32 SDXL UNet's output against the unquantized model
FORWARD_BOUND = {"quanto:int8": 0.005, "quanto:int4": 0.05, "quanto:fp8": 0.02,
                 "torchao:int8wo": 0.005}


def _quiet():
    warnings.simplefilter("ignore")


@functools.lru_cache(maxsize=None)
def flux_files() -> tuple[Path, Path]:
    """Tiny Flux dev: BFL single file (fused qkv/linear1) and diffusers folder, fp32."""
    d = Path(tempfile.mkdtemp(prefix="convkit-hf-"))
    m = tiny.build("flux_dev", 0)
    return (tiny.save_single_file(m, d / "flux.safetensors", layout="bfl"),
            tiny.save_diffusers(m, d / "folder"))


@functools.lru_cache(maxsize=None)
def flux64() -> Path:
    """A lone bf16 transformer folder, hidden 64: its 256-wide MLP gives quanto int4 group size
    128, the TinyGemm path on CPU (the tiny models only have groups of 32 / per-row)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                               attention_head_dim=16, num_attention_heads=4,
                               joint_attention_dim=32, pooled_projection_dim=32,
                               guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    d = Path(tempfile.mkdtemp(prefix="convkit-hf64-")) / "transformer"
    m.to(torch.bfloat16).save_pretrained(d)
    return d


def hf_config(target: str):
    from diffusers import QuantoConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    lib, what = target.split(":")
    if lib == "quanto":
        return QuantoConfig(weights_dtype={"int8": "int8", "int4": "int4", "fp8": "float8"}[what])
    return TorchAoConfig(Int8WeightOnlyConfig())


def diffusers_save(cls_name, folder, sub, target, dtype, out, **kw) -> Path:
    import diffusers

    with warnings.catch_warnings():
        _quiet()
        m = getattr(diffusers, cls_name).from_pretrained(
            str(folder), subfolder=sub, quantization_config=hf_config(target), torch_dtype=dtype)
        m.save_pretrained(str(out), **kw)
    return out


def assert_same_folder(a: Path, b: Path) -> int:
    """Same files; config.json equal but for _name_or_path; every safetensors file the same keys,
    dtypes, shapes and bit-identical tensors; diffusers' metadata a subset of ours (we add
    convkit provenance); JSON index equal."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    ca, cb = (json.loads((x / "config.json").read_text()) for x in (a, b))
    ca.pop("_name_or_path")
    cb.pop("_name_or_path")
    assert ca == cb
    n = 0
    for f in sorted(b.iterdir()):
        if f.name.endswith(".index.json"):
            assert json.loads((a / f.name).read_text()) == json.loads(f.read_text())
        if f.suffix != ".safetensors":
            continue
        with safe_open(a / f.name, "pt") as x, safe_open(f, "pt") as y:
            assert set(x.keys()) == set(y.keys())
            mx, my = x.metadata(), y.metadata()
            assert {k: mx.get(k) for k in my} == my
            assert mx["convkit.quantization"] and "convkit.quant_report" in mx
            for k in y.keys():
                ta, tb = x.get_tensor(k), y.get_tensor(k)
                assert (ta.dtype, ta.shape) == (tb.dtype, tb.shape), k
                if ta.dtype.itemsize == 1:
                    ta, tb = ta.view(torch.uint8), tb.view(torch.uint8)
                assert torch.equal(ta, tb), k
                n += 1
    return n


@pytest.mark.parametrize("target", TARGETS)
def test_same_files_as_diffusers_sdxl_fp32(sdxl, tmp_path, target):
    _, _, folder, _ = sdxl
    quantize(folder, tmp_path / "ck", target)
    diffusers_save("UNet2DConditionModel", folder, "unet", target, torch.float32, tmp_path / "hf")
    assert assert_same_folder(tmp_path / "ck", tmp_path / "hf") > 1000


@pytest.mark.parametrize("target", TARGETS)
def test_same_files_as_diffusers_flux_bf16(tmp_path, target):
    """bf16 source, lone component folder; quanto int4 with group size 128 (TinyGemm on CPU)."""
    src = flux64()
    res = quantize(src, tmp_path / "ck", target)
    assert res.plan.dtype == "BF16"
    diffusers_save("FluxTransformer2DModel", src, None, target, torch.bfloat16, tmp_path / "hf")
    assert assert_same_folder(tmp_path / "ck", tmp_path / "hf") > 100
    if target == "quanto:int4":
        with safe_open(tmp_path / "ck" / "diffusion_pytorch_model.safetensors", "pt") as f:
            # 256 in-features -> groups of 128: (out*in/128, 1) scales
            assert f.get_slice("transformer_blocks.0.ff.net.2.weight._scale").get_shape() == [128, 1]


@pytest.mark.parametrize("target", ["torchao:int8wo", "quanto:int4"])
def test_sharded_like_diffusers_and_reloads(sdxl, tmp_path, target):
    _, _, folder, _ = sdxl
    quantize_hf(folder, tmp_path / "ck", parse_target(target), rest_dtype="bf16",
                max_shard_size="300KB")
    diffusers_save("UNet2DConditionModel", folder, "unet", target, torch.bfloat16, tmp_path / "hf",
                   max_shard_size="300KB")
    assert (tmp_path / "ck" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert assert_same_folder(tmp_path / "ck", tmp_path / "hf") > 1000
    m = _reload(tmp_path / "ck", torch.bfloat16)
    assert _quantized_linears(m, target) == _linear_count(m)


def _reload(path: Path, dtype=torch.float32):
    from diffusers import UNet2DConditionModel, FluxTransformer2DModel

    cls_name = json.loads((path / "config.json").read_text())["_class_name"]
    cls = {"UNet2DConditionModel": UNet2DConditionModel,
           "FluxTransformer2DModel": FluxTransformer2DModel}[cls_name]
    with warnings.catch_warnings():
        _quiet()
        return cls.from_pretrained(str(path), torch_dtype=dtype)


def _linear_count(m) -> int:
    return sum(isinstance(x, torch.nn.Linear) for x in m.modules())


def _quantized_linears(m, target: str) -> int:
    """Linear modules holding the expected quantized weight kind."""
    if target.startswith("quanto"):
        from optimum.quanto import QLinear, QTensor

        want = {"quanto:int8": "qint8", "quanto:int4": "qint4", "quanto:fp8": "qfloat8_e4m3fn"}[target]
        return sum(isinstance(x, QLinear) and isinstance(x.weight, QTensor)
                   and x.weight.qtype.name == want for x in m.modules())
    from torchao.quantization import Int8Tensor

    return sum(isinstance(x, torch.nn.Linear) and isinstance(x.weight, Int8Tensor)
               for x in m.modules())


def _unet_inputs(cfg):
    g = torch.Generator().manual_seed(1)
    n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([10.0]),
                encoder_hidden_states=torch.randn(1, 7, cfg.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, n_text, generator=g),
                                   "time_ids": torch.randn(1, 6, generator=g)})


@pytest.mark.parametrize("target", TARGETS)
def test_reloads_quantized_and_runs(sdxl, tmp_path, target):
    """From the SGM single file: diffusers reloads the folder on CPU, every Linear is a quantized
    module of the expected kind, dequantized weights are within the bound, the UNet runs."""
    model, single, _, _ = sdxl
    res = quantize(single, tmp_path / "q", target)
    assert res.plan.model.config_from.startswith("convkit's tiny sdxl")
    ref = model.components["unet"]
    m = _reload(tmp_path / "q")
    n = _linear_count(ref)
    assert n > 300 and _quantized_linears(m, target) == n
    src = ref.state_dict()
    worst = 0.0
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            with torch.no_grad():
                deq = mod.weight.dequantize().float()
            s = src[name + ".weight"].float()
            worst = max(worst, float((deq - s).pow(2).mean().sqrt() / s.pow(2).mean().sqrt()))
    assert worst < WEIGHT_BOUND[target]
    assert abs(worst - res.report.summary()["max_rel_rmse"]) < 1e-5   # the report is the file
    with torch.no_grad():
        y0 = ref(**_unet_inputs(ref.config))[0]
        y1 = m(**_unet_inputs(m.config))[0]
    assert float((y1 - y0).norm() / y0.norm()) < FORWARD_BOUND[target]


def test_single_file_equals_folder_input(sdxl, tmp_path):
    """SGM names (UNet) and BFL names (Flux: fused qkv / linear1 split into diffusers parts)."""
    _, single, folder, _ = sdxl
    fsingle, ffolder = flux_files()
    for i, (a, b, target) in enumerate([(single, folder, "quanto:int4"),
                                        (fsingle, ffolder, "torchao:int8wo")]):
        quantize(a, tmp_path / f"a{i}", target)
        quantize(b, tmp_path / f"b{i}", target)
        sa = st.load_file(tmp_path / f"a{i}" / "diffusion_pytorch_model.safetensors")
        sb = st.load_file(tmp_path / f"b{i}" / "diffusion_pytorch_model.safetensors")
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "single_transformer_blocks.0.attn.to_k._weight_qdata" in sa


def test_flux_single_file_reloads(tmp_path):
    fsingle, _ = flux_files()
    res = quantize(fsingle, tmp_path / "q", "quanto:fp8", rest_dtype="bf16")
    assert res.plan.dtype == "BF16" and res.plan.model.cls_name == "FluxTransformer2DModel"
    m = _reload(tmp_path / "q", torch.bfloat16)
    assert _quantized_linears(m, "quanto:fp8") == _linear_count(m) > 30
    assert res.report.summary()["max_rel_rmse"] < WEIGHT_BOUND["quanto:fp8"]


def test_torchao_int4wo_refused_up_front(tmp_path):
    with pytest.raises(UsageError) as e:
        quantize(flux_files()[0], tmp_path / "x", "torchao:int4wo")
    msg = str(e.value)
    assert "mslk" in msg and "compute capability" in msg and "quanto:int4" in msg
    assert "\n" not in msg and not (tmp_path / "x").exists()


def test_missing_library_says_what_to_install(tmp_path, monkeypatch):
    real = hf_backends._version
    monkeypatch.setattr(hf_backends, "_version",
                        lambda d: None if d in ("optimum-quanto", "torchao") else real(d))
    for target, pkg in (("quanto:int8", "pip install optimum-quanto"),
                        ("torchao:int8wo", "pip install torchao")):
        with pytest.raises(UsageError, match=pkg):
            quantize(flux_files()[0], tmp_path / "x", target)
    monkeypatch.setattr(hf_backends, "_version", lambda d: "0.1.0")
    with pytest.raises(UsageError, match=r"optimum-quanto >= 0\.2\.6"):
        quantize(flux_files()[0], tmp_path / "x", "quanto:int8")


def test_other_targets_options_refused(tmp_path):
    with pytest.raises(UsageError, match="--layout, --type-rule"):
        quantize(flux_files()[0], tmp_path / "x", "quanto:int8", layout="sdcpp",
                 type_rules=["x=Q8_0"])
    with pytest.raises(UsageError, match="writes a diffusers model folder"):
        quantize(flux_files()[0], tmp_path / "x.safetensors", "quanto:int8")


def test_atomic_overwrite_dry_run_nan(tmp_path):
    fsingle, _ = flux_files()
    out = tmp_path / "q"
    res = quantize(fsingle, out, "quanto:int8", dry_run=True)
    assert not out.exists() and res.stats is None
    assert "config.json" in res.plan.format() and res.plan.out_bytes > 0
    quantize(fsingle, out, "quanto:int8")
    with pytest.raises(OutputExistsError):
        quantize(fsingle, out, "torchao:int8wo")
    quantize(fsingle, out, "torchao:int8wo", overwrite=True)
    assert "torchao" in (out / "config.json").read_text()
    sd = st.load_file(fsingle)
    bad = "single_blocks.0.linear1.weight"
    sd[bad][1, 2] = float("nan")
    st.save_file(sd, tmp_path / "nan.safetensors")
    with pytest.raises(TensorValueError, match=bad):
        quantize(tmp_path / "nan.safetensors", tmp_path / "n", "quanto:int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors", "q"]  # no temp left


def test_unknown_size_single_file_needs_a_config(sdxl, tmp_path):
    """A single file whose shapes fit no known config and no config inferred from them (one
    cross-attention layer wider than the others): refused, saying what to do."""
    model, _, _, _ = sdxl
    big = tiny.build_copy(model)
    sd = tiny.state_dict_single_file(big)
    k = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1] + 8)
    st.save_file(sd, tmp_path / "odd.safetensors")
    with pytest.raises(InputFormatError, match="cannot tell the config.*quantize its diffusers"):
        quantize(tmp_path / "odd.safetensors", tmp_path / "x", "quanto:int8")
    # the library API takes the config; a config that does not fit is named with the tensor
    _, single, folder, _ = sdxl
    res = quantize_hf(single, tmp_path / "x", parse_target("quanto:int8"),
                      config=folder / "unet", dry_run=True)
    assert res.plan.model.config_from.endswith("unet/config.json")
    with pytest.raises(ValueError, match="attn2.to_k.weight"):
        quantize_hf(tmp_path / "odd.safetensors", tmp_path / "x", parse_target("quanto:int8"),
                    config=folder / "unet" / "config.json", dry_run=True)


def test_cli_json_and_dry_run(tmp_path):
    fsingle, _ = flux_files()
    r = CliRunner().invoke(main, ["quantize", str(fsingle), str(tmp_path / "q"), "--to",
                                  "torchao:int8wo", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "FluxTransformer2DModel" in r.output and "torchao +2 tensors" in r.output
    r = CliRunner().invoke(main, ["quantize", str(fsingle), str(tmp_path / "q"), "--to",
                                  "quanto:int4", "--json", "--rest-dtype", "bf16"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["format"] == "diffusers" and d["verified_tensors"] > 200
    assert d["error"]["by_type"]["qint4"]["max_rel_rmse"] < WEIGHT_BOUND["quanto:int4"]
    r = CliRunner().invoke(main, ["quantize", str(fsingle), str(tmp_path / "z"), "--to",
                                  "torchao:int4wo"])
    assert r.exit_code == 2 and "mslk" in r.output


def test_already_quantized_inputs(tmp_path):
    """Already-quantized inputs - a GGUF file, a quanto folder - are read through the
    logical-weights view: dequantized first (torch_dtype bf16, said so), then quantized again."""
    fsingle, _ = flux_files()
    quantize(fsingle, tmp_path / "a.gguf", "gguf:Q8_0")
    res = quantize(tmp_path / "a.gguf", tmp_path / "q", "quanto:int8")
    assert res.plan.dtype == "BF16" and any("dequantized" in n for n in res.plan.notes)
    m = _reload(tmp_path / "q", torch.bfloat16)
    assert _quantized_linears(m, "quanto:int8") == _linear_count(m) > 30
    res = quantize(tmp_path / "q", tmp_path / "r", "torchao:int8wo")
    assert res.plan.dtype == "BF16" and any("quanto" in n and "dequantized" in n
                                            for n in res.plan.notes)
    m = _reload(tmp_path / "r", torch.bfloat16)
    assert _quantized_linears(m, "torchao:int8wo") == _linear_count(m) > 30
