"""convkit run (issue 11): the shipped recipes run on the demo model and their artifacts check out
through convkit's own logical-weights view; a second run does no work; a changed option rebuilds
only what it touches; a run killed with SIGKILL mid-artifact leaves no partial file and a re-run
completes, and --jobs 2 makes the same bytes as one process."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from click.testing import CliRunner

from convkit.cli import main
from convkit.demo_scenario import demo_available
from convkit.sources import open_source

pytestmark = [pytest.mark.skipif(not demo_available(), reason="demo model not installed"),
              pytest.mark.xdist_group("recipes")]


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout


def tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor as convkit reads it (logical weights: quantized ones decoded)."""
    with open_source(path) as s:
        return {k: s.load(k) for k in s.keys()}


def record(out: Path) -> dict:
    return json.loads((out / "convkit-run.json").read_text())


def temp_files(out: Path) -> list[Path]:
    """Files and folders in convkit's temp naming (convkit.writer.temp_path_for)."""
    return [p for p in out.rglob("*") if TEMP.match(p.name)]


TEMP = re.compile(r"^\..+\.convkit-\d+-[0-9a-f]{8}\.tmp$")


def test_lightning_merge_artifacts_check_out(lightning_release, recipe_env):
    out, res = lightning_release
    rows = {r["name"]: r for r in res["artifacts"]}
    assert res["ok"] and res["exit_code"] == 0
    assert set(rows) == {"fp16", "unet", "fp8", "nf4", "q8", "q4ks", "verify-variants"}
    assert all(r["status"] == "built" for r in rows.values())
    assert rows["verify-variants"]["gate"] == "ok"
    gated = {Path(a["path"]).name: a for a in rows["verify-variants"]["summary"]["artifacts"]}
    assert {a["kind"] for a in gated.values()} == {"lossless", "fp8", "int4", "int8"}

    # the merge is what merge-lora makes of the same inputs, bit for bit
    from convkit.lora import merge_lora
    from convkit.recipes.inputs import resolve

    direct = recipe_env["dir"] / "direct.safetensors"
    merge_lora(resolve("demo:custom"), [f"{resolve('demo:lightning-lora')}:1.0"], direct,
               dtype="fp16")
    merged = tensors(out / "custom-lightning-4step-fp16.safetensors")
    want = tensors(direct)
    assert merged.keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in merged.items())
    # the UNet file: the merge's UNet, lossless, without the prefix
    unet = tensors(out / "custom-lightning-4step-unet-fp16.safetensors")
    pre = "model.diffusion_model."
    assert len(unet) == sum(k.startswith(pre) for k in merged)
    assert all(torch.equal(v, merged[pre + k]) for k, v in unet.items())
    # each quantized file decodes to the merge within the error its own report states
    for name in ("fp8-e4m3fn.safetensors", "nf4.safetensors", "Q8_0.gguf", "Q4_K_S.gguf"):
        p = out / f"custom-lightning-4step-{name}"
        with open_source(p) as s:
            rep = json.loads(s.metadata["convkit.quant_report"])
            got = {k: s.load(k) for k in s.keys()}
        worst = rep["max_rel_rmse"] if "max_rel_rmse" in rep else rep["summary"]["max_rel_rmse"]
        checked = 0
        for k, v in got.items():
            ref = merged.get(k) if k in merged else merged.get(pre + k)
            if ref is None or not ref.is_floating_point() or ref.dim() < 2:
                continue
            err = (v.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
            assert err <= worst * 1.001 + 1e-6, (name, k, float(err), worst)
            checked += 1
        assert checked > 50, name
    # every artifact says which run made it
    with open_source(out / "custom-lightning-4step-Q8_0.gguf") as s:
        key = s.metadata.get("convkit.content_key")
    assert key == record(out)["artifacts"]["q8"]["key"]


def test_second_run_does_no_work_and_changes_rebuild_only_what_they_touch(lightning_release,
                                                                          recipe_env):
    out, _ = lightning_release
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code, text = run("run", "lightning-merge", "-o", out, "--json", "--set",
                     f"prompts={recipe_env['prompts']}", "--only", "verify-variants")
    assert code == 0, text
    d = json.loads(text)
    assert len(d["artifacts"]) == 7 and d["seconds"] < 5
    assert {r["status"] for r in d["artifacts"]} == {"up to date"}
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != "convkit-run.json"} == \
        {p: t for p, t in before.items() if p.name != "convkit-run.json"}

    # a dry run of a changed option: only that artifact and the verify that reads it
    code, text = run("run", "lightning-merge", "-o", out, "--json", "--dry-run", "--set",
                     f"prompts={recipe_env['prompts']}", "--set", "artifacts.q4ks.to=gguf:Q4_K_M")
    rows = {r["name"]: r["status"] for r in json.loads(text)["artifacts"]}
    assert code == 0 and {n for n, s in rows.items() if s == "would build"} == \
        {"q4ks", "verify-variants", "verify-merge"}     # verify-merge: never built here
    # --only builds it (and nothing else: what it reads is up to date)
    code, text = run("run", "lightning-merge", "-o", out, "--json", "--only", "q4ks", "--set",
                     f"prompts={recipe_env['prompts']}", "--set", "artifacts.q4ks.to=gguf:Q4_K_M")
    d = json.loads(text)
    assert code == 0 and {r["name"]: r["status"] for r in d["artifacts"]} == \
        {"fp16": "up to date", "q4ks": "built"}
    with open_source(out / "custom-lightning-4step-Q4_K_S.gguf") as s:
        assert "Q6_K" in {s.decoder(k).label for k in s.keys()}      # the _M mix
    # and back: the original option rebuilds it again (the key is the options, not the time)
    code, _ = run("run", "lightning-merge", "-o", out, "--quiet", "--only", "q4ks", "--set",
                  f"prompts={recipe_env['prompts']}")
    assert code == 0
    assert record(out)["artifacts"]["q4ks"]["files"][0]["sha256"] == \
        _first_sha(before, out, "custom-lightning-4step-Q4_K_S.gguf")


def _first_sha(before, out, name):
    from convkit.recipes.worker import sha256_file

    return sha256_file(out / name)


def test_dry_run_writes_nothing(recipe_env, tmp_path):
    out = tmp_path / "fresh"
    code, text = run("run", "comfyui-split", "-o", out, "--dry-run")
    assert code == 0, text
    assert "would build" in text and "after comfyui" in text and not out.exists()


SMALL = """
[recipe]
name = "small"
[inputs.model]
path = "demo:base"
[artifacts.fp32]
op = "convert"
input = "@model"
dtype = "fp32"
path = "base-fp32.safetensors"
[artifacts.nf4]
op = "quantize"
input = "@fp32"
to = "nf4"
path = "quant/base-nf4.safetensors"
[artifacts.q8]
op = "quantize"
input = "@fp32"
to = "gguf:Q8_0"
path = "quant/base-Q8_0.gguf"
"""


def _shas(out: Path) -> dict:
    return {n: [(f["path"], f["sha256"]) for f in a["files"]]
            for n, a in record(out)["artifacts"].items()}


def test_killed_run_leaves_no_partial_file_and_rerun_completes(recipe_env, tmp_path):
    """SIGKILL the whole run (--jobs 2: the driver and its workers) while an artifact is being
    written; the re-run removes the dead run's temp files and builds what is missing; the
    artifacts (built by two worker processes) equal those of an uninterrupted one-process run."""
    r = tmp_path / "small.toml"
    r.write_text(SMALL)
    ref = tmp_path / "ref"
    code, text = run("run", r, "-o", ref, "--quiet")
    assert code == 0, text
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "convkit.cli", "run", str(r), "-o", str(out),
                          "--jobs", "2", "--quiet"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial, workers = [], []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            partial = temp_files(out) if out.exists() else []
            if partial:
                break
            time.sleep(0.002)
        workers = psutil.Process(p.pid).children(recursive=True) if p.poll() is None else []
        os.kill(p.pid, signal.SIGKILL)          # the run only: its workers must die with it
    finally:
        p.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, alive
    assert partial, "the run ended before any artifact was being written"
    done = record(out)["artifacts"] if (out / "convkit-run.json").exists() else {}
    assert len(done) < 3
    code, text = run("run", r, "-o", out, "--json", "--jobs", "2")
    d = json.loads(text)
    assert code == 0 and sum(x["status"] == "built" for x in d["artifacts"]) == 3 - len(done)
    assert not temp_files(out)
    assert _shas(out) == _shas(ref)


# flux-lowvram: every variant is made, two of them rendered (the others' kinds are tested in
# test_verify)
TRIM = {"flux-lowvram": ["--set", 'artifacts.verify.artifacts=["@nf4", "@q4ks"]'],
        "sd35-gguf": ["--set", 'artifacts.verify.artifacts=["@q4ks"]']}


@pytest.mark.parametrize("name", ["extract-lora", "comfyui-split", "flux-lowvram", "sd35-gguf"])
def test_shipped_recipe_runs_on_the_demo_model(name, recipe_env, tmp_path):
    out = tmp_path / name
    code, text = run("run", name, "-o", out, "--json", "--set",
                     f"prompts={recipe_env['prompts']}", *TRIM.get(name, []))
    assert code == 0, text
    d = json.loads(text)
    assert d["ok"] and all(r["status"] == "built" for r in d["artifacts"])
    assert all(r["gate"] == "ok" for r in d["artifacts"] if r["op"] == "verify")
    rec = record(out)
    if name == "comfyui-split":      # reassembled from the parts: the checkpoint, bit for bit
        from convkit.recipes.inputs import resolve

        a, b = tensors(resolve("demo:custom")), tensors(out / "check/model-reassembled.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (out / "ComfyUI/models/diffusion_models/model.safetensors").is_file()
    if name == "extract-lora":
        assert rec["artifacts"]["lora"]["summary"]["modules"] > 50
    if name == "flux-lowvram":
        kinds = {a["kind"] for a in rec["artifacts"]["verify"]["summary"]["artifacts"]}
        assert kinds == {"int4"} and len(rec["artifacts"]) == 6
    if name == "sd35-gguf":
        # SD3.5 Large's rows fit no K-quant block: Q4_K_S falls back per tensor to legacy types
        # (never F16), while Q4_0 has no fallback at all
        from convkit.inspection import inspect

        q4ks = inspect(out / "tiny-sd3.5_large-Q4_K_S.gguf")["storage"]
        assert "Q5_0" in q4ks and "Q4_K" in q4ks
        assert set(inspect(out / "tiny-sd3.5_large-Q4_0.gguf")["storage"]) <= {"Q4_0", "F32", "F16"}
        names = {p.name for p in (out / "ComfyUI/models/text_encoders").iterdir()}
        assert names == {f"tiny-sd3.5_large_{t}.safetensors" for t in ("clip_l", "clip_g", "t5xxl")}


def test_failed_gate_fails_the_run_and_says_which(recipe_env, tmp_path):
    """A verify whose gate cannot pass (a LoRA that must not render like the base, given the
    base itself as the artifact) makes the run exit 10 and the table says FAIL."""
    one = tmp_path / "one.toml"
    one.write_text('[[prompts]]\nname = "c"\nseed = 1\ntext = "a red circle on a blue background"\n')
    r = tmp_path / "gate.toml"
    r.write_text("""
[recipe]
name = "gate"
[inputs.model]
path = "demo:base"
[inputs.other]
path = "demo:custom"
[artifacts.copy]
op = "convert"
input = "@other"
path = "other-fp16.safetensors"
[artifacts.check]
op = "verify"
artifacts = ["@copy"]
reference = "@model"
prompts = "%s"
path = "verify"
""" % one)
    rr = CliRunner().invoke(main, ["run", str(r), "-o", str(tmp_path / "o")])
    assert rr.exit_code == 10, rr.output
    assert "FAIL" in rr.stdout and "check" in rr.output.splitlines()[-1]
    # such a release is not published, unless asked to (and then the card says so)
    rr = CliRunner().invoke(main, ["publish", str(tmp_path / "o"), "--repo", "me/x", "--dry-run"])
    assert rr.exit_code == 10 and "verify failed for check" in rr.output
    rr = CliRunner().invoke(main, ["publish", str(tmp_path / "o"), "--repo", "me/x", "--dry-run",
                                   "--allow-failed", "--license", "openrail++"])
    assert rr.exit_code == 0 and "FAIL" in rr.stdout


def test_ctrl_c_stops_the_run_and_keeps_what_was_completed(recipe_env, tmp_path, monkeypatch):
    """An operation interrupted (convkit's Interrupted is a KeyboardInterrupt and a ConvkitError)
    stops the whole run: the artifacts after it are not started, the completed ones stay
    recorded, and the CLI says so with exit 130."""
    from convkit.recipes import worker

    r = tmp_path / "small.toml"
    r.write_text(SMALL)
    real = worker.run_task

    def interrupt_nf4(payload):
        if payload["artifact"] == "nf4":
            from convkit.errors import Interrupted
            raise Interrupted("interrupted; no output was written")
        return real(payload)

    monkeypatch.setattr(worker, "run_task", interrupt_nf4)
    rr = CliRunner().invoke(main, ["run", str(r), "-o", str(tmp_path / "o")])
    assert rr.exit_code == 130 and "kept and recorded" in rr.output, rr.output
    assert set(record(tmp_path / "o")["artifacts"]) == {"fp32"}       # q8 never started
