"""Lone component files ("parts", formats/parts.toml, convkit/layouts/parts.py) on tiny models.

Every component of every architecture is written alone - in diffusers names and in single-file
names, with no prefix and with the architecture's own single-file prefix - and must be detected
as the right kind, naming and prefix, fit its (arch, component), and read back through
``component_tensors`` as exactly the component's diffusers tensors. Full checkpoints are not parts.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from convkit import archs, keymap, tiny
from convkit.cli import main
from convkit.errors import UnknownNameError, UsageError
from convkit.inspection import inspect
from convkit.layouts import parts
from convkit.loading import component_tensors, load_tensor
from convkit.sources import open_source

ARCHS = ("sd15", "sdxl", "sdxl_refiner", "flux_dev")

# one worker builds the tiny models once for the whole module
pytestmark = pytest.mark.xdist_group("parts_detect")


def _own_prefixes(arch: str) -> dict[str, str]:
    a = archs.get(arch)
    return a.layout(a.single_file_layout).prefixes


CASES = [(arch, comp, naming, where) for arch in ARCHS for comp in archs.get(arch).components
         for naming in ("diffusers", "single") for where in ("bare", "own")]


@pytest.fixture(scope="module")
def models():
    """{arch: ({component: diffusers state dict}, {component: single-file state dict})}."""
    out = {}
    for arch in ARCHS:
        t = tiny.build(arch)
        sds = t.state_dicts()
        single = {c: keymap.to_single_file(archs.get(arch).components[c].keymap, sd,
                                           t.spec["components"][c]["config"])
                  for c, sd in sds.items()}
        out[arch] = (t, sds, single)
    return out


def _write(models, tmp_path, arch, comp, naming, prefix, metadata=None):
    _, sds, single = models[arch]
    sd = sds[comp] if naming == "diffusers" else single[comp]
    path = tmp_path / f"{arch}-{comp}-{naming}.safetensors"
    return tiny.save_state_dict({prefix + k: v for k, v in sd.items()}, path, metadata)


def _same_names_both_sides(models, arch, comp) -> bool:
    """T5 always, CLIP-L under transformers < 5.6: the two namings are one set of names."""
    t, sds, _ = models[arch]
    kind = archs.get(arch).components[comp].keymap
    single = keymap.to_single_file(kind, sds[comp], t.spec["components"][comp]["config"],
                                   extras=False)
    return set(sds[comp]) == set(single)


def _listed() -> set[tuple[str, str, str]]:
    return {(e.kind, e.naming, e.prefix) for e in parts.rules().entries}


def _assert_reads_back(src, match, arch, comp, expected):
    det = parts.as_detection(src, match, arch, comp)
    assert det.layout.name == f"part-{match.kind}" and det.layout.prefixes == {comp: match.prefix}
    tensors = component_tensors(src, det, comp)
    assert sorted(t.name for t in tensors) == sorted(expected)
    for t in tensors:
        got = load_tensor(src, t)
        assert got.shape == expected[t.name].shape and got.equal(expected[t.name]), t.name


@pytest.mark.parametrize("arch,comp,naming,where", CASES)
def test_every_component_alone_is_detected_and_reads_back(models, tmp_path, arch, comp, naming, where):
    spec = archs.get(arch).components[comp]
    prefix = _own_prefixes(arch)[comp] if where == "own" else ""
    path = _write(models, tmp_path, arch, comp, naming, prefix)
    # where both sides use the same names, the file is the single-file spelling (parts.toml)
    expect_naming = "single" if _same_names_both_sides(models, arch, comp) else naming
    with open_source(path) as src:
        match = parts.detect_part(src)
        if expect_naming == "diffusers" and prefix and \
                (spec.keymap, "diffusers", prefix) not in _listed():
            # diffusers names under a single-file checkpoint prefix: only the spellings that
            # occur (parts.toml, e.g. early SD1 CLIP-L) are parts; the rest is no guess
            assert match is None
            return
        assert match is not None, f"{arch}/{comp} {naming} '{prefix}' not detected"
        assert (match.kind, match.naming, match.prefix) == (spec.keymap, expect_naming, prefix)
        assert (arch, comp) in match.archs
        assert match.keys == tuple(src.keys())
        if spec.kind == "diffusion_model":
            assert match.archs == ((arch, comp),)
        if spec.keymap == "vae":  # FLUX's ae has no quant_conv: the keys tell the families apart
            flux = {a for a, _ in match.archs if a.startswith("flux")}
            assert flux == ({"flux_dev", "flux_schnell"} if arch.startswith("flux") else set())
        _assert_reads_back(src, match, arch, comp, models[arch][1][comp])


def test_every_convkit_prefix_and_entry_is_cited():
    r = parts.rules()
    listed = {(e.kind, e.naming, e.prefix) for e in r.entries}
    assert len(listed) == len(r.entries)
    for e in r.entries:
        assert e.source.strip() and (e.kind, e.naming) in r.signatures and e.kind in r.kind_titles
    # every text encoder/VAE prefix of convkit's own single-file layouts is a part entry
    for a in archs.load_all().values():
        for lay in a.layouts:
            if lay.folder or lay.naming == "diffusers":
                continue
            for comp, prefix in lay.prefixes.items():
                kind = a.components[comp].keymap
                if kind not in parts.diffusion_kinds():
                    assert (kind, "single", prefix) in listed, (a.name, lay.name, comp)


def test_clip_g_in_comfy_all_in_one_spelling(models, tmp_path):
    """Forge reads text_encoders.clip_g.transformer.text_model.* (ComfyUI all-in-one files)."""
    prefix = "text_encoders.clip_g.transformer."
    path = _write(models, tmp_path, "sdxl", "text_encoder_2", "diffusers", prefix)
    with open_source(path) as src:
        m = parts.detect_part(src)
        assert (m.kind, m.naming, m.prefix) == ("openclip", "diffusers", prefix)
        assert m.archs[:2] == (("sdxl", "text_encoder_2"), ("sdxl_refiner", "text_encoder_2"))
        # the same names are SD3's CLIP-G (clip_proj) under its own prefix: it fits those too
        assert set(m.archs[2:]) == {(a, "text_encoder_2") for a in archs.load_all()
                                    if a.startswith(("sd3", "sd35"))}
        assert m.also == (("clip_proj", "single"),)
        assert "CLIP-L" in m.note   # the names cannot tell a CLIP-L with projection apart
        _assert_reads_back(src, m, "sdxl_refiner", "text_encoder_2", models["sdxl"][1]["text_encoder_2"])


def test_lone_component_folders_are_parts(models, tmp_path):
    """A component folder of a diffusers model (config.json + weights) on its own."""
    folder = tiny.save_diffusers(models["sd15"][0], tmp_path / "sd15")
    for comp, kind in (("text_encoder", "clip_l"), ("vae", "vae")):
        with open_source(folder / comp) as src:
            m = parts.detect_part(src)
            assert (m.kind, m.prefix) == (kind, "") and ("sd15", comp) in m.archs
            _assert_reads_back(src, m, "sd15", comp, models["sd15"][1][comp])
    with open_source(folder) as src:   # the whole folder is a checkpoint
        assert parts.detect_part(src) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_full_checkpoints_are_not_parts(models, tmp_path, arch):
    path = tiny.save_single_file(models[arch][0], tmp_path / f"{arch}.safetensors")
    with open_source(path) as src:
        assert parts.detect_part(src) is None
        assert archs.detect(src).arch.name == arch
    assert "part" not in inspect(path)


def test_keys_the_rule_cannot_explain_are_no_part(models, tmp_path):
    single = models["sdxl"][2]
    te, vae = single["text_encoder"], single["vae"]
    q = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    for name, sd in [("stray", {**te, "foo.bar": te[q]}),                        # one odd key
                     ("te+vae", {**te, "decoder.conv_in.weight": vae["decoder.conv_in.weight"]}),
                     ("no-q", {k: v for k, v in te.items() if k != q}),          # required key gone
                     ("mixed-prefix", {("cond_stage_model.transformer." if i % 2 else "") + k: v
                                       for i, (k, v) in enumerate(te.items())})]:
        path = tiny.save_state_dict(sd, tmp_path / f"{name}.safetensors")
        with open_source(path) as src:
            assert parts.detect_part(src) is None, name


def test_two_equal_entries_are_no_guess(models, tmp_path, monkeypatch):
    r = parts.rules()
    twice = parts.Rules(r.kind_titles, r.naming_titles, r.signatures, r.entries + r.entries[:1], r.fits)
    monkeypatch.setattr(parts, "rules", lambda: twice)
    path = _write(models, tmp_path, "sd15", "text_encoder", "single", "")
    with open_source(path) as src:
        assert len(parts.candidates(src)) == 2 and parts.detect_part(src) is None


def test_convkit_part_metadata_narrows_the_fits(models, tmp_path):
    for value, fits, ignored in [("flux_dev/text_encoder", ["flux_dev/text_encoder"], False),
                                 ("sdxl/vae", None, True),        # not a CLIP-L component
                                 ("nonsense", None, True)]:
        path = _write(models, tmp_path, "sdxl", "text_encoder", "single", "",
                      {parts.PART_METADATA: value})
        with open_source(path) as src:
            m = parts.detect_part(src)
        assert m.kind == "clip_l"
        if fits:
            assert m.fits == fits and not m.note
        else:
            assert len(m.archs) == 4 and ("ignored" in m.note) == ignored
    # the SD VAEs have the same keys and shapes: only the metadata tells which one
    path = _write(models, tmp_path, "sdxl", "vae", "single", "first_stage_model.",
                  {parts.PART_METADATA: "sdxl/vae"})
    with open_source(path) as src:
        assert parts.detect_part(src).archs == (("sdxl", "vae"),)


def test_a_prefix_says_whose_part_it_is(models, tmp_path):
    """The refiner's OpenCLIP prefix is not the base's: a refiner text encoder fits the
    refiner only; bare names fit both."""
    path = _write(models, tmp_path, "sdxl_refiner", "text_encoder_2", "single",
                  "conditioner.embedders.0.model.")
    with open_source(path) as src:
        assert parts.detect_part(src).archs == (("sdxl_refiner", "text_encoder_2"),)
    path = _write(models, tmp_path, "sdxl_refiner", "text_encoder_2", "single", "")
    with open_source(path) as src:
        assert len(parts.detect_part(src).archs) == 2


def test_as_detection_refuses_a_component_of_another_kind(models, tmp_path):
    path = _write(models, tmp_path, "sd15", "text_encoder", "single", "")
    with open_source(path) as src:
        m = parts.detect_part(src)
        with pytest.raises(UsageError, match="clip_l"):
            parts.as_detection(src, m, "sdxl", "text_encoder_2")
        with pytest.raises(UnknownNameError):
            parts.as_detection(src, m, "sdxl", "text_encoder_3")
        assert parts.as_detection(src, m, "flux_dev", "text_encoder").layout.naming == "bfl"
    path = _write(models, tmp_path, "sd15", "unet", "single", "")
    with open_source(path) as src, pytest.raises(UsageError, match="sd15/unet"):
        parts.as_detection(src, parts.detect_part(src), "sdxl", "unet")


def test_inspect_reports_the_part(models, tmp_path):
    prefix = "text_encoders.clip_l.transformer."
    path = _write(models, tmp_path, "flux_dev", "text_encoder", "single", prefix)
    r = inspect(path)
    assert r["architecture"] is None and not r["odd"] and "lora" not in r
    assert r["part"] == {"kind": "clip_l", "naming": "single", "prefix": prefix,
                         "title": "CLIP-L text encoder (transformers names)",
                         # the prefix is the Flux all-in-one layout's: Flux's CLIP-L
                         "fits": ["flux_dev/text_encoder", "flux_schnell/text_encoder"]}
    row = r["components"]["text_encoder"]
    assert row["tensors"] == len(models["flux_dev"][2]["text_encoder"])
    assert row["params"] == sum(v.numel() for v in models["flux_dev"][1]["text_encoder"].values())
    assert row["full_size_params"] == 123060480

    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 0, out.output
    assert "part:         clip_l (CLIP-L text encoder, transformers names)" in out.output
    assert "fits:         flux_dev/text_encoder, flux_schnell/text_encoder" in out.output
    assert "not recognised" not in out.output

    t5 = _write(models, tmp_path, "flux_dev", "text_encoder_2", "single", "")
    out = CliRunner().invoke(main, ["inspect", str(t5), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["part"]["fits"] == [
        f"{a.name}/{c.name}" for a in archs.load_all().values() for c in a.components.values()
        if c.keymap == "t5"]


def test_inspect_reports_a_lone_diffusion_model_as_a_part(models, tmp_path):
    path = _write(models, tmp_path, "sdxl", "unet", "single", "model.diffusion_model.")
    r = inspect(path)
    assert r["architecture"] == "sdxl"
    assert (r["part"]["kind"], r["part"]["prefix"], r["part"]["fits"]) == \
        ("unet", "model.diffusion_model.", ["sdxl/unet"])
    out = CliRunner().invoke(main, ["inspect", str(path)]).output
    assert "architecture: sdxl" in out and "part:         unet (Stable Diffusion XL (base) UNet, " \
        "SGM/LDM names), prefix 'model.diffusion_model.'" in out
