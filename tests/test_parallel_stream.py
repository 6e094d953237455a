"""The engine (``convkit.engine.executor``) runs every command on N workers: the bytes do not
depend on the chunking or the worker count, and a failure in any worker, a full disk or Ctrl-C
leaves nothing behind (no temp file, no output)."""
from __future__ import annotations

import _thread
import errno
import os
import threading

import pytest
import safetensors.torch as st
import torch

import convkit.engine.executor as X
from convkit import errors
from convkit.convert import convert
from convkit.engine.plan import Out, OutFile
from convkit.engine.sinks import SafetensorsSink
from convkit.lora import convert_lora, extract_lora, merge_lora
from convkit.lora.extract import SvdOp
from convkit.lora.rows import MergeOp
from convkit.lora.write import LoraOut

from tests.lora_helpers import kohya_diffusers_paths, random_factors


@pytest.fixture(scope="module")
def lora(sdxl, tmp_path_factory):
    m = sdxl[0]
    p = tmp_path_factory.mktemp("par") / "k.safetensors"
    st.save_file(kohya_diffusers_paths(random_factors(m, seed=5, rank=3)), p)
    return p


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _runs(monkeypatch, settings, fn):
    """Run ``fn(tag)`` under each (chunk bytes, workers) setting; return the output bytes."""
    got = []
    for chunk, workers in settings:
        with monkeypatch.context() as mp:
            mp.setattr(X, "CHUNK_BYTES", chunk)
            mp.setenv("CONVKIT_THREADS", str(workers))
            got.append(fn(f"{chunk}-{workers}").read_bytes())
    return got


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_same_bytes_whatever_the_chunking_and_workers(sdxl, tmp_path, monkeypatch, dtype):
    single = sdxl[1]
    settings = [(8 << 20, 1), (4096, 1), (4096, 3), (1 << 16, 2)]     # 4096: ~100s of chunks

    def run(tag):
        out = tmp_path / f"{tag}.safetensors"
        convert(single, out, dtype)
        return out
    first, *rest = _runs(monkeypatch, settings, run)
    assert all(b == first for b in rest)


def test_merge_same_bytes_with_one_or_several_workers(sdxl, lora, tmp_path, monkeypatch):
    """Per chunking the merge is bit-identical whatever the worker count (the chunking itself
    may change the last bit where BLAS picks another kernel: test_lora_stream)."""
    single = sdxl[1]
    for chunk in (4096, 8 << 20):
        def run(tag):
            out = tmp_path / f"m{tag}.safetensors"
            merge_lora(single, [lora], out, dtype="fp16")
            return out
        first, *rest = _runs(monkeypatch, [(chunk, 1), (chunk, 2), (chunk, 3)], run)
        assert all(b == first for b in rest), chunk


def test_extract_and_convert_same_bytes_with_one_or_several_workers(sdxl, lora, tmp_path,
                                                                    monkeypatch):
    """convert-lora: the same bytes for any chunking and worker count. extract-lora: the same
    for any chunking and any worker count with single-threaded kernels (2+ workers here); one
    worker runs LAPACK on 2 threads, whose SVD rounds differently: same products up·down."""
    _, single, _, _ = sdxl
    merged = tmp_path / "tuned.safetensors"
    merge_lora(single, [lora], merged)

    def extract(tag):
        out = tmp_path / f"e{tag}.safetensors"
        extract_lora(merged, single, out, rank=4, dtype="fp32")
        return out

    def conv(tag):
        out = tmp_path / f"c{tag}.safetensors"
        convert_lora(lora, out, "peft", base=single, dtype="bf16")
        return out
    first, *rest = _runs(monkeypatch, [(8 << 20, 1), (4096, 2), (4096, 3)], conv)
    assert all(b == first for b in rest)
    first, *rest = _runs(monkeypatch, [(8 << 20, 2), (4096, 2), (4096, 3), (1 << 16, 3)], extract)
    assert all(b == first for b in rest)
    _runs(monkeypatch, [(4096, 1)], extract)
    one, two = (st.load_file(tmp_path / f"e{t}.safetensors") for t in ("4096-1", "4096-2"))
    assert one.keys() == two.keys()
    for k in one:
        if k.endswith(".lora_down.weight"):
            m = k[: -len(".lora_down.weight")]
            p1, p2 = (x[m + ".lora_up.weight"].flatten(1) @ x[k].flatten(1) for x in (one, two))
            assert (p1 - p2).norm() <= 1e-5 * p2.norm(), m


def test_merge_runs_on_several_workers(sdxl, lora, tmp_path, monkeypatch):
    seen = set()
    real = MergeOp.run

    def spy(self, *a):
        seen.add(threading.current_thread().name)
        return real(self, *a)

    monkeypatch.setattr(MergeOp, "run", spy)
    monkeypatch.setattr(X, "CHUNK_BYTES", 4096)
    monkeypatch.setenv("CONVKIT_THREADS", "2")
    merge_lora(sdxl[1], [lora], tmp_path / "o.safetensors", dtype="fp16")
    assert seen == {"convkit-worker-0", "convkit-worker-1"}


def test_disk_full_in_a_worker(sdxl, lora, tmp_path, monkeypatch):
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(X, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(os, "pwrite", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.DiskSpaceError, match="disk full"):
        merge_lora(sdxl[1], [lora], out / "o.safetensors", dtype="fp16")
    assert calls["n"] >= 40 and _files(out) == []


def test_sink_maps_enospc_and_refuses_incomplete_and_stray_writes(tmp_path, monkeypatch):
    outs = [Out("a", "F32", (4,)), Out("b", "F16", (3,))]
    spec = OutFile("", tmp_path / "x.safetensors")
    w = SafetensorsSink(spec.path, outs, spec).open()
    with pytest.raises(errors.UsageError, match="outside"):
        w.write_at("b", 4, torch.zeros(4, dtype=torch.uint8))
    w.write_at("b", 0, torch.zeros(3, dtype=torch.float16).view(torch.uint8))
    w.write_at("a", 8, torch.ones(2).view(torch.uint8))
    with pytest.raises(errors.OutputError, match="'a' got 8 of 16 bytes"):
        w.commit()
    assert list(tmp_path.iterdir()) == []
    # a full disk: the sink's error says so, and abort leaves nothing
    w = SafetensorsSink(spec.path, outs, spec).open()
    with monkeypatch.context() as mp:
        mp.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        with pytest.raises(errors.DiskSpaceError, match="disk full"):
            w.write_at("a", 0, torch.ones(4).view(torch.uint8))
    w.abort()
    assert list(tmp_path.iterdir()) == []
    # complete, written out of order: a valid file
    w = SafetensorsSink(spec.path, outs, spec).open()
    w.write_at("a", 8, torch.tensor([3.0, 4.0]).view(torch.uint8))
    w.write_at("b", 0, torch.tensor([5.0, 6.0, 7.0], dtype=torch.float16).view(torch.uint8))
    w.write_at("a", 0, torch.tensor([1.0, 2.0]).view(torch.uint8))
    w.commit()
    got = st.load_file(tmp_path / "x.safetensors")
    assert got["a"].tolist() == [1, 2, 3, 4] and got["b"].tolist() == [5, 6, 7]


def _interrupt_on(monkeypatch, cls, n, how):
    """Ctrl-C on the ``n``-th call of ``cls.run``: a KeyboardInterrupt raised inside the op
    (``raise``) or delivered to the main thread while the workers run (``main``)."""
    real = cls.run
    count = {"n": 0}
    lock = threading.Lock()

    def run(self, *a):
        with lock:
            count["n"] += 1
            hit = count["n"] == n
        if hit:
            if how == "raise":
                raise KeyboardInterrupt
            _thread.interrupt_main()
        return real(self, *a)

    monkeypatch.setattr(cls, "run", run)
    return count


@pytest.mark.parametrize("how", ["raise", "main"])
def test_ctrl_c_while_workers_run(sdxl, lora, tmp_path, monkeypatch, how):
    monkeypatch.setattr(X, "CHUNK_BYTES", 4096)
    threads = torch.get_num_threads()
    count = _interrupt_on(monkeypatch, MergeOp, 30, how)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.Interrupted):
        merge_lora(sdxl[1], [lora], out / "o.safetensors", dtype="fp16")
    assert count["n"] >= 30 and _files(out) == []
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("op, n", [(SvdOp, 20), (LoraOut, 20)])
def test_ctrl_c_in_extract_lora_leaves_nothing(sdxl, lora, tmp_path, monkeypatch, op, n):
    """In phase 1 (reading and factoring) or phase 2 (writing the LoRA)."""
    _, single, _, _ = sdxl
    merged = tmp_path / "tuned.safetensors"
    merge_lora(single, [lora], merged)
    _interrupt_on(monkeypatch, op, n, "raise")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.Interrupted):
        extract_lora(merged, single, out / "l.safetensors", rank=2)
    assert _files(out) == []


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
