"""`convkit demo` is the README's main job: it must run and check what it claims."""
import json

import pytest
from click.testing import CliRunner

from convkit.cli import main


@pytest.mark.parametrize("arch", ["sdxl", "flux_dev"])
def test_tiny_mechanics_run_end_to_end(tmp_path, arch):
    r = CliRunner().invoke(main, ["demo", "--arch", arch, "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["ok"] is True
    steps = {s["step"]: s for s in rep["steps"]}
    assert steps["inspect"]["architecture"] == arch
    assert steps["roundtrip"]["tensors_verified"] == steps["convert"]["tensors_verified"] > 0
    assert steps["lightning"]["worst_rel_error"] < 1e-4
    q = {s["target"]: s for s in rep["steps"] if s["step"] == "quantize"}
    assert set(q) == {"fp8-e4m3fn", "nf4", "gguf:Q8_0"}
    assert q["gguf:Q8_0"]["rel_rmse"] < 0.01 and q["fp8-e4m3fn"]["rel_rmse"] < 0.05


def test_demo_is_rerunnable(tmp_path):
    for _ in range(2):
        r = CliRunner().invoke(main, ["demo", "--arch", "sd15", "--out", str(tmp_path), "-q"])
        assert r.exit_code == 0, r.output


def test_inspect_describes_quantized_outputs_by_logical_weights(tmp_path):
    from convkit.demo import run_demo
    from convkit.inspection import inspect

    run_demo(tmp_path, arch="sd15")
    ref = inspect(tmp_path / "custom-lightning.safetensors")
    for name, scheme in (("custom-lightning-nf4.safetensors", "bitsandbytes 4-bit"),
                         ("custom-lightning-fp8.safetensors", None),
                         ("custom-lightning-Q8_0.gguf", "GGUF (Q8_0")):
        r = inspect(tmp_path / name)
        assert r["architecture"] == "sd15"
        assert r["components"]["unet"]["params"] == ref["components"]["unet"]["params"], name
        if scheme:
            assert scheme in r["quantization"], r.get("quantization")
        assert not any("mixed dtypes" in o for o in r["odd"]), r["odd"]
