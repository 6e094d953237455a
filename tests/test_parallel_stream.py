"""The parallel chunk engine (merge-lora's): same bytes as the sequential one, and a failure in
any worker, a full disk or Ctrl-C leaves nothing behind."""
from __future__ import annotations

import _thread
import errno
import os

import pytest
import safetensors.torch as st
import torch

import convkit.chunked
import convkit.plan
from convkit import errors
from convkit.convert import convert
from convkit.lora import merge_lora
from convkit.writer import OutSpec, SafetensorsWriter

from tests.lora_helpers import kohya_diffusers_paths, random_factors


@pytest.fixture(scope="module")
def lora(sdxl, tmp_path_factory):
    m = sdxl[0]
    p = tmp_path_factory.mktemp("par") / "k.safetensors"
    st.save_file(kohya_diffusers_paths(random_factors(m, seed=5, rank=3)), p)
    return p


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_parallel_engine_writes_the_sequential_bytes(sdxl, tmp_path, monkeypatch, dtype):
    single = sdxl[1]
    monkeypatch.setattr(convkit.chunked, "CHUNK_BYTES", 4096)   # ~100s of chunks per worker
    convert(single, tmp_path / "seq.safetensors", dtype)
    monkeypatch.setattr(convkit.plan, "stream_items", convkit.chunked.stream_items_parallel)
    convert(single, tmp_path / "par.safetensors", dtype)
    assert (tmp_path / "seq.safetensors").read_bytes() == (tmp_path / "par.safetensors").read_bytes()


def test_merge_runs_on_several_workers(sdxl, lora, tmp_path, monkeypatch):
    import threading

    seen = set()
    real = convkit.chunked.stream_items_parallel

    def spy(*a, **kw):
        prog = kw.get("on_progress")

        def on_progress(n):
            seen.add(threading.current_thread().name)
            if prog:
                prog(n)
        kw["on_progress"] = on_progress
        return real(*a, workers=2, **{k: v for k, v in kw.items() if k != "workers"})

    monkeypatch.setattr(convkit.plan, "stream_items_parallel", spy)
    monkeypatch.setattr(convkit.chunked, "CHUNK_BYTES", 4096)
    merge_lora(sdxl[1], [lora], tmp_path / "o.safetensors", dtype="fp16")
    assert seen == {"convkit-chunk-0", "convkit-chunk-1"}


def test_disk_full_in_a_worker(sdxl, lora, tmp_path, monkeypatch):
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(convkit.chunked, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(os, "pwrite", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.DiskSpaceError, match="disk full"):
        merge_lora(sdxl[1], [lora], out / "o.safetensors", dtype="fp16")
    assert calls["n"] >= 40 and _files(out) == []


def test_ctrl_c_while_workers_run(sdxl, lora, tmp_path, monkeypatch):
    """KeyboardInterrupt lands in the main thread (as a real Ctrl-C does) mid-stream."""
    real = convkit.chunked.stream_items_parallel
    count = {"n": 0}

    def interrupting(*a, **kw):
        def on_progress(n):
            count["n"] += 1
            if count["n"] == 30:
                _thread.interrupt_main()
        kw["on_progress"] = on_progress
        return real(*a, **kw)

    monkeypatch.setattr(convkit.plan, "stream_items_parallel", interrupting)
    monkeypatch.setattr(convkit.chunked, "CHUNK_BYTES", 4096)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.Interrupted):
        merge_lora(sdxl[1], [lora], out / "o.safetensors", dtype="fp16")
    assert count["n"] >= 30 and _files(out) == []
    assert torch.get_num_threads() >= 1


def test_worker_error_is_raised_once_and_nothing_is_left(sdxl, lora, tmp_path):
    """A value error in one worker (fp16 overflow, --on-overflow error) stops all of them."""
    single = sdxl[1]
    sd = st.load_file(single)
    key = next(k for k in sd if k.endswith("attn1.to_q.weight"))
    sd[key] = sd[key] * 1e6
    base = tmp_path / "loud.safetensors"
    st.save_file(sd, base)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.TensorValueError) as e:
        merge_lora(base, [lora], out / "o.safetensors", dtype="fp16", on_overflow="error")
    assert e.value.key == key
    assert _files(out) == []


def test_positional_writer_refuses_incomplete_and_stray_writes(tmp_path):
    specs = [OutSpec("a", "F32", (4,)), OutSpec("b", "F16", (3,))]
    w = SafetensorsWriter(tmp_path / "x.safetensors", specs).open()
    w.begin_positional()
    with pytest.raises(errors.UsageError, match="outside"):
        w.write_at("b", 4, torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(errors.UsageError, match="sequential write"):
        w.write("a", torch.zeros(4))
    w.write_at("b", 0, torch.zeros(3, dtype=torch.float16).view(torch.uint8))
    w.write_at("a", 8, torch.ones(2).view(torch.uint8))
    with pytest.raises(errors.UsageError, match="tensor 'a': 8 of 16 bytes"):
        w.commit()
    assert list(tmp_path.iterdir()) == []
    # complete, written out of order: a valid file
    w = SafetensorsWriter(tmp_path / "x.safetensors", specs).open()
    w.begin_positional()
    w.write_at("a", 8, torch.tensor([3.0, 4.0]).view(torch.uint8))
    w.write_at("b", 0, torch.tensor([5.0, 6.0, 7.0], dtype=torch.float16).view(torch.uint8))
    w.write_at("a", 0, torch.tensor([1.0, 2.0]).view(torch.uint8))
    w.commit()
    got = st.load_file(tmp_path / "x.safetensors")
    assert got["a"].tolist() == [1, 2, 3, 4] and got["b"].tolist() == [5, 6, 7]
