"""Benchmark: what `convkit run` costs over calling the operations directly, on full size.

A release recipe on the full-size random SDXL fp16 (6.9 GB) and a rank-64 LoRA: merge-lora
(fp16 out), then quantize the merge to GGUF Q8_0 and to NF4. Measured in the same run, warm
page cache, each variant in its own process, best of --repeat:

  direct   the three library calls one after another (what a script would do)
  run -j1  `convkit run` of the recipe (adds: input identities, the record, sha256 of each output)
  run -j2  the same with --jobs 2 (the two quantizations at once, in worker processes)
  rerun    `convkit run` again with nothing changed (the record vouches for everything)

    python bench/recipes.py [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, full_size_checkpoint, report, run_measured  # noqa: E402

RECIPE = """
[recipe]
name = "bench"
[inputs.model]
path = "{base}"
[inputs.lora]
path = "{lora}"
[artifacts.merged]
op = "merge-lora"
base = "@model"
loras = ["@lora:1.0"]
dtype = "fp16"
path = "merged.safetensors"
[artifacts.q8]
op = "quantize"
input = "@merged"
to = "gguf:Q8_0"
path = "merged-Q8_0.gguf"
[artifacts.nf4]
op = "quantize"
input = "@merged"
to = "nf4"
path = "merged-nf4.safetensors"
"""

DIRECT = """
import sys
from convkit.runtime import prefer_io_friendly_threads
prefer_io_friendly_threads()
from pathlib import Path
from convkit.lora import merge_lora
from convkit.quantize import quantize
out = Path(sys.argv[3]); out.mkdir(parents=True, exist_ok=True)
merge_lora(sys.argv[1], [sys.argv[2] + ':1.0'], out / 'merged.safetensors', dtype='fp16',
           overwrite=True)
quantize(out / 'merged.safetensors', out / 'merged-Q8_0.gguf', 'gguf:Q8_0', overwrite=True)
quantize(out / 'merged.safetensors', out / 'merged-nf4.safetensors', 'nf4', overwrite=True)
"""

RUN = """
import sys
from convkit.runtime import prefer_io_friendly_threads
prefer_io_friendly_threads()
from convkit.recipes import load, run
r = run(load(sys.argv[1]), sys.argv[2], jobs=int(sys.argv[3]))
assert r.ok, r.failure_message()
print('BUILT', sum(x.status == 'built' for x in r.rows))
"""


def lora_file() -> Path:
    p = DATA / "sdxl_lora_r64.safetensors"
    if not p.exists():
        sys.exit(f"{p} is missing: python bench/lora.py makes it")
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    base = full_size_checkpoint("sdxl", "F16")
    lora = lora_file()
    work = DATA / "recipes-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    recipe = work / "bench.toml"
    recipe.write_text(RECIPE.format(base=base, lora=lora))
    runs: dict[str, list[dict]] = {"direct": [], "run -j1": [], "run -j2": [], "rerun": []}
    for i in range(a.repeat):
        for name in ("direct", "run -j1", "run -j2"):
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            r = (run_measured(DIRECT, str(base), str(lora), str(out)) if name == "direct" else
                 run_measured(RUN, str(recipe), str(out), name[-1]))
            r.setdefault("seconds", time.perf_counter() - t0)
            runs[name].append(r)
            print(name, json.dumps(r), file=sys.stderr)
            if name == "run -j1":       # nothing changed: the record vouches for all three
                runs["rerun"].append(run_measured(RUN, str(recipe), str(out), "1"))
        shutil.rmtree(work / "out", ignore_errors=True)
    best = {k: min(v, key=lambda r: r.get("seconds", 1e9)) for k, v in runs.items()}
    print(report(list(best.items()), "direct"))
    (DATA / f"recipes-{time.strftime('%Y-%m-%d')}.json").write_text(json.dumps(runs, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
