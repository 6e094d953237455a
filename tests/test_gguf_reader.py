"""convkit's own GGUF reader and decode kernels.

* ``ggml_decode`` is bit-identical to gguf-py's ``dequantize`` (every fast type, quantized data
  with zeros / tiny / large rows, and arbitrary bytes: NaN/Inf/subnormal scales included);
* ``bnb4_decode`` equals bitsandbytes' ``dequantize_4bit`` (through ``nf4.dequantize``);
* ``GGUFFile`` on files written by convkit (comfy and sdcpp layouts) and by gguf-py's
  ``GGUFWriter``: names, shapes, types, raw bytes and values equal gguf-py's reader;
* malformed files: one ``InputFormatError`` naming the file, never a traceback.
"""
from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from convkit import kernels
from convkit.errors import ErrorGroup, InputFormatError
from convkit.kernels.dequant import FAST_TYPES, bnb4_decode, ggml_decodable, ggml_decode
from convkit.quantize import nf4, quantize
from convkit.sources import open_file
from convkit.sources.gguf_file import GGUFFile


def _bits_equal(got: np.ndarray, want: np.ndarray) -> bool:
    """Same float32 bits, except that NaNs only need to be NaN on both sides (the payload of
    a NaN op with two NaN inputs is not pinned by IEEE, see convkit.kernels.dequant)."""
    got, want = got.reshape(-1), np.asarray(want, dtype=np.float32).reshape(-1)
    nan = np.isnan(want)
    return (np.array_equal(np.isnan(got), nan)
            and np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan]))


def _decode(qtype: str, raw: np.ndarray) -> np.ndarray:
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    out = np.empty(raw.size // ts * bs, np.float32)
    ggml_decode(qtype, raw.reshape(-1), out)
    return out


# ----------------------------------------------------------------------------- ggml_decode

@pytest.mark.parametrize("qtype", FAST_TYPES)
def test_ggml_decode_bit_exact(qtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((12, 1024)) * 0.02).astype(np.float32)
    x[0, :512] = 0.0                                   # all-zero blocks
    x[1] *= np.float32(1e-6)                           # scales in the fp16 subnormal range
    x[2] *= np.float32(3e4)                            # large magnitudes
    x[3, ::7] = 0.0
    raw = kernels.quantize(x, qtype)
    want = gguf.quants.dequantize(raw, GGMLQuantizationType[qtype]).reshape(-1)
    got = _decode(qtype, raw)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.abs(got - x.reshape(-1)).max() < np.abs(x).max()  # and it is a decode of x


@pytest.mark.parametrize("qtype", FAST_TYPES)
def test_ggml_decode_arbitrary_bytes(qtype):
    """Every bit pattern (NaN/Inf/subnormal fp16 scales, every code) decodes like gguf-py."""
    ts = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    raw = np.random.default_rng(3).integers(0, 256, ts * 3000, dtype=np.uint8)
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(raw, GGMLQuantizationType[qtype])
    assert _bits_equal(_decode(qtype, raw), want)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "IQ4_NL", "IQ4_XS", "TQ2_0"])
def test_ggml_decode_other_types_equal_gguf_py(qtype):
    ts = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    raw = np.random.default_rng(5).integers(0, 256, ts * 512, dtype=np.uint8)
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(raw, GGMLQuantizationType[qtype])
    assert _bits_equal(_decode(qtype, raw), want)


def test_ggml_decodable_and_refusals():
    assert all(ggml_decodable(q) for q in FAST_TYPES + ("F32", "F16", "BF16", "IQ2_XXS", "TQ1_0"))
    assert not any(ggml_decodable(q) for q in ("Q8_1", "Q8_K", "Q4_X", "I32"))
    with pytest.raises(ValueError, match="Q8_1"):
        ggml_decode("Q8_1", np.zeros(40, np.uint8), np.zeros(32, np.float32))
    with pytest.raises(ValueError, match="bytes"):
        ggml_decode("Q8_0", np.zeros(35, np.uint8), np.zeros(32, np.float32))


# ----------------------------------------------------------------------------- bnb4_decode

def _bnb_parts(w: torch.Tensor, quant_type: str, double: bool):
    """(stored tensors, packed uint8, code, float32 absmax (double quant decoded), reference)."""
    out, ref = nf4.quantize("w", w, quant_type, double)
    absmax = out["w.absmax"]
    if double:
        state = json.loads(bytes(out[f"w.quant_state.bitsandbytes__{quant_type}"].tolist()))
        idx = absmax.long()
        absmax = (out["w.nested_quant_map"][idx]
                  * out["w.nested_absmax"][torch.arange(idx.numel()) // nf4.NESTED_BLOCKSIZE]
                  + state["nested_offset"])
    return (out["w"].reshape(-1).numpy(), out["w.quant_map"].numpy(),
            absmax.float().contiguous().numpy(), ref)


def _bnb_decode(packed, start, count, code, absmax):
    out = np.empty(count, np.float32)
    bnb4_decode(packed[start // 2:(start + count + 1) // 2], start, count, code, absmax,
                nf4.BLOCKSIZE, out)
    return out


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("n", [4096, 1000, 777, 64 * 9 + 2])   # 777: odd, not a multiple of 64
@pytest.mark.parametrize("double", [False, True])
def test_bnb4_decode_equals_bitsandbytes(quant_type, n, double):
    w = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.05
    w[:64] = 0.0
    w[64:128] *= 1e-6
    packed, code, absmax, ref = _bnb_parts(w, quant_type, double)
    got = _bnb_decode(packed, 0, n, code, absmax)
    want = ref.numpy()
    # FP4 code 8 is +0.0 in the quant_map bitsandbytes stores but -0.0 in its CPU kernel's own
    # table (used for even n): the same value, a different sign bit. Everything else: same bits.
    zero = (want == 0) & (quant_type == "fp4")
    assert np.array_equal(got.view(np.uint32)[~zero], want.view(np.uint32)[~zero])
    assert np.array_equal(got[zero], want[zero])
    for start in (64, 128, n - n % 64 - 64):                   # ranges starting mid-tensor
        for count in {n - start, 64, min(65, n - start), 1}:
            part = _bnb_decode(packed, start, count, code, absmax)
            assert np.array_equal(part, got[start:start + count]), (start, count)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bnb4_decode_half_states(dtype):
    """bitsandbytes rounds code*absmax to the state's dtype; ours is that float32 product,
    which rounds to exactly bitsandbytes' values."""
    n = 64 * 20 + 33
    w = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    packed, code, absmax, ref = _bnb_parts(w, "nf4", False)
    got = torch.from_numpy(_bnb_decode(packed, 0, n, code, absmax))
    assert torch.equal(got.to(dtype), ref.to(dtype))


@pytest.mark.parametrize("bs", [7, 64])
def test_bnb4_decode_any_range(bs):
    """Ranges starting anywhere (an odd blocksize puts block starts on low nibbles), into
    unaligned outputs: every path (whole-block fast path, element-wise) gives the same values."""
    rng = np.random.default_rng(2)
    n = 1001
    packed = rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8)
    code = rng.standard_normal(16).astype(np.float32)
    absmax = rng.random(-(-n // bs)).astype(np.float32)
    full = np.empty(n, np.float32)
    bnb4_decode(packed, 0, n, code, absmax, bs, full)
    nib = np.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]
    assert np.array_equal(full, code[nib] * absmax[np.arange(n) // bs])
    for start in (1, 10, bs, 2 * bs + 2, 333, n - 1):
        for count in {n - start, min(n - start, 3 * bs + 1)}:
            for shift in (0, 1):                        # out 8-byte aligned or not
                buf = np.empty(count + 1, np.float32)
                out = buf[shift:shift + count]
                bnb4_decode(packed[start // 2:], start, count, code, absmax, bs, out)
                assert np.array_equal(out, full[start:start + count]), (start, count, shift)


# ----------------------------------------------------------------------------- reader vs gguf-py

def _check_against_gguf_py(path, expect_orig: bool | None = None) -> GGUFFile:
    r = gguf.GGUFReader(path)
    g = GGUFFile(path)
    assert g.keys() == [t.name for t in r.tensors]
    origs = 0
    for t in r.tensors:
        info = g.info(t.name)
        stored = tuple(int(d) for d in reversed(t.shape.tolist()))
        assert info.storage == t.tensor_type.name
        assert g.stored_shape(t.name) == stored
        orig = g.fields.get("comfy.gguf.orig_shape." + t.name)
        origs += orig is not None
        assert info.shape == (tuple(orig) if orig is not None else stored), t.name
        assert info.dtype == (info.storage if info.storage in ("F32", "F16", "BF16", "F64", "I8",
                                                               "I16", "I32", "I64") else "F32")
        want_bytes = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert info.nbytes == want_bytes.size == t.n_bytes
        got = torch.empty(info.nbytes, dtype=torch.uint8)
        g.read_range(t.name, 0, got)
        assert np.array_equal(got.numpy(), want_bytes), t.name
        if info.nbytes > 40:                           # a range in the middle, numpy buffer
            part = np.empty(info.nbytes - 37, np.uint8)
            g.read_range(t.name, 17, part)
            assert np.array_equal(part, want_bytes[17:-20])
        value = g.load(t.name)
        assert tuple(value.shape) == info.shape
        if info.storage in ("F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64"):
            assert value.reshape(-1).view(torch.uint8).numpy().tobytes() == want_bytes.tobytes()
        else:
            with np.errstate(all="ignore"):
                want = gguf.quants.dequantize(t.data, t.tensor_type)
            assert value.dtype == torch.float32 and _bits_equal(value.numpy(), want), t.name
    if expect_orig is not None:
        assert (origs > 0) == expect_orig
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        assert name in g.fields and name in g.metadata
        if field.types[0] == gguf.GGUFValueType.STRING:
            assert g.fields[name] == bytes(field.parts[field.data[0]]).decode()
    return g


@pytest.mark.parametrize("target,layout", [("Q8_0", "comfy"), ("Q4_K_S", "comfy"),
                                           ("Q8_0", "sdcpp"), ("Q4_K_S", "sdcpp")])
def test_reader_on_convkit_files(sdxl, tmp_path, target, layout):
    _, single, _, _ = sdxl
    out = tmp_path / "m.gguf"
    quantize(single, out, f"gguf:{target}", layout=layout)
    # sd.cpp never rearranges; comfy puts the 320-wide rows into rows of 256 for the K-quants
    g = _check_against_gguf_py(out, expect_orig={"sdcpp": False}.get(layout, target == "Q4_K_S"
                                                                      or None))
    with g:
        kinds = {i.storage for i in g.infos()}
        assert kinds - {"F32", "F16", "BF16"}, kinds
        assert json.loads(g.fields["convkit.quant_report"].strip())
        assert isinstance(g.fields["general.file_type"], int)
        assert g.architecture == (None if layout == "sdcpp" else "sdxl")
    assert g._fd is None
    src = open_file(out)                               # found by its magic
    assert isinstance(src, GGUFFile) and src.format == "gguf"
    src.close()


def test_reader_on_gguf_py_writer_file(tmp_path):
    rng = np.random.default_rng(11)
    p = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(str(p), "flux")
    w.add_custom_alignment(64)
    w.add_string("s", "h\u00e9llo")
    w.add_bool("flag", True)
    w.add_float32("f", 0.25)
    w.add_int64("neg", -5)
    w.add_array("strings", ["a", "bc"])
    w.add_array("nested", [[1, 2], [3]])
    x = (rng.standard_normal((6, 512)) * 0.1).astype(np.float32)
    for q in FAST_TYPES:
        w.add_tensor(f"{q}.weight", kernels.quantize(x, q),
                     raw_dtype=GGMLQuantizationType[q])
    conv = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w.add_tensor("conv.weight", kernels.quantize(conv.reshape(-1, 32), "Q8_0"),
                 raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_array("comfy.gguf.orig_shape.conv.weight", [8, 4, 3, 3])
    w.add_tensor("iq.weight", rng.integers(0, 256, (4, 18 * 8), dtype=np.uint8),
                 raw_dtype=GGMLQuantizationType.IQ4_NL)
    w.add_tensor("bf.weight", rng.integers(0, 1 << 15, (3, 5), dtype=np.uint16).view(np.uint8),
                 raw_dtype=GGMLQuantizationType.BF16)
    w.add_tensor("h.bias", x[0].astype(np.float16))
    w.add_tensor("f.bias", x[1, :7])
    w.add_tensor("idx", np.arange(10, dtype=np.int64))
    w.add_tensor("i8", np.arange(-3, 3, dtype=np.int8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with _check_against_gguf_py(p, expect_orig=True) as g:
        assert g.info("conv.weight").shape == (8, 4, 3, 3)
        assert g.stored_shape("conv.weight") == (9, 32)
        assert g.fields["s"] == "h\u00e9llo" and g.metadata["s"] == "h\u00e9llo"
        assert g.fields["flag"] is True and g.fields["f"] == 0.25 and g.fields["neg"] == -5
        assert g.fields["strings"] == ["a", "bc"] and g.fields["nested"] == [[1, 2], [3]]
        assert g.fields["general.alignment"] == 64 and g.metadata["nested"] == "[[1, 2], [3]]"
        assert g.architecture == "flux"
        assert torch.equal(g.load("idx"), torch.arange(10))
        assert torch.allclose(g.load("conv.weight"), torch.from_numpy(conv), atol=0.02)


def test_undecodable_type_is_refused_on_load(tmp_path):
    """Q8_1 (no dequantizer anywhere): parsed and readable raw, a clear error on load."""
    p = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(p), "flux")
    raw = np.random.default_rng(0).integers(0, 256, (2, 40), dtype=np.uint8)
    w.add_tensor("q81", raw, raw_dtype=GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(p) as g:
        assert g.info("q81").storage == "Q8_1" and g.info("q81").shape == (2, 32)
        got = np.empty(80, np.uint8)
        g.read_range("q81", 0, got)
        assert np.array_equal(got, raw.reshape(-1))
        with pytest.raises(InputFormatError, match="Q8_1") as e:
            g.load("q81")
    assert str(p) in str(e.value) and "'q81'" in str(e.value) and "Q8_0/F16" in str(e.value)


# ----------------------------------------------------------------------------- malformed files

def _s(text) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _i32_array(values) -> bytes:
    return struct.pack("<IQ", 5, len(values)) + b"".join(struct.pack("<i", v) for v in values)


def _ti(name, dims, tid=0, offset=0) -> bytes:
    return (_s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", tid, offset))


def _file(kvs=(), infos=None, version=3, n_tensors=None, n_kv=None, data=bytes(96),
          magic=b"GGUF") -> bytes:
    """A GGUF: by default two F32 tensors 'a' (4 values at 0) and 'b' (8 values at 32)."""
    infos = [_ti("a", (4,)), _ti("b", (8,), offset=32)] if infos is None else infos
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % 32) + data


def _deep_array(levels: int) -> bytes:
    return struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * levels + struct.pack("<IQ", 0, 0)


_GOOD = _file([_kv("general.architecture", 8, _s("sdxl"))])

BAD = {
    "truncated header": (_GOOD[:60], "truncated"),
    "truncated tensor infos": (_GOOD[:130], "truncated: offset of tensor 'b'"),
    "bad magic": (_file(magic=b"GGUG"), "not a GGUF file"),
    "version 1": (_file(version=1), "version 1"),
    "big-endian": (_file(version=3 << 24), "big-endian"),
    "absurd tensor count": (_file(n_tensors=1 << 62), "tensors"),
    "absurd kv count": (_file(n_kv=(1 << 64) - 1), "key/values"),
    "absurd string length": (_file([struct.pack("<Q", 1 << 60) + b"k"]),
                             "claims 1152921504606846976 bytes"),
    "absurd array length": (_file([_kv("k", 9, struct.pack("<IQ", 8, 1 << 61))]),
                            "claims 2305843009213693952 elements"),
    "nested arrays 10^5 deep": (_file([_s("deep") + _deep_array(10 ** 5)]), "deeper"),
    "unknown value type": (_file([_kv("k", 42, b"\0" * 8)]), "unknown value type 42"),
    "unknown array type": (_file([_kv("k", 9, struct.pack("<IQ", 13, 1))]),
                           "unknown element type 13"),
    "unknown type id": (_file(infos=[_ti("a", (4,), tid=99)]), "unknown GGML type id 99"),
    "removed type id": (_file(infos=[_ti("a", (32,), tid=4)]), "unknown GGML type id 4"),
    "n_dims 5": (_file(infos=[_ti("a", (1, 1, 1, 1, 4))]), "5 dimensions"),
    "zero dim": (_file(infos=[_ti("a", (4, 0))]), "invalid dimensions"),
    "negative dim": (_file(infos=[_ti("a", (4, (1 << 64) - 2))]), "invalid dimensions"),
    "partial block": (_file(infos=[_ti("a", (40,), tid=8)]), "whole number of 32-value"),
    "duplicate tensor name": (_file(infos=[_ti("a", (4,)), _ti("a", (8,), offset=32)]),
                              "appears twice"),
    "control characters in a name": (_file(infos=[_ti("a\nb", (4,)), _ti("a\nb", (8,), 32)]),
                                     "tensor 'a\\nb'"),
    "duplicate key": (_file([_kv("k", 4, b"\1\0\0\0"), _kv("k", 4, b"\2\0\0\0")]),
                      "appears twice"),
    "offset past end": (_file(infos=[_ti("a", (4,), offset=4096)]), "past the"),
    "data past end": (_file(infos=[_ti("a", (1000,))]), "past the"),
    "unaligned offset": (_file(infos=[_ti("a", (4,), offset=8)]), "alignment 32"),
    "overlap": (_file(infos=[_ti("a", (16,)), _ti("b", (8,), offset=32)]), "overlaps 'a'"),
    "bad alignment": (_file([_kv("general.alignment", 4, struct.pack("<I", 24))]),
                      "power of two"),
    "orig_shape of the wrong size": (_file([_kv("comfy.gguf.orig_shape.a", 9, _i32_array([3, 2]))]),
                                     "orig_shape.a"),
    "orig_shape not ints": (_file([_kv("comfy.gguf.orig_shape.b", 8, _s("2x4"))]),
                            "orig_shape.b"),
}


def test_good_synthetic_file(tmp_path):
    p = tmp_path / "good.gguf"
    p.write_bytes(_file([_kv("comfy.gguf.orig_shape.b", 9, _i32_array([2, 4])),
                         _kv("general.architecture", 8, _s("sdxl"))],
                        infos=[_ti("a", (4,)), _ti("b", (8,), offset=32), _ti("s", (), offset=64)]))
    with GGUFFile(p) as g:
        assert [g.info(k).shape for k in g.keys()] == [(4,), (2, 4), ()]   # s: a 0-d scalar
        assert g.load("s").shape == ()
        assert g.stored_shape("b") == (8,) and g.architecture == "sdxl"
        assert g.fields["comfy.gguf.orig_shape.b"] == [2, 4]
        assert torch.equal(g.load("b"), torch.zeros(2, 4))


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_file_is_one_clear_error(tmp_path, case):
    data, words = BAD[case]
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(InputFormatError) as e:
        GGUFFile(p)
    assert not isinstance(e.value, ErrorGroup), str(e.value)
    msg = str(e.value)
    assert str(p) in msg and words in msg and "\n" not in msg, msg


@pytest.mark.parametrize("case", ["truncated header", "nested arrays 10^5 deep", "overlap",
                                  "orig_shape of the wrong size"])
def test_malformed_file_cli(tmp_path, case):
    """What a user sees: one error line naming the file, exit code 3."""
    from click.testing import CliRunner

    from convkit.cli import main

    data, words = BAD[case]
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    r = CliRunner().invoke(main, ["inspect", str(p)])
    lines = [l for l in r.output.splitlines() if l.startswith("convkit: error:")]
    assert r.exit_code == InputFormatError.exit_code and len(lines) == 1, r.output
    assert words in lines[0] and str(p) in lines[0]


def test_several_problems_reported_together(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(_file(infos=[_ti("a", (4,), tid=99), _ti("b", (8,), offset=8)]))
    with pytest.raises(ErrorGroup) as e:
        GGUFFile(p)
    assert [x.key for x in e.value.errors] == ["a", "b"]
