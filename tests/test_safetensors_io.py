"""The safetensors reader and the streaming writer: round trips, golden header, bad input."""
import json
import struct

import pytest
import safetensors.torch as st
import torch

from convkit import errors
from convkit.sources import open_source
from convkit.sources.safetensors_file import SafetensorsFile
from convkit.writer import OutSpec, SafetensorsWriter, build_header


def test_reader_matches_safetensors_library(sdxl_like):
    path, sd = sdxl_like
    with open_source(path) as src:
        assert src.format == "safetensors"
        assert set(src.keys()) == set(sd)
        assert src.metadata == {"modelspec.title": "synthetic"}
        for k, t in sd.items():
            info = src.info(k)
            assert info.shape == tuple(t.shape)
            assert info.nbytes == t.numel() * t.element_size()
            assert torch.equal(src.load(k), t)


def test_header_golden_bytes():
    specs = [OutSpec("a", "F16", (2, 3)), OutSpec("b.w", "BF16", (4,))]
    h = build_header(specs, {"k": "v"})
    body = (b'{"__metadata__":{"k":"v"},"a":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},'
            b'"b.w":{"dtype":"BF16","shape":[4],"data_offsets":[12,20]}}')
    pad = b" " * (-(len(body) + 8) % 8)
    assert h == struct.pack("<Q", len(body) + len(pad)) + body + pad
    assert len(h) % 8 == 0


def test_writer_output_loads_in_safetensors(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"x": torch.randn(3, 5, generator=g), "y": torch.randn(7, generator=g).half(),
               "z": torch.randn(2, 2, generator=g).bfloat16(), "i": torch.arange(4),
               "empty": torch.zeros(0, 3)}
    specs = [OutSpec(k, {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                         torch.int64: "I64"}[t.dtype], tuple(t.shape)) for k, t in tensors.items()]
    out = tmp_path / "o.safetensors"
    with SafetensorsWriter(out, specs, {"m": "1"}) as w:
        for k, t in tensors.items():
            w.write(k, t)
    back = st.load_file(out)
    assert set(back) == set(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    assert list(tmp_path.iterdir()) == [out]


def test_writer_rejects_wrong_order_and_shape(tmp_path):
    specs = [OutSpec("a", "F32", (2,)), OutSpec("b", "F32", (2,))]
    with pytest.raises(errors.UsageError, match="out of order"):
        with SafetensorsWriter(tmp_path / "o.safetensors", specs) as w:
            w.write("b", torch.zeros(2))
    with pytest.raises(errors.UsageError, match="planned"):
        with SafetensorsWriter(tmp_path / "o.safetensors", specs) as w:
            w.write("a", torch.zeros(3))
    with pytest.raises(errors.UsageError, match="only 1 of 2"):
        with SafetensorsWriter(tmp_path / "o.safetensors", specs) as w:
            w.write("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_writer_interrupt_leaves_nothing(tmp_path):
    specs = [OutSpec(f"t{i}", "F32", (1000,)) for i in range(5)]
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(tmp_path / "o.safetensors", specs) as w:
            w.write("t0", torch.zeros(1000))
            w.write("t1", torch.zeros(1000))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# ---- damaged inputs: one precise error each, naming the file -------------------------------

def _write_raw(path, header: dict | bytes, data: bytes = b"", declared_len=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def test_truncated_file(sdxl_like, tmp_path):
    path, _ = sdxl_like
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(errors.InputFormatError, match="truncated") as e:
        open_source(cut)
    assert str(cut) in str(e.value) and "download or export it again" in str(e.value)


def test_tiny_file(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(b"abc")
    with pytest.raises(errors.InputFormatError, match="too short"):
        open_source(p)


def test_oversized_header(tmp_path):
    p = _write_raw(tmp_path / "h.safetensors", b"{}", declared_len=2**40)
    with pytest.raises(errors.InputFormatError, match="exceeds"):
        open_source(p)


def test_header_longer_than_file(tmp_path):
    p = _write_raw(tmp_path / "h.safetensors", b"{}", declared_len=5000)
    with pytest.raises(errors.InputFormatError, match="truncated: header"):
        open_source(p)


def test_corrupt_header_json(tmp_path):
    p = _write_raw(tmp_path / "h.safetensors", b'{"a": {"dtype": "F32", ')
    with pytest.raises(errors.InputFormatError, match="corrupt header"):
        open_source(p)


def test_overlapping_offsets(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    p = _write_raw(tmp_path / "o.safetensors", h, b"\0" * 24)
    with pytest.raises(errors.InputFormatError, match="overlap") as e:
        open_source(p)
    assert "'b'" in str(e.value)


def test_offsets_past_end(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [100], "data_offsets": [16, 416]}}
    p = _write_raw(tmp_path / "o.safetensors", h, b"\0" * 64)
    with pytest.raises(errors.InputFormatError, match="truncated") as e:
        open_source(p)
    assert "'b'" in str(e.value)


def test_size_mismatch_and_unknown_dtype_reported_together(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]},
         "b": {"dtype": "Q9", "shape": [1], "data_offsets": [12, 13]}}
    p = _write_raw(tmp_path / "o.safetensors", h, b"\0" * 16)
    with pytest.raises(errors.ErrorGroup) as e:
        SafetensorsFile(p)
    msg = str(e.value)
    assert "2 problems" in msg and "needs 16" in msg and "Q9" in msg
    assert isinstance(e.value, ValueError)


def test_unsafe_pickle_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.ckpt"
    with open(p, "wb") as f:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "evil": Evil()}, f)
    with pytest.raises(errors.UnsafeFileError, match="weights_only") as e:
        open_source(p)
    assert isinstance(e.value, PermissionError)


def test_torch_file_weights_only(tmp_path):
    p = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"a.weight": torch.ones(2, 3), "b": torch.arange(3)},
                "global_step": 5}, p)
    with open_source(p) as src:
        assert src.format == "torch"
        assert sorted(src.keys()) == ["a.weight", "b"]
        assert torch.equal(src.load("a.weight"), torch.ones(2, 3))
