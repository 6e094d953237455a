"""Knowledge is data: every data file comes through one loader (convkit.data), so
CONVKIT_FORMATS_DIR replaces formats/ for architectures, key maps, quantization rules, GGUF
extras, LoRA names and storage metadata alike."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from convkit import data

PROBE = r"""
import json
from convkit import archs
from convkit.quantize.rules import rules_for, gguf_fallback
from convkit.quantize.extras_gguf import rule_for
from convkit.lora.data import keys_data
from convkit.sources.view import plain_metadata
from convkit.keymap._data import load_toml
print(json.dumps({
    "alias": "probe_alias" in archs.get("sdxl").components["unet"].aliases,
    "small": rules_for("sdxl").small_values,
    "fallback": gguf_fallback("Q4_K"),
    "t5_loader": rule_for("t5", "comfy").loader,
    "lora_prefix": "probe_prefix_" in keys_data()["prefix"],
    "storage": "probe.key" not in plain_metadata({"probe.key": "x"}),
    "keymap": load_toml("t5").get("probe", False),
}))
"""


def test_formats_dir_overrides_every_data_file(tmp_path):
    src = data.formats_dir()
    alt = tmp_path / "formats"
    shutil.copytree(src, alt, ignore=shutil.ignore_patterns("__pycache__", "*.py"))

    def edit(rel, old, new):
        p = alt / rel
        text = p.read_text()
        assert old in text, (rel, old)
        p.write_text(text.replace(old, new, 1))

    edit("sdxl.toml", 'aliases = ["unet", "model", "diffusion_model"]',
         'aliases = ["unet", "model", "diffusion_model", "probe_alias"]')
    edit("quant/unet.toml", "small_values = ", "small_values = 7 # was ")
    edit("quant/gguf_mixes.toml", '[fallback]\nQ2_K = "Q5_0"\nQ3_K = "Q5_0"\nQ4_K = "Q5_0"',
         '[fallback]\nQ2_K = "Q5_0"\nQ3_K = "Q5_0"\nQ4_K = "Q8_0"')
    edit("lora/keys.toml", "[prefix]\n", '[prefix]\n"probe_prefix_" = { component = "unet", '
                                         'style = "underscore" }\n')
    edit("storage.toml", "keys = [\n", 'keys = [\n  "probe.key",\n')
    (alt / "keymaps/t5.toml").write_text((alt / "keymaps/t5.toml").read_text() + "\nprobe = true\n")
    gguf_extras = (alt / "extras/gguf.toml").read_text()
    env = {**os.environ, "CONVKIT_FORMATS_DIR": str(alt)}
    got = json.loads(subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                                    capture_output=True, text=True).stdout.strip().splitlines()[-1])
    assert got == {"alias": True, "small": 7, "fallback": "Q8_0",
                   "t5_loader": got["t5_loader"], "lora_prefix": True, "storage": True,
                   "keymap": True}
    assert got["t5_loader"] and got["t5_loader"] in gguf_extras
    # and without the variable, the installed data
    base = json.loads(subprocess.run([sys.executable, "-c", PROBE], check=True,
                                     env={k: v for k, v in os.environ.items()
                                          if k != "CONVKIT_FORMATS_DIR"},
                                     capture_output=True, text=True).stdout.strip().splitlines()[-1])
    assert base["alias"] is False and base["small"] != 7 and base["lora_prefix"] is False
    assert Path(src).is_dir()
