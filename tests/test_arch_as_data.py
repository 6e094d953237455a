"""Adding an architecture is adding data (issue 12 item 4).

Statically: no architecture name of formats/ and no diffusion-model key map kind is spelled in
convkit's code (the demo model is an SDXL by design). Dynamically: an architecture removed from a
copy of formats/ is unknown to every command, and the same copy with only its data files put back
(formats/<arch>.toml, formats/configs/<arch>/, its quantization rule list) detects, converts and
round-trips it, with no code change in between.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path


from convkit import archs, data, keymap, tiny

ROOT = Path(__file__).resolve().parents[1] / "convkit"
# the demo model is an SDXL by design (convkit demo, its trained weights and scenario)
DEMO = {"demo.py", "demo_scenario.py"}


def _literals(path: Path):
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            yield n.lineno, n.value


def test_no_architecture_is_spelled_in_code():
    names = set(archs.load_all())
    # kinds that are only diffusion models' key maps (unet/vae/clip_l/t5 double as part names)
    kinds = set(keymap.diffusion_kinds()) - {"unet"} | {"openclip", "clip_proj"}
    families = tuple(sorted({n.split("_")[0] for n in names}))   # sd15, sdxl, flux, sd3, sd35
    hits = []
    for p in sorted(ROOT.rglob("*.py")):
        if p.name in DEMO:
            continue
        for line, v in _literals(p):
            if v in names or v in kinds or (v.startswith(families) and " " not in v
                                            and len(v) < 24 and "-" not in v):
                hits.append(f"{p.relative_to(ROOT.parent)}:{line}: {v!r}")
    assert not hits, "architecture knowledge in code (make it data in formats/):\n" + "\n".join(hits)


def _probe(path: Path, out: Path) -> dict:
    """What convkit makes of ``path`` with the formats folder currently in effect."""
    from safetensors.torch import load_file

    from convkit.convert import convert
    from convkit.errors import ConvkitError
    from convkit.sources import open_source

    res = {"known": sorted(archs.load_all())}
    try:
        with open_source(path) as src:
            res["detected"] = archs.detect(src).arch.name
    except ConvkitError as e:
        return {**res, "detected": None, "error": type(e).__name__}
    # through the key map both ways (diffusers names and back to the reference names)
    out.mkdir()
    convert(path, out / "d.safetensors", "fp32", layout="diffusers-transformer")
    convert(out / "d.safetensors", out / "back.safetensors", "fp32", layout="mmdit")
    a, b = load_file(str(path)), load_file(str(out / "back.safetensors"))
    pre = "model.diffusion_model."
    a = {k[len(pre):]: v for k, v in a.items() if k.startswith(pre)}
    res["round_trip"] = set(a) == set(b) and all(bool((a[k] == b[k]).all()) for k in a)
    return res


def test_an_architecture_is_its_data_files(tmp_path, monkeypatch):
    arch = "sd35_medium"
    path = tiny.save_single_file(tiny.build(arch), tmp_path / f"{arch}.safetensors")
    without = tmp_path / "formats-without"
    shutil.copytree(data.formats_dir(), without, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    (without / f"{arch}.toml").unlink()
    shutil.rmtree(without / "configs" / arch)

    monkeypatch.setenv("CONVKIT_FORMATS_DIR", str(without))
    before = _probe(path, tmp_path / "o1")
    assert arch not in before["known"] and before["detected"] is None
    assert before["error"] == "UnknownArchitectureError"
    # put back exactly the data files (no code changes in between)
    with_it = tmp_path / "formats-with"
    shutil.copytree(without, with_it)
    monkeypatch.delenv("CONVKIT_FORMATS_DIR")
    shutil.copy(data.formats_dir() / f"{arch}.toml", with_it / f"{arch}.toml")
    shutil.copytree(data.formats_dir() / "configs" / arch, with_it / "configs" / arch)
    monkeypatch.setenv("CONVKIT_FORMATS_DIR", str(with_it))
    after = _probe(path, tmp_path / "o2")
    assert arch in after["known"] and after["detected"] == arch
    assert after["round_trip"] is True


def test_every_architecture_has_all_its_data():
    """What a new architecture must bring, listed for each one formats/ knows (so a missing
    piece fails here, not in a user's command)."""
    from convkit.quantize.rules import rules_for
    from convkit.verify.settings import render_data

    card = data.load_toml("publish/card.toml")["architectures"]
    render = render_data()["archs"]
    problems = []
    for name, a in archs.load_all().items():
        for comp in a.components:
            if not (data.formats_dir() / "configs" / name / f"{comp}.json").is_file():
                problems.append(f"{name}: no formats/configs/{name}/{comp}.json")
        if not (data.formats_dir() / "configs" / name / "scheduler.json").is_file():
            problems.append(f"{name}: no scheduler config")
        if name not in tiny.ARCHS and a.variant_of not in tiny.ARCHS:
            problems.append(f"{name}: no tiny config (nor its base's)")
        for table, what in ((card, "publish/card.toml"), (render, "verify/render.toml")):
            if name not in table:
                problems.append(f"{name}: not in formats/{what}")
        try:
            rules_for(name)
        except Exception as e:   # noqa: BLE001 - the message names what is missing
            problems.append(f"{name}: {e}")
        if a.variant_of and a.variant_of not in archs.load_all():
            problems.append(f"{name}: variant of unknown {a.variant_of}")
        kinds = set(keymap.kinds())
        problems += [f"{name}/{c.name}: unknown key map kind {c.keymap}"
                     for c in a.components.values() if c.keymap not in kinds]
    assert not problems, "\n".join(problems)
