"""Bad recipes (issue 11): an unknown step or option (nearest name suggested), a cycle, a missing
input, an artifact path outside the output folder, a bad --set: one line, non-zero exit, nothing
written. Also: every operation's schema matches its CLI command's options."""
from __future__ import annotations

import pytest

from convkit import registry
from convkit.cli import main
from convkit.recipes import shipped_recipes
from tests.test_read_path_bad_input import one_line, run


@pytest.fixture(autouse=True)
def _cache(recipe_env):
    """Built-in inputs go to the tests' own cache, not the user's."""


HEAD = """
[recipe]
name = "t"
[inputs.model]
path = "{model}"
"""


def recipe(tmp_path, body: str, model="demo:base") -> str:
    p = tmp_path / "r.toml"
    p.write_text(HEAD.format(model=model) + body)
    return str(p)


CASES = {
    "unknown op": ("""
[artifacts.a]
op = "quantise"
input = "@model"
to = "nf4"
path = "a.safetensors"
""", 2, ["artifacts.a.op", "unknown operation 'quantise'", "did you mean 'quantize'"]),
    "unknown option": ("""
[artifacts.a]
op = "quantize"
input = "@model"
to = "nf4"
scaled_fromat = "comfy_quant"
path = "a.safetensors"
""", 2, ["unknown option of quantize 'scaled_fromat'", "did you mean 'scaled_format'"]),
    "unknown target": ("""
[artifacts.a]
op = "quantize"
input = "@model"
to = "gguf:Q4_KS"
path = "a.gguf"
""", 2, ["artifacts.a.to", "gguf:Q4_K_S"]),
    "cycle": ("""
[artifacts.a]
op = "convert"
input = "@b"
path = "a.safetensors"
[artifacts.b]
op = "convert"
input = "@a"
path = "b.safetensors"
""", 2, ["cycle: a -> b -> a"]),
    "unknown reference": ("""
[artifacts.a]
op = "convert"
input = "@modle"
path = "a.safetensors"
""", 2, ["unknown input or artifact 'modle'", "did you mean 'model'"]),
    "outside": ("""
[artifacts.a]
op = "convert"
input = "@model"
path = "../a.safetensors"
""", 2, ["artifacts.a.path", "outside the output folder"]),
    "absolute": ("""
[artifacts.a]
op = "convert"
input = "@model"
path = "/tmp/a.safetensors"
""", 2, ["outside the output folder"]),
    "missing required": ("""
[artifacts.a]
op = "quantize"
input = "@model"
path = "a.safetensors"
""", 2, ["quantize needs 'to'"]),
    "wrong type": ("""
[artifacts.a]
op = "extract-lora"
tuned = "@model"
base = "@model"
rank = "sixty-four"
path = "a.safetensors"
""", 2, ["artifacts.a.rank: must be an integer"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_recipe_is_one_line_and_writes_nothing(case, tmp_path):
    body, code, words = CASES[case]
    out = tmp_path / "out"
    rc, text = run("run", recipe(tmp_path, body), "-o", out)
    line = one_line(text)
    assert rc == code, text
    for w in words:
        assert w in line, (w, line)
    assert "r.toml" in line             # names the recipe file
    assert not out.exists()


def test_problems_are_reported_together(tmp_path):
    body = CASES["unknown option"][0] + CASES["outside"][0].replace("artifacts.a", "artifacts.b")
    rc, text = run("run", recipe(tmp_path, body), "-o", tmp_path / "out")
    line = one_line(text)
    assert rc == 2 and "2 problems" in line and "scaled_fromat" in line and "outside" in line


def test_missing_input_names_it_and_how_to_set_it(tmp_path):
    body = '[artifacts.a]\nop = "convert"\ninput = "@model"\npath = "a.safetensors"\n'
    rc, text = run("run", recipe(tmp_path, body, model=str(tmp_path / "nope.safetensors")),
                   "-o", tmp_path / "out")
    line = one_line(text)
    assert rc == 3 and "nope.safetensors" in line and "no such file" in line
    assert "inputs.model" in line and "--set" in line
    assert not (tmp_path / "out").exists()


def test_bad_set_and_only(tmp_path):
    body = '[artifacts.a]\nop = "convert"\ninput = "@model"\npath = "a.safetensors"\n'
    r = recipe(tmp_path, body)
    rc, text = run("run", r, "--set", "modle=x.safetensors", "--dry-run")
    assert rc == 2 and "did you mean 'model'" in one_line(text)
    rc, text = run("run", r, "--set", "artifacts.a.dtpye=fp16", "--dry-run")
    assert rc == 2 and "did you mean 'dtype'" in one_line(text)
    rc, text = run("run", r, "--only", "b", "--dry-run")
    assert rc == 2 and "unknown artifact 'b'" in one_line(text)
    rc, text = run("run", "lightning-merj", "--dry-run")
    assert rc == 2 and "did you mean 'lightning-merge'" in one_line(text)


def test_ray_executor_without_ray_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    body = '[artifacts.a]\nop = "convert"\ninput = "@model"\npath = "a.safetensors"\n'
    rc, text = run("run", recipe(tmp_path, body), "-o", tmp_path / "out", "--executor", "ray")
    assert rc == 2 and "pip install 'convkit[ray]'" in one_line(text)
    assert not (tmp_path / "out").exists()


def test_artifact_may_not_overwrite_an_input(tmp_path):
    src = tmp_path / "out" / "m.safetensors"
    src.parent.mkdir()
    import shutil

    from convkit.demo_scenario import DEMO_DIR
    shutil.copyfile(DEMO_DIR / "base.safetensors", src)
    body = '[artifacts.a]\nop = "convert"\ninput = "@model"\npath = "m.safetensors"\n'
    rc, text = run("run", recipe(tmp_path, body, model=str(src)), "-o", tmp_path / "out")
    assert rc == 2 and "would overwrite input model" in one_line(text)


# CLI-only options: output and run control, not what the operation makes
CLI_ONLY = {"quiet", "as_json", "dry_run", "overwrite", "output", "report_path", "report_dir",
            "no_cache", "target", "fmt", "extras_dir", "loras", "artifacts"}
RENAMED = {"quantize": {"type_rules": "type_rule", "extras_dir": "extras"},
           "extract-lora": {"fmt": "format"}, "convert-lora": {"fmt": "format"},
           "split": {"target": "for"}, "assemble": {"target": "for"}}


@pytest.mark.parametrize("op", registry.canonical("operation"))
def test_operation_schema_matches_the_cli(op):
    """Every option of the CLI command is in the operation's schema (same name, snake_case), so
    a recipe can say whatever the command line can."""
    cmd = main.commands[op]
    schema = registry.entry("operation", op).options
    ren = RENAMED.get(op, {})
    missing = []
    for p in cmd.params:
        name = ren.get(p.name, p.name)
        if name in schema:
            continue
        if p.name in CLI_ONLY or name in ("input", "output", "checkpoint", "tuned", "base"):
            continue
        missing.append(p.name)
    assert not missing, f"{op}: CLI options not in the recipe schema: {missing}"


def test_shipped_recipes_parse():
    from convkit.recipes import load

    names = set(shipped_recipes())
    assert {"lightning-merge", "flux-lowvram", "extract-lora", "comfyui-split"} <= names
    for n in names:
        r = load(n)
        assert r.artifacts and any(a.op.name == "verify" for a in r.artifacts.values()), n
