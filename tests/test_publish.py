"""convkit publish (issue 11) end to end over real HTTP: the real huggingface_hub client (in a
`convkit publish` subprocess, so HF_ENDPOINT / HF_HOME / HF_HUB_DISABLE_XET are set before it is
imported) against tests/hubserver.py, a local server speaking the Hub's upload protocol.

The release is the shipped lightning-merge recipe's output on the demo model."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from convkit.demo_scenario import demo_available
from tests.hubserver import HubServer, validate_card

pytestmark = [pytest.mark.skipif(not demo_available(), reason="demo model not installed"),
              pytest.mark.xdist_group("recipes")]

TOKEN = "hf_convkitTestTokenDoNotLeak0123456789"


@pytest.fixture
def hub():
    with HubServer(tokens={TOKEN: "alice"}) as h:
        yield h
    assert not h.server_errors, h.server_errors


def publish(hub, tmp_path, *args, token=TOKEN, home="home"):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / home), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    p = subprocess.run([sys.executable, "-m", "convkit.cli", "publish", *map(str, args)],
                       env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert TOKEN not in out
    return p.returncode, p.stdout, p.stderr


def no_token_anywhere(tmp_path, *dirs):
    for d in (tmp_path, *dirs):
        for f in d.rglob("*"):
            if f.is_file() and f.stat().st_size < 50_000_000:
                assert TOKEN.encode() not in f.read_bytes(), f


def card_meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_publish_commits_everything_once_and_checks_it(hub, lightning_release, tmp_path):
    out, _ = lightning_release
    code, stdout, err = publish(hub, tmp_path, out, "--repo", "alice/custom-lightning", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    commits = [c for c in hub.commits("alice/custom-lightning") if c.summary != "initial commit"]
    assert len(commits) == 1                        # the whole variant set in one commit
    files = hub.files("alice/custom-lightning")
    rec = json.loads((out / "convkit-run.json").read_text())
    want = {f["path"]: f["sha256"] for a in rec["artifacts"].values()
            if a["op"] != "verify" for f in a["files"]}
    assert len(want) == 6
    for path, sha in want.items():      # every variant, byte for byte
        assert hashlib.sha256(files[path]).hexdigest() == sha
        assert files[path] == (out / path).read_bytes()
    assert {"verify/variants/contact_sheet.png", "recipe.toml", "README.md"} <= set(files)
    assert "convkit-run.json" not in files         # local paths stay local
    assert res["verified_files"] == len(res["operations"])

    card = files["README.md"].decode()
    meta = card_meta(card)
    assert validate_card(card)[0] == []
    assert meta["base_model"] == ["ByteDance/SDXL-Lightning"]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "diffusion-single-file"
    assert meta["pipeline_tag"] == "text-to-image" and meta["license"] == "openrail++"
    assert {"stable-diffusion-xl", "gguf", "comfyui"} <= set(meta["tags"])
    for path, sha in want.items():
        assert f"`{path}`" in card and sha in card
    assert "Unet Loader (GGUF)" in card and "steps: 4" in card and "guidance (CFG): 0" in card
    assert "contact_sheet.png" in card and "lightning-merge" in card
    assert hub.count("validate-yaml") >= 1

    # nothing changed: no commit, nothing uploaded
    uploads = hub.count("lfs-upload")
    code, stdout, err = publish(hub, tmp_path, out, "--repo", "alice/custom-lightning")
    assert code == 0, err
    assert "no commit" in stdout
    assert len([c for c in hub.commits("alice/custom-lightning")]) == len(commits) + 1
    assert hub.count("lfs-upload") == uploads
    no_token_anywhere(tmp_path, out)
    assert TOKEN not in hub.log_text()


def test_server_failing_mid_commit_publishes_nothing_and_rerun_completes(hub, lightning_release,
                                                                       tmp_path):
    out, _ = lightning_release
    hub.fail_next("commit", status=500)
    code, _, err = publish(hub, tmp_path, out, "--repo", "alice/flaky")
    assert code == 11 and "nothing was published" in err and "run the same command" in err
    assert [c.summary for c in hub.commits("alice/flaky")] == ["initial commit"]
    uploads = hub.count("lfs-upload", ok=True)
    code, stdout, err = publish(hub, tmp_path, out, "--repo", "alice/flaky", "--create-pr")
    assert code == 0, err
    assert hub.count("lfs-upload", ok=True) == uploads     # the Hub kept the first try's files
    assert "refs/pr/1" in hub.refs("alice/flaky") and "discussions/1" in stdout


def test_dry_run_needs_no_network_or_token(lightning_release, tmp_path):
    out, _ = lightning_release
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "h"))
    p = subprocess.run([sys.executable, "-m", "convkit.cli", "publish", str(out), "--repo",
                        "alice/x", "--dry-run"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("---\n") and "would commit to alice/x@main" in p.stdout


@pytest.mark.parametrize("args,words", [
    (["--repo", "not a repo"], ["not a valid Hub repo id"]),
    (["--repo", "alice/x", "--license", "apache2"],
     ["not a Hub licence id", "did you mean 'apache-2.0'"]),
    (["--repo", "alice/x", "--license", "other"], ["--license-name"]),
])
def test_bad_publish_arguments_are_refused_before_any_network(lightning_release, args, words):
    from click.testing import CliRunner

    from convkit.cli import main

    out, _ = lightning_release
    r = CliRunner().invoke(main, ["publish", str(out), *args])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("convkit: error:")]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("token,words", [
    (None, ["no Hugging Face token", "hf auth login", "HF_TOKEN"]),
    ("hf_wrong", ["refused the token"]),
])
def test_missing_or_refused_token(hub, lightning_release, tmp_path, token, words):
    out, _ = lightning_release
    rc, stdout, err = publish(hub, tmp_path, out, "--repo", "alice/x", token=token)
    lines = [ln for ln in err.splitlines() if ln.startswith("convkit: error:")]
    assert rc == 2 and len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert hub.count("create-repo") == 0 and hub.count("commit") == 0


def test_no_licence_known_asks_for_one(hub, lightning_release, tmp_path):
    """A folder without a recipe record (plain files): the licence of the base is not known."""
    out, _ = lightning_release
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "m.gguf").write_bytes((out / "custom-lightning-4step-Q8_0.gguf").read_bytes())
    rc, _, err = publish(hub, tmp_path, plain, "--repo", "alice/plain")
    assert rc == 2 and "licence of the base is not known" in err and "--license" in err
    rc, stdout, err = publish(hub, tmp_path, plain, "--repo", "alice/plain", "--license",
                              "openrail++", "--base-model", "stabilityai/stable-diffusion-xl-base-1.0",
                              "--revision", "v1", "--json")
    assert rc == 0, err
    assert "m.gguf" in hub.files("alice/plain", rev="v1")       # on the branch it made
    assert "m.gguf" not in hub.files("alice/plain")
    meta = card_meta(hub.files("alice/plain", rev="v1")["README.md"].decode())
    assert meta["library_name"] == "gguf" and meta["base_model_relation"] == "quantized"


def test_card_of_a_diffusers_folder(recipe_env, tmp_path):
    """A plain diffusers folder: library diffusers, the architecture detected from its weights
    (Flux schnell, not dev: same pipeline class), the licence as given."""
    from convkit import tiny
    from convkit.publish import prepare

    tiny.save_diffusers(tiny.build("flux_schnell", 0), tmp_path / "rel" / "flux")
    rel, meta, text = prepare(tmp_path / "rel", "me/x", license="apache-2.0")
    assert meta["library_name"] == "diffusers" and rel.architectures == {"flux_schnell"}
    assert "flux.1-schnell" in meta["tags"] and "base_model" not in meta
    assert "`flux/transformer/diffusion_pytorch_model.safetensors`" in text
    assert validate_card(text)[0] == []


def test_card_names_the_loader_of_an_sdcpp_gguf(recipe_env, tmp_path):
    """The card tells a stable-diffusion.cpp GGUF (quantize layout = sdcpp, from the record)
    from a ComfyUI-GGUF one."""
    from convkit.publish import prepare
    from convkit.recipes import load, run

    r = tmp_path / "r.toml"
    r.write_text('[inputs.model]\npath = "demo:base"\n[artifacts.q]\nop = "quantize"\n'
                 'input = "@model"\nto = "gguf:Q8_0"\nlayout = "sdcpp"\npath = "m.gguf"\n')
    assert run(load(str(r)), tmp_path / "o").ok
    rel, meta, text = prepare(tmp_path / "o", "me/x", license="openrail++")
    assert [e.kind for e in rel.weights] == ["gguf_sdcpp"] and "sd-cli -m" in text
    assert meta["library_name"] == "gguf"
