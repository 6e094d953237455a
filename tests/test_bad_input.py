"""Bad input and bad output locations: one clear line, non-zero exit, nothing left behind."""
import os
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from click.testing import CliRunner

from convkit import errors, writer
from convkit.cli import main
from convkit.convert import convert


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _one_error_line(out: str) -> str:
    lines = [l for l in out.splitlines() if l.startswith("convkit: error:")]
    assert len(lines) == 1, out
    return lines[0]


def _snapshot(folder: Path):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())


def test_unknown_architecture(tmp_path):
    p = tmp_path / "mystery.safetensors"
    st.save_file({"foo.bar.weight": torch.zeros(2, 2), "foo.baz.bias": torch.zeros(2)}, p)
    code, out = run("convert", p, tmp_path / "o.safetensors")
    line = _one_error_line(out)
    assert code == errors.UnknownArchitectureError.exit_code
    assert str(p) in line and "unknown architecture" in line and "foo.bar" in line
    assert "--no-detect" in line
    assert not (tmp_path / "o.safetensors").exists()
    # and the escape hatch works
    code, out = run("convert", p, tmp_path / "o.safetensors", "--no-detect", "-q")
    assert code == 0 and (tmp_path / "o.safetensors").exists()


def test_lora_is_named_as_such(tmp_path):
    p = tmp_path / "lora.safetensors"
    st.save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
                  torch.zeros(4, 8)}, p)
    code, out = run("inspect", p)
    # described as a LoRA (format, architecture, modules), not as an unknown checkpoint
    assert code == 0 and "LoRA:" in out and "kohya" in out and "not recognised" not in out


def test_truncated_input_cli(sdxl_like, tmp_path):
    path, _ = sdxl_like
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-64])
    before = _snapshot(tmp_path)
    code, out = run("convert", cut, tmp_path / "o.safetensors")
    assert code == errors.InputFormatError.exit_code
    assert "truncated" in _one_error_line(out) and str(cut) in out
    assert _snapshot(tmp_path) == before


def test_output_directory_missing(sdxl_like, tmp_path):
    path, _ = sdxl_like
    code, out = run("convert", path, tmp_path / "nope" / "o.safetensors")
    line = _one_error_line(out)
    assert code == errors.OutputError.exit_code
    assert "does not exist" in line and "nope" in line


def test_output_directory_read_only(sdxl_like, tmp_path):
    path, _ = sdxl_like
    if os.geteuid() == 0:
        ro = Path("/sys")  # root ignores chmod; sysfs refuses new files even to root
        if writer._writable(ro):
            pytest.skip("no read-only directory available")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    code, out = run("convert", path, ro / "o.safetensors")
    assert code == errors.OutputError.exit_code
    assert "not writable" in _one_error_line(out)


def test_not_enough_disk_space(sdxl_like, tmp_path, monkeypatch):
    path, _ = sdxl_like
    monkeypatch.setattr(writer, "disk_free", lambda p: 100)
    before = _snapshot(tmp_path)
    code, out = run("convert", path, tmp_path / "o.safetensors")
    assert code == errors.DiskSpaceError.exit_code
    assert "not enough disk space" in _one_error_line(out)
    assert _snapshot(tmp_path) == before


def test_disk_full_mid_write(sdxl_like, tmp_path, monkeypatch):
    """ENOSPC raised by the OS during a write: clean error, temp file removed."""
    import errno

    path, _ = sdxl_like
    from convkit.engine import sinks

    real = sinks.PositionalFile._pwrite
    calls = {"n": 0}

    def failing(self, mv, pos):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, mv, pos)

    monkeypatch.setattr(sinks.PositionalFile, "_pwrite", failing)
    before = _snapshot(tmp_path)
    with pytest.raises(errors.DiskSpaceError, match="disk full"):
        convert(path, tmp_path / "o.safetensors", "fp16")
    assert _snapshot(tmp_path) == before


def test_ctrl_c_mid_write(sdxl_like, tmp_path, monkeypatch):
    path, _ = sdxl_like
    from convkit.sources.safetensors_file import SafetensorsFile

    real_load, real_range = SafetensorsFile._load, SafetensorsFile.read_range
    seen = []

    def interrupting_load(self, name):
        seen.append(name)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real_load(self, name)

    def interrupting_range(self, name, start, out):
        seen.append(name)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real_range(self, name, start, out)

    # whole-tensor and chunked streaming both read through these
    monkeypatch.setattr(SafetensorsFile, "_load", interrupting_load)
    monkeypatch.setattr(SafetensorsFile, "read_range", interrupting_range)
    before = _snapshot(tmp_path)
    src_bytes = path.read_bytes()
    code, out = run("convert", path, tmp_path / "o.safetensors")
    assert code == 130 and "interrupted" in _one_error_line(out)
    assert _snapshot(tmp_path) == before
    assert path.read_bytes() == src_bytes


def test_output_exists_needs_overwrite(sdxl_like, tmp_path):
    path, _ = sdxl_like
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    code, text = run("convert", path, out)
    assert code == errors.OutputExistsError.exit_code and "--overwrite" in text
    assert out.read_bytes() == b"keep me"
    code, _ = run("convert", path, out, "--overwrite", "-q")
    assert code == 0 and out.read_bytes() != b"keep me"


def test_input_equals_output(sdxl_like):
    path, _ = sdxl_like
    data = path.read_bytes()
    for extra in ([], ["--overwrite"]):
        code, out = run("convert", path, path, *extra)
        assert code == errors.UsageError.exit_code and "overwrite an input" in out
        assert path.read_bytes() == data


def test_input_missing(tmp_path):
    code, out = run("inspect", tmp_path / "nothing.safetensors")
    assert code != 0 and "no such file" in _one_error_line(out)


def test_unknown_dtype_suggests(sdxl_like, tmp_path):
    path, _ = sdxl_like
    code, out = run("convert", path, tmp_path / "o.safetensors", "--dtype", "fp61")
    assert code == 2 and "did you mean 'fp16'" in _one_error_line(out)


def test_unknown_component_suggests(sdxl_like, tmp_path):
    path, _ = sdxl_like
    code, out = run("convert", path, tmp_path / "o.safetensors", "--components", "unte")
    assert code == 2 and "did you mean 'unet'" in _one_error_line(out)


def test_debug_shows_traceback(sdxl_like, tmp_path, monkeypatch):
    path, _ = sdxl_like
    monkeypatch.setenv("CONVKIT_DEBUG", "1")
    r = CliRunner().invoke(main, ["convert", str(path), str(tmp_path / "x" / "o.safetensors")])
    assert r.exit_code != 0 and isinstance(r.exception, errors.OutputError)


def test_errors_are_builtin_subclasses():
    assert issubclass(errors.InputFormatError, ValueError)
    assert issubclass(errors.OutputExistsError, FileExistsError)
    assert issubclass(errors.DiskSpaceError, OSError)
    assert issubclass(errors.UnknownNameError, KeyError)
    assert issubclass(errors.UnknownArchitectureError, LookupError)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_real_signal_mid_write_leaves_nothing(tmp_path, sig):
    """A real Ctrl-C (or kill) delivered to the CLI process while it writes."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import SDXL_MARKERS

    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in SDXL_MARKERS.items()}
    for i in range(48):  # ~200 MB of fp32 so the write takes a while
        sd[f"model.diffusion_model.output_blocks.{i}.0.in_layers.2.weight"] = \
            torch.randn(1024, 1024, generator=g)
    src = tmp_path / "big.safetensors"
    st.save_file(sd, src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "convkit.cli", "convert", str(src),
                             str(out_dir / "o.safetensors"), "--dtype", "bf16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and \
            not any(p.name.endswith(".tmp") for p in out_dir.iterdir()):
        time.sleep(0.002)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and err.count("convkit: error:") == 1
    assert list(out_dir.iterdir()) == []


def test_missing_shard_named(tmp_path, sdxl_like):
    import json as _json

    path, sd = sdxl_like
    folder = tmp_path / "m"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(_json.dumps({"unet": ["diffusers",
                                                                   "UNet2DConditionModel"]}))
    st.save_file({"a": torch.zeros(2)}, folder / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(_json.dumps(
        {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                        "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    code, out = run("inspect", folder)
    line = _one_error_line(out)
    assert code == errors.InputFormatError.exit_code
    assert "00002-of-00002" in line and "incomplete" in line


def test_the_same_problem_in_many_tensors_is_one_part_of_the_line():
    from convkit.errors import ErrorGroup, InputFormatError

    errs = [InputFormatError("fp8 weight without its scale_weight", path="m.safetensors",
                             key=f"w{i}", hint="export it again") for i in range(84)]
    errs.append(InputFormatError("nested header", path="m.safetensors"))
    msg = str(ErrorGroup(errs))
    assert msg.startswith("85 problems: m.safetensors: 84 tensors ('w0', 'w1', 'w2' and 81 "
                          "more): fp8 weight without its scale_weight (export it again); ")
    assert msg.endswith("m.safetensors: nested header") and msg.count("w3") == 0
