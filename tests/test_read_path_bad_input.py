"""Malformed inputs enter through the read path: each gives one line naming file, tensor and fix,
a non-zero exit, nothing written, no traceback (issue 8, "Bad input")."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from click.testing import CliRunner

from convkit.cli import main
from convkit.quantize import quantize
from tests.conftest import SDXL_MARKERS


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def one_line(out: str) -> str:
    lines = [l for l in out.splitlines() if l.startswith("convkit: error:")]
    assert len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


def raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def listing(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


COMMANDS = [("inspect",), ("convert", "OUT.safetensors"), ("quantize", "OUT.gguf", "--to", "gguf:Q8_0")]


def _cmd(cmd, src: Path, d: Path):
    args = [cmd[0], src] + [d / a if a.startswith("OUT") else a for a in cmd[1:]]
    return args


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_deeply_nested_header(tmp_path, cmd):
    """Was: a RecursionError traceback from inspect, convert and quantize."""
    src = raw_safetensors(tmp_path / "nest.safetensors", b"[" * 200_000 + b"]" * 200_000)
    before = listing(tmp_path)
    code, out = run(*_cmd(cmd, src, tmp_path))
    assert code == 3 and "nest.safetensors" in one_line(out) and "nests too deeply" in out
    assert listing(tmp_path) == before


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_duplicate_tensor_name(tmp_path, cmd):
    """Was: accepted silently (the last entry wins) and converted."""
    entry = '{"dtype":"F32","shape":[2],"data_offsets":[%d,%d]}'
    header = ('{"a.weight":' + entry % (0, 8) + ',"a.weight":' + entry % (8, 16) + "}").encode()
    header += b" " * (-len(header) % 8)
    src = raw_safetensors(tmp_path / "dup.safetensors", header, bytes(16))
    before = listing(tmp_path)
    code, out = run(*_cmd(cmd, src, tmp_path))
    line = one_line(out)
    assert code == 3 and "dup.safetensors" in line and "'a.weight' appears twice" in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_fifo_input_does_not_hang(tmp_path, cmd):
    """Was: inspect, convert and quantize blocked forever reading a FIFO."""
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    args = [str(a) for a in _cmd(cmd, fifo, tmp_path)]
    try:
        p = subprocess.run([sys.executable, "-m", "convkit.cli", *args], capture_output=True,
                           text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("blocked on a FIFO")
    assert p.returncode == 3 and "FIFO" in one_line(p.stderr) and "pipe.safetensors" in p.stderr


def test_non_utf8_file_name_is_recorded_safely(tmp_path):
    """Was: UnicodeEncodeError while writing the provenance metadata (convert and quantize)."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in SDXL_MARKERS.items()}
    name = os.fsdecode(b"mod\xe9le.safetensors")         # latin-1 e-acute: not UTF-8
    src = tmp_path / name
    st.save_file(sd, src)
    out = tmp_path / "out.safetensors"
    code, text = run("convert", src, out, "--dtype", "fp16")
    assert code == 0, text
    from convkit.sources import open_raw

    with open_raw(out) as r:
        assert r.metadata["convkit.source"] == "mod\\xe9le.safetensors"
        assert json.loads(r.metadata["convkit.steps"])[-1]["op"] == "convert"


def test_stale_temp_files_of_killed_runs_are_removed(tmp_path, sdxl_like):
    """Was: a kill -9 during a write left .NAME.convkit-PID-....tmp beside the target forever."""
    src, _ = sdxl_like
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                   # a PID that no process has now
    stale = out_dir / f".o.safetensors.convkit-{dead.pid}-0123abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    stale_dir = out_dir / f".folder.convkit-{dead.pid}-4567cdef.tmp"
    stale_dir.mkdir()
    (stale_dir / "junk").write_bytes(b"y")
    alive = out_dir / f".other.convkit-{os.getppid()}-89abcdef.tmp"   # a live process's
    alive.write_bytes(b"z")
    unrelated = out_dir / ".notes.tmp"
    unrelated.write_bytes(b"keep")
    code, text = run("convert", src, out_dir / "o.safetensors")
    assert code == 0, text
    assert listing(out_dir) == {"o.safetensors", alive.name, unrelated.name}


# ----------------------------------------------------------------------------- the view's own


@pytest.fixture(scope="module")
def quantized(sdxl, tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    src = sdxl[1]
    out = {}
    for target, name in (("fp8-scaled", "s.safetensors"), ("nf4", "n.safetensors")):
        quantize(src, d / name, target)
        out[target] = d / name
    return out


def _rewrite(src: Path, dst: Path, edit) -> Path:
    sd = st.load_file(src)
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n)).get("__metadata__", {})
    edit(sd)
    st.save_file(sd, dst, metadata=meta)
    return dst


def _view_error(tmp_path, src: Path, *needles):
    for cmd in (("inspect",), ("convert", "OUT.safetensors", "--dtype", "fp16")):
        before = listing(tmp_path)
        code, out = run(*_cmd(cmd, src, tmp_path))
        line = one_line(out)
        assert code == 3, out
        for n in (src.name, *needles):
            assert n in line, (n, line)
        assert listing(tmp_path) == before


def _first(path: Path, suffix: str) -> str:
    from convkit.sources import open_raw

    with open_raw(path) as r:
        return next(k for k in r.keys() if k.endswith(suffix))


def test_scaled_fp8_scale_missing(quantized, tmp_path):
    k = _first(quantized["fp8-scaled"], ".scale_weight")
    bad = _rewrite(quantized["fp8-scaled"], tmp_path / "noscale.safetensors",
                   lambda sd: sd.pop(k))
    _view_error(tmp_path, bad, k[: -len("scale_weight")] + "weight", "without its scale")


def test_scaled_fp8_scale_of_the_wrong_shape(quantized, tmp_path):
    k = _first(quantized["fp8-scaled"], ".scale_weight")
    bad = _rewrite(quantized["fp8-scaled"], tmp_path / "shape.safetensors",
                   lambda sd: sd.__setitem__(k, torch.ones(3, 5)))
    _view_error(tmp_path, bad, k, "does not fit")


def test_nf4_weight_without_its_quant_state(quantized, tmp_path):
    w = _first(quantized["nf4"], ".quant_state.bitsandbytes__nf4").split(".quant_state")[0]
    bad = _rewrite(quantized["nf4"], tmp_path / "nostate.safetensors",
                   lambda sd: sd.pop(w + ".quant_state.bitsandbytes__nf4"))
    _view_error(tmp_path, bad, w, "without its quant state")


def test_gguf_type_the_view_cannot_decode(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(path), "sdxl")
    raw = np.zeros((4, 40), dtype=np.uint8)         # 4 rows of one Q8_1 block (32 values)
    w.add_tensor("input_blocks.0.0.weight", raw, raw_shape=(4, 40),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _view_error(tmp_path, path, "input_blocks.0.0.weight", "Q8_1")
