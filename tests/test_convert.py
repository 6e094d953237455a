"""convert / inspect / detection on tiny real-layout models (built from the real classes)."""
import json
import math

import pytest
import safetensors.torch as st
import torch
from click.testing import CliRunner

from convkit import archs, errors, tiny
from convkit.cli import main
from convkit.convert import convert
from convkit.inspection import inspect
from convkit.sources import open_source

@pytest.fixture(scope="session")
def models():
    return {a: tiny.build(a, seed=0) for a in tiny.ARCHS}


@pytest.fixture(scope="session")
def sdxl_files(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("sdxl")
    single = tiny.save_single_file(models["sdxl"], d / "sdxl.safetensors")
    folder = tiny.save_diffusers(models["sdxl"], d / "sdxl-diffusers")
    return single, folder


def _one_component_layout(a, naming_is_diffusers: bool) -> str:
    """The architecture's layout holding its diffusion model alone, without prefix."""
    diff = a.diffusion_component
    return next(x.name for x in a.layouts if not x.folder and x.prefixes == {diff: ""}
                and (x.naming == "diffusers") == naming_is_diffusers)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_detect_every_layout(arch, models, tmp_path):
    m = models[arch]
    a = archs.get(arch)
    diff = a.diffusion_component
    full = tiny.state_dict_single_file(m)
    cases = {a.single_file_layout: full}
    prefix = a.layout(a.single_file_layout).prefixes[diff]
    bare = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    cases[_one_component_layout(a, False)] = bare
    cases[_one_component_layout(a, True)] = m.state_dicts()[diff]
    stem = tmp_path / ("sd3.5_large_turbo" if a.variant_of else "x")   # a variant by its name
    for layout, sd in cases.items():
        p = tmp_path / f"{stem.name}-{layout}.safetensors"
        st.save_file({k: v.contiguous() for k, v in sd.items()}, p)
        with open_source(p) as src:
            det = archs.detect(src)
            assert (det.arch.name, det.layout.name) == (arch, layout)
            matches, _ = archs.candidates(src)
            # unambiguous (a variant's base matches the same weights; the hint decides)
            variants = {x.name for x in archs.load_all().values() if x.variant_of == arch}
            assert {m[1].name for m in matches} - {a.variant_of} - variants == {arch}
            assert not det.unexpected, det.unexpected[:5]
            expected_comps = set(a.layout(layout).prefixes)
            assert set(det.component_keys) == expected_comps
    folder = tiny.save_diffusers(m, tmp_path / f"{stem.name}-folder")
    with open_source(folder) as src:
        det = archs.detect(src)
        assert (det.arch.name, det.layout.name) == (arch, "diffusers")
        assert set(det.component_keys) == set(a.components)


def test_inspect_counts_match_the_model(models, sdxl_files):
    single, folder = sdxl_files
    m = models["sdxl"]
    for path in (single, folder):
        r = inspect(path)
        assert r["architecture"] == "sdxl"
        for comp in ("unet", "vae"):
            assert r["components"][comp]["params"] == m.param_counts()[comp]
            assert r["components"][comp]["full_size"] is False  # tiny, and says so
        assert r["components"]["unet"]["dtypes"] == {"F32": r["components"]["unet"]["tensors"]}


def test_fp16_is_a_direct_cast_and_roundtrips_bit_exactly(sdxl_files, tmp_path):
    single, _ = sdxl_files
    f16, f32, f16b = (tmp_path / n for n in ("a16.safetensors", "b32.safetensors",
                                             "c16.safetensors"))
    convert(single, f16, "fp16")
    convert(f16, f32, "fp32")
    convert(f32, f16b, "fp16")
    ref = st.load_file(single)
    a, b, c = st.load_file(f16), st.load_file(f32), st.load_file(f16b)
    assert list(a) == list(ref) == list(c)
    for k, t in ref.items():
        want = t.half() if t.is_floating_point() else t
        assert a[k].dtype == want.dtype and torch.equal(a[k], want), k
        assert torch.equal(b[k], a[k].float() if t.is_floating_point() else a[k]), k
        assert a[k].view(-1).view(torch.uint8).equal(c[k].view(-1).view(torch.uint8)), k
    assert f16.stat().st_size < 0.55 * single.stat().st_size


def test_bf16_and_components(sdxl_files, tmp_path):
    single, _ = sdxl_files
    out = tmp_path / "unet.safetensors"
    r = convert(single, out, "bf16", components="unet")
    with open_source(single) as src:
        det = archs.detect(src)
        unet_keys = det.component_keys["unet"]
    back = st.load_file(out)
    assert sorted(back) == sorted(unet_keys)
    assert all(t.dtype == torch.bfloat16 for t in back.values())
    with open_source(out) as o:
        assert (archs.detect(o).arch.name, archs.detect(o).layout.name) == ("sdxl", "sgm")
    assert any("left out" in n for n in r.plan.notes)
    out2 = tmp_path / "te.safetensors"
    convert(single, out2, "fp16", components="te,vae")
    keys = st.load_file(out2).keys()
    assert all(k.startswith(("conditioner.", "first_stage_model.")) for k in keys)


def test_provenance_metadata_accumulates(sdxl_files, tmp_path):
    single, _ = sdxl_files
    st_meta_src = open_source(single).metadata
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    convert(single, a, "fp16")
    convert(a, b, "fp32")
    meta = open_source(b).metadata
    steps = json.loads(meta["convkit.steps"])
    assert [s["dtype"] for s in steps] == ["fp16", "fp32"]
    assert meta["convkit.source"] == "a.safetensors"
    assert meta["convkit.source_bytes"] == str(a.stat().st_size)
    for k, v in st_meta_src.items():
        assert meta[k] == v


def test_folder_to_folder_sharded_loads_in_diffusers(sdxl_files, tmp_path):
    from diffusers import UNet2DConditionModel

    _, folder = sdxl_files
    out = tmp_path / "fp16-folder"
    convert(folder, out, "fp16", max_shard_bytes=1_000_000)
    shards = sorted((out / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.json")
                       .read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for rel in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json",
                "tokenizer/tokenizer.json"):
        assert (out / rel).read_bytes() == (folder / rel).read_bytes(), rel
    with open_source(out) as a, open_source(folder) as b:  # our own sharded reader
        assert a.keys() == b.keys()
        assert len(a.components["unet"]) == len(shards)
        for k in b.keys():
            t = b.load(k)
            assert torch.equal(a.load(k), t.half() if t.is_floating_point() else t), k
    unet = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float16)
    ref = UNet2DConditionModel.from_pretrained(folder / "unet")
    sd, rsd = unet.state_dict(), ref.state_dict()
    assert sd.keys() == rsd.keys()
    for k in sd:
        assert torch.equal(sd[k], rsd[k].half()), k


def test_folder_subset_marks_missing_components(sdxl_files, tmp_path):
    _, folder = sdxl_files
    out = tmp_path / "unet-only"
    convert(folder, out, "fp16", components="unet")
    mi = json.loads((out / "model_index.json").read_text())
    assert mi["text_encoder"] == [None, None] and mi["vae"] == [None, None]
    assert mi["unet"] == json.loads((folder / "model_index.json").read_text())["unet"]
    assert not (out / "text_encoder").exists() and (out / "unet" / "config.json").exists()


def test_overflow_policies(tmp_path, sdxl_like):
    path, sd = sdxl_like
    big = dict(sd)
    k = "model.diffusion_model.label_emb.0.0.weight"
    big[k] = big[k].clone()
    big[k][0, :5] = torch.tensor([1e5, -1e6, 70000.0, float("inf"), 3.0])
    p = tmp_path / "big.safetensors"
    st.save_file(big, p)
    r = convert(p, tmp_path / "c.safetensors", "fp16")
    assert r.overflows == {k: 3}
    row = st.load_file(tmp_path / "c.safetensors")[k][0, :5].float()
    assert row.tolist()[:3] == [65504.0, -65504.0, 65504.0] and math.isinf(row[3])
    r = convert(p, tmp_path / "i.safetensors", "fp16", on_overflow="inf")
    assert torch.isinf(st.load_file(tmp_path / "i.safetensors")[k][0, :3]).all()
    with pytest.raises(errors.TensorValueError, match="3 values exceed"):
        convert(p, tmp_path / "e.safetensors", "fp16", on_overflow="error")
    assert not (tmp_path / "e.safetensors").exists()
    # bf16 holds these values: no overflow reported
    assert convert(p, tmp_path / "b.safetensors", "bf16").overflows == {}


def test_dry_run_prints_plan_and_writes_nothing(sdxl_files, tmp_path):
    single, _ = sdxl_files
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(main, ["convert", str(single), str(out), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "F32 -> F16" in r.output and "total:" in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
    r = CliRunner().invoke(main, ["convert", str(single), str(out), "--dry-run", "--json"])
    plan = json.loads(r.output)["plan"]
    assert plan["out_bytes"] == sum(i["bytes"] for i in plan["items"])
    assert plan["out_bytes"] < plan["in_bytes"]


def test_inspect_scan_finds_nan(tmp_path, sdxl_like):
    path, sd = sdxl_like
    bad = dict(sd)
    k = "first_stage_model.decoder.conv_out.weight"
    bad[k] = bad[k].clone()
    bad[k].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), float("nan")])
    p = tmp_path / "nan.safetensors"
    st.save_file(bad, p)
    r = inspect(p, scan=True)
    assert r["scan"]["bad"] == {k: {"nan": 2, "inf": 1}}
    assert any(k in o for o in r["odd"])
    out = CliRunner().invoke(main, ["inspect", str(p), "--scan"]).output
    assert "2 NaN, 1 Inf" in out


def test_mixed_dtypes_are_odd(tmp_path, sdxl_like):
    path, sd = sdxl_like
    mixed = dict(sd)
    k = "model.diffusion_model.label_emb.0.0.weight"
    mixed[k] = mixed[k].half()
    p = tmp_path / "mixed.safetensors"
    st.save_file(mixed, p)
    assert any("mixed dtypes" in o for o in inspect(p)["odd"])


def test_gguf_source_reads_and_dequantizes(tmp_path):
    import gguf

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    conv = torch.randn(8, 4, 3, 3, generator=g)
    p = tmp_path / "m.gguf"
    wr = gguf.GGUFWriter(str(p), "sdxl")
    wr.add_tensor("a.weight", gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0),
                  raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    wr.add_tensor("b.weight", conv.numpy().reshape(-1, 36))
    wr.add_array("comfy.gguf.orig_shape.b.weight", [8, 4, 3, 3])
    wr.add_tensor("c.bias", w[0].half().numpy())
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with open_source(p) as src:
        assert src.format == "gguf"
        assert src.info("a.weight").storage == "Q8_0" and src.info("a.weight").shape == (64, 256)
        a = src.load("a.weight")
        assert a.dtype == torch.float32 and a.shape == w.shape
        rel = ((a - w).norm() / w.norm()).item()
        assert rel < 0.01
        assert src.info("b.weight").shape == (8, 4, 3, 3)
        assert torch.equal(src.load("b.weight"), conv)
        assert torch.equal(src.load("c.bias"), w[0].half())
        assert src.metadata["general.architecture"] == "sdxl"


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_chunked_streaming_equals_whole_tensor_cast(sdxl_files, tmp_path, monkeypatch, dtype):
    """Tiny chunks (many per tensor, odd sizes) give exactly a direct whole-tensor cast."""
    from convkit.engine import executor as engine

    single, _ = sdxl_files
    half = tmp_path / "half.safetensors"
    convert(single, half, "fp16")
    monkeypatch.setattr(engine, "CHUNK_BYTES", 1000)
    for src in (single, half):
        out = tmp_path / f"{src.stem}-{dtype}.safetensors"
        convert(src, out, dtype)
        ref, got = st.load_file(src), st.load_file(out)
        tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        for k, t in ref.items():
            want = t.to(tdt) if t.is_floating_point() else t
            assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


def test_chunked_overflow_counts_add_up(tmp_path, monkeypatch, sdxl_like):
    from convkit.engine import executor as engine

    path, sd = sdxl_like
    k = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    big = dict(sd)
    big[k] = torch.full((8, 8), 1e6)
    big[k][0, 0] = float("inf")
    p = tmp_path / "big.safetensors"
    st.save_file(big, p)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 40)  # 10 floats per chunk, 7 chunks
    r = convert(p, tmp_path / "o.safetensors", "fp16")
    assert r.overflows == {k: 63}
    got = st.load_file(tmp_path / "o.safetensors")[k].float()
    assert math.isinf(got[0, 0]) and (got.view(-1)[1:] == 65504).all()


def test_lone_component_folder(sdxl_files, tmp_path):
    """A bare unet/ folder (config.json + weights) is recognised and converted folder->folder."""
    _, folder = sdxl_files
    r = inspect(folder / "unet")
    assert (r["architecture"], r["layout"]) == ("sdxl", "diffusers-unet")
    out = tmp_path / "unet-fp16"
    convert(folder / "unet", out, "fp16")
    assert (out / "config.json").read_bytes() == (folder / "unet" / "config.json").read_bytes()
    a = st.load_file(out / "diffusion_pytorch_model.safetensors")
    b = st.load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].half()) for k in b)
