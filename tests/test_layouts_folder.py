"""convkit.layouts.folder: the non-weight files of a diffusers pipeline folder.

Offline (HF_HUB_OFFLINE=1, set in conftest). Each folder is the tiny model's weights (saved by
the classes, their config.json removed) plus what pipeline_files returns; it must load with
diffusers' own DiffusionPipeline.from_pretrained as the right pipeline, classes and configs, and
its model_index.json and config.json files must be the bytes diffusers' save_pretrained writes
for the same pipeline (tiny.save_diffusers).
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from convkit import archs, data, tiny, tokenizers
from convkit.errors import InputFormatError, UsageError
from convkit.layouts.folder import (
    NULL,
    component_config_json,
    library_of,
    pipeline_files,
    read_config_from,
    tokenizer_folder,
)

ALL = tiny.ARCHS
FLUX = ("flux_dev", "flux_schnell")
PROMPT = "a photo of a cat"


@functools.cache
def built(arch: str) -> tiny.TinyModel:
    return tiny.build(arch)


def configs_of(arch: str) -> dict[str, dict]:
    """What the converter passes: {component: resolved config with "_class_name"}."""
    return {n: {"_class_name": c["class"], **c["config"]}
            for n, c in tiny.spec(arch)["components"].items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' own save_pretrained of the tiny pipeline, without weights (one per arch)."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = tiny.save_diffusers(built(arch), tmp_path_factory.mktemp(arch),
                                             weights=False)
        return made[arch]
    return get


def write_folder(folder: Path, arch: str, files: dict, copies: dict,
                 components=None) -> Path:
    """The tiny weights as each class saves them, config.json replaced by ``files``."""
    for name, m in built(arch).components.items():
        if components is None or name in components:
            m.save_pretrained(folder / name, safe_serialization=True)
            (folder / name / "config.json").unlink()
    for rel, blob in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(blob)
    for rel, src in copies.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / rel)
    return folder


def load(folder: Path, **kwargs):
    import diffusers

    return diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True,
                                                       **kwargs)


def config_value(cfg, key):
    # diffusers: a FrozenDict; transformers: a PretrainedConfig
    return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)


def same(a, b) -> bool:
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    return norm(a) == norm(b)


# fields a class reads differently from how it is given: transformers 5's T5Config keeps
# tie_word_embeddings=False as scale_decoder_outputs=False and always ties (a T5 encoder has no
# output head to tie anyway)
CLASS_READS = {"T5EncoderModel": {"tie_word_embeddings": "scale_decoder_outputs"}}


def assert_config_fields(got, config: dict, what: str):
    """Every field ``config`` sets has its value in ``got`` (a class's config object)."""
    reads = CLASS_READS.get(config.get("_class_name"), {})
    for k, v in config.items():
        if k.startswith("_"):
            continue
        k = reads.get(k, k)
        assert same(config_value(got, k), v), f"{what}: {k}"


# --------------------------------------------------------------------------- whole folders


@pytest.mark.parametrize("arch", ALL)
def test_folder_loads_as_the_pipeline(tmp_path, arch):
    a, tm = archs.get(arch), built(arch)
    files, copies, notes = pipeline_files(a, configs_of(arch))
    assert copies == {}
    assert notes == []
    folder = write_folder(tmp_path, arch, files, copies)
    pipe = load(folder)
    assert type(pipe).__name__ == a.pipeline
    for name, cfg in configs_of(arch).items():
        comp = getattr(pipe, name)
        assert type(comp).__name__ == cfg["_class_name"], name
        assert_config_fields(comp.config, cfg, f"{arch} {name}")
        want = tm.components[name].state_dict()
        got = comp.state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    sched = data.load_json(f"configs/{arch}/scheduler.json")
    assert type(pipe.scheduler).__name__ == sched["_class_name"]
    assert_config_fields(pipe.scheduler.config, sched, f"{arch} scheduler")
    for flag, value in a.model_index["flags"].items():
        assert pipe.config[flag] == value
    # the tokenizer folders: transformers' own classes, the ids convkit's tokenizer gives
    from transformers import AutoTokenizer

    for comp, c in a.components.items():
        if c.tokenizer in tokenizers.kinds():
            want = tokenizers.tokenizer(c.tokenizer)(PROMPT).input_ids
            own = AutoTokenizer.from_pretrained(str(folder / tokenizer_folder(comp)),
                                                local_files_only=True)
            assert own(PROMPT).input_ids == want
            loaded = getattr(pipe, tokenizer_folder(comp))
            assert loaded(PROMPT).input_ids == want
            assert loaded.pad_token == tokenizers.tokenizer(c.tokenizer).pad_token


@pytest.mark.parametrize("arch", ALL)
def test_files_are_what_save_pretrained_writes(reference, arch):
    """model_index.json byte for byte (Flux: with the T5 tokenizer from --config-from);
    diffusers configs byte for byte; transformers configs but for dtype, which convkit leaves
    to the weights (transformers 5 loads with dtype="auto")."""
    ref = reference(arch)
    files, _, _ = pipeline_files(archs.get(arch), configs_of(arch),
                                 config_from=ref if arch in FLUX else None)
    assert files["model_index.json"] == (ref / "model_index.json").read_bytes()
    for name, cfg in configs_of(arch).items():
        mine, theirs = files[f"{name}/config.json"], (ref / name / "config.json").read_bytes()
        if library_of(cfg["_class_name"]) == "diffusers":
            assert mine == theirs, name
        else:
            theirs = json.loads(theirs)
            assert theirs.pop("dtype") == "float32"
            assert json.loads(mine) == theirs, name


@pytest.mark.parametrize("arch", ALL)
def test_model_index_is_the_formats_data(arch):
    import diffusers

    a = archs.get(arch)
    files, _, _ = pipeline_files(a, configs_of(arch))
    mi = json.loads(files["model_index.json"])
    assert mi.pop("_class_name") == a.pipeline
    assert mi.pop("_diffusers_version") == diffusers.__version__
    for flag, value in a.model_index["flags"].items():
        assert mi.pop(flag) == value
    for name, cfg in configs_of(arch).items():
        lib = "transformers" if cfg["_class_name"].startswith(("CLIP", "T5")) else "diffusers"
        assert mi.pop(name) == [lib, cfg["_class_name"]]
        if a.components[name].kind == "text_encoder":
            # convkit ships the CLIP and T5 tokenizers (formats/tokenizers/)
            want = ["transformers", "T5Tokenizer" if a.components[name].tokenizer == "t5"
                    else "CLIPTokenizer"]
            assert mi.pop(tokenizer_folder(name)) == want
    sched = data.load_json(f"configs/{arch}/scheduler.json")["_class_name"]
    assert mi.pop("scheduler") == ["diffusers", sched]
    for slot in a.model_index["absent"]:
        assert mi.pop(slot) == NULL
    assert mi == {}
    # the data agrees with the pipeline class and with the tiny pipelines' own arguments
    cls = getattr(diffusers, a.pipeline)
    assert set(a.model_index["absent"]) <= set(cls._optional_components)
    assert a.pipeline_config == a.model_index["flags"] == tiny.spec(arch)["pipeline_extra"]
    assert a.model_index["released"]


# --------------------------------------------------------------------------- Flux's T5 tokenizer


@pytest.mark.parametrize("arch", FLUX)
def test_flux_without_config_from_gets_the_shipped_t5_tokenizer(tmp_path, arch):
    files, copies, notes = pipeline_files(archs.get(arch), configs_of(arch))
    assert json.loads(files["model_index.json"])["tokenizer_2"] == ["transformers", "T5Tokenizer"]
    assert notes == [] and copies == {}
    folder = write_folder(tmp_path, arch, files, copies)
    pipe = load(folder)
    # the released T5 v1.1 vocabulary: "a photo of a cat" is these ids in every Flux folder
    assert pipe.tokenizer_2("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    # (the same ids as black-forest-labs/FLUX.1-dev tokenizer_2 for these and for prompts with
    # <extra_id_N>, accents and runs of spaces: checked against a released folder by hand,
    # docs/layouts.md)


@pytest.mark.parametrize("arch", FLUX)
def test_flux_with_config_from(tmp_path, reference, arch):
    ref = reference(arch)
    files, copies, notes = pipeline_files(archs.get(arch), configs_of(arch), config_from=ref)
    assert notes == []
    copied = {rel for rel in copies if rel.startswith("tokenizer_2/")}
    assert copied == {f"tokenizer_2/{p.name}" for p in (ref / "tokenizer_2").iterdir()}
    assert all(copies[rel] == ref / rel for rel in copies)
    # tokenizers and scheduler come from the folder as they are, not from convkit's data
    assert not any(rel.startswith(("tokenizer", "scheduler")) for rel in files)
    pipe = load(write_folder(tmp_path, arch, files, copies))
    t5 = tiny.make_t5_tokenizer(configs_of(arch)["text_encoder_2"]["vocab_size"])
    assert type(pipe.tokenizer_2).__name__ == \
        json.loads((ref / "model_index.json").read_text())["tokenizer_2"][1]
    assert pipe.tokenizer_2(PROMPT).input_ids == t5(PROMPT).input_ids


# --------------------------------------------------------------------------- partial outputs, flags


def test_unet_only_output(tmp_path):
    arch = "sdxl"
    configs = {"unet": configs_of(arch)["unet"]}
    files, copies, notes = pipeline_files(archs.get(arch), configs)
    mi = json.loads(files["model_index.json"])
    for slot in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        assert mi[slot] == NULL, slot
    assert mi["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert sorted(n.split()[4].rstrip(":") for n in notes) == \
        ["text_encoder", "text_encoder_2", "vae"]
    assert "needs vae=" in next(n for n in notes if "no vae" in n)
    assert not any(rel.startswith(("tokenizer", "text_encoder", "vae")) for rel in files)
    folder = write_folder(tmp_path, arch, files, copies, components=configs)
    pipe = load(folder, vae=built(arch).components["vae"])
    assert pipe.text_encoder is None and pipe.tokenizer_2 is None
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"


def test_config_from_flags_and_scheduler(tmp_path, reference):
    """A fine-tune's own flags and scheduler win over convkit's data; flags the pipeline does
    not take are left out, with a note."""
    src = tmp_path / "src"
    shutil.copytree(reference("sdxl"), src)
    mi = json.loads((src / "model_index.json").read_text())
    mi.update(force_zeros_for_empty_prompt=False, add_watermarker=None, not_a_flag=True)
    (src / "model_index.json").write_text(json.dumps(mi))
    sched = json.loads((src / "scheduler/scheduler_config.json").read_text())
    sched.update(_class_name="DPMSolverMultistepScheduler")
    (src / "scheduler/scheduler_config.json").write_text(json.dumps(sched))

    files, copies, notes = pipeline_files(archs.get("sdxl"), configs_of("sdxl"), config_from=src)
    out = json.loads(files["model_index.json"])
    assert out["force_zeros_for_empty_prompt"] is False
    assert "add_watermarker" in out and "not_a_flag" not in out
    assert out["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert copies["scheduler/scheduler_config.json"] == src / "scheduler/scheduler_config.json"
    assert len(notes) == 1 and "not_a_flag" in notes[0]


def test_bad_arguments(tmp_path):
    a = archs.get("sd15")
    with pytest.raises(UsageError, match="transformer"):
        pipeline_files(a, {"transformer": configs_of("flux_dev")["transformer"]})
    cfg = dict(configs_of("sd15")["unet"])
    del cfg["_class_name"]
    with pytest.raises(UsageError, match="_class_name"):
        pipeline_files(a, {"unet": cfg})
    with pytest.raises(UsageError, match=str(tmp_path)):
        pipeline_files(a, configs_of("sd15"), config_from=tmp_path)
    with pytest.raises(UsageError, match="not UNet2DConditionModel"):
        component_config_json("UNet2DConditionModel", configs_of("sd15")["vae"])


# --------------------------------------------------------------------------- config.json


def _released() -> list[tuple[str, str]]:
    return [(a, p.stem) for a in ALL for p in sorted(data.path(f"configs/{a}").glob("*.json"))
            if p.stem != "scheduler"]


@pytest.mark.parametrize("arch", ALL)
def test_component_config_json_round_trips(tmp_path, arch):
    """Read back by the class (diffusers load_config/from_config, transformers AutoConfig):
    the same config, and the same bytes when written again. The released diffusion models are
    only read back (building them again was a quarter of this file's time)."""
    from transformers import AutoConfig

    configs = {f"tiny {n}": c for n, c in configs_of(arch).items()}
    configs.update({f"released {c}": dict(data.load_json(f"configs/{a}/{c}.json"))
                    for a, c in _released() if a == arch})
    for what, cfg in configs.items():
        name = cfg["_class_name"]
        blob = component_config_json(name, cfg)
        d = tmp_path / what.replace(" ", "_")
        d.mkdir()
        (d / "config.json").write_bytes(blob)
        written = json.loads(blob)
        assert not any(k.startswith("_source") for k in written)
        if library_of(name) == "diffusers":
            from convkit.models import model_class

            cls = model_class(name)
            loaded = cls.load_config(str(d))
            assert loaded["_class_name"] == name and "_diffusers_version" in loaded
            assert_config_fields(loaded, cfg, what)
            if what.startswith("tiny") or name == "AutoencoderKL":
                with torch.device("meta"):
                    again = cls.from_config(loaded)
                assert again.to_json_string().encode() == blob, what
        else:
            loaded = AutoConfig.from_pretrained(str(d), local_files_only=True)
            assert loaded.architectures == [name]
            assert "model_type" in written and "transformers_version" in written
            assert loaded.to_json_string(use_diff=True).encode() == blob, what
            assert_config_fields(loaded, cfg, what)


def test_scheduler_config_drops_convkit_notes():
    files, _, _ = pipeline_files(archs.get("sd15"), configs_of("sd15"))
    sched = json.loads(files["scheduler/scheduler_config.json"])
    assert "_source" in data.load_json("configs/sd15/scheduler.json")
    assert "_source" not in sched
    assert sched["_class_name"] == "PNDMScheduler" and "_diffusers_version" in sched


# --------------------------------------------------------------------------- read_config_from


@pytest.mark.parametrize("arch", ("sdxl_refiner", "flux_dev"))
def test_read_config_from(reference, arch):
    got = read_config_from(reference(arch))
    assert set(got) == set(configs_of(arch))
    for name, cfg in configs_of(arch).items():
        assert got[name]["_class_name"] == cfg["_class_name"]
        reads = CLASS_READS.get(cfg["_class_name"], {})
        assert all(same(got[name][reads.get(k, k)], v) for k, v in cfg.items()), name


def test_read_config_from_refuses_a_non_pipeline_folder(tmp_path, reference):
    with pytest.raises(UsageError, match=f"{tmp_path}.*model_index.json"):
        read_config_from(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(reference("sd15"), bad)
    (bad / "unet" / "config.json").write_text('{"a": 1, "a": 2}')
    with pytest.raises(InputFormatError, match="appears twice"):
        read_config_from(bad)
