"""Benchmark: convkit verify's render path against a plain diffusers pipeline in fp32.

For each model: seconds per image and peak RSS of a 4-step, guidance-0 Euler (trailing) render at
512x512 (the demo model: its native 64x64), each row in a fresh process:

  baseline   diffusers StableDiffusionXLPipeline holding the fp32 weights (convkit.render
             .pipeline_for without stored weights: the same classes, configs and tokenizers)
  convkit    the render path of `convkit verify` (three stages, one family of components
             loaded at a time; layers hold the artifact's stored encoding and decode it as
             they run; load = everything but the images' encode/denoise/decode seconds) for each artifact: fp16, GGUF Q8_0 (UNet; the rest
             from the fp16 file, so its "RSS - file" includes the text encoders and VAE), NF4

Rows are interleaved (baseline, artifacts, baseline again...) and the ratio is against the
baseline measured in the same run (best of --repeat). Inputs: the full-size SDXL fixture
(bench/_common.full_size_checkpoint: real names and shapes, random values; its artifacts are
made once and kept in bench/data) and the demo model.

    python bench/verify.py --model demo --repeat 3
    python bench/verify.py --model sdxl --repeat 1          # ~15 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import DATA, full_size_checkpoint, run_measured  # noqa: E402

RENDER = """
import torch, time
from pathlib import Path
path, base, keep = sys.argv[1], sys.argv[2] or None, sys.argv[3] == '1'
size, n = int(sys.argv[4]), int(sys.argv[5])
text = 'a red circle on a blue background'
t = time.perf_counter()
if keep:      # convkit verify's renderer: three stages, stored weights decoded per layer
    from convkit.verify.models import ModelRef
    from convkit.verify.prompts import Prompt
    from convkit.verify.renderer import _Renderer
    from convkit.verify.settings import RenderSettings
    r = _Renderer(ModelRef(Path(path), Path(base) if base else None),
                  RenderSettings('euler-trailing', 4, 0.0, size, size), Path(sys.argv[6]).parent)
    r.prepare()
    imgs = r.render_all([(Prompt(str(i), i, text), i) for i in range(n)])
    secs = [im.seconds for im in imgs]
    load = time.perf_counter() - t - sum(secs)
else:         # plain diffusers, one pipeline holding every component in fp32
    from convkit.render import pipeline_for
    pipe = pipeline_for(path, base=base, scheduler_class='EulerDiscreteScheduler',
                        scheduler_overrides={'timestep_spacing': 'trailing'})
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t
    secs = []
    for i in range(n):
        t = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt=text, num_inference_steps=4, guidance_scale=0.0, width=size, height=size,
                 generator=torch.Generator().manual_seed(i), output_type='np')
        secs.append(time.perf_counter() - t)
print('LOAD', load, 'PER_IMAGE', min(secs), file=sys.stderr)
open(sys.argv[6], 'w').write(json.dumps({'load': load, 'per_image': min(secs)}))
"""


def artifacts_for(model: str) -> tuple[list[tuple[str, Path, Path | None]], Path, int, int]:
    """[(name, path, base)], the fp32 baseline file, size, images per run."""
    from convkit.convert import convert
    from convkit.quantize import quantize

    if model == "demo":
        from convkit.demo_scenario import DEMO_DIR
        d = DATA / "verify-demo"
        d.mkdir(parents=True, exist_ok=True)
        fp16 = DEMO_DIR / "base.safetensors"
        fp32 = d / "demo-fp32.safetensors"
        size, n = 64, 5
    else:
        fp32 = full_size_checkpoint("sdxl")
        d = DATA
        fp16 = d / "sdxl_full_f16.safetensors"
        size, n = 512, 1
    if not fp32.exists():
        convert(fp16, fp32, "fp32")
    if not fp16.exists():
        convert(fp32, fp16, "fp16")
    out = [("fp16", fp16, None)]
    for target, name in (("gguf:Q8_0", "Q8_0.gguf"), ("nf4", "nf4.safetensors")):
        p = d / f"{fp16.stem}-{name}"
        if not p.exists():
            quantize(fp16, p, target)
        out.append((target, p, fp16 if target.startswith("gguf") else None))
    return out, fp32, size, n


def measure(path: Path, base: Path | None, keep: bool, size: int, n: int) -> dict:
    res = DATA / "verify-row.json"
    r = run_measured(RENDER, str(path), str(base or ""), "1" if keep else "0", str(size), str(n),
                     str(res))
    if "error" in r:
        raise SystemExit(f"{path.name}: {r['error']}\n" + "\n".join(r["stderr_tail"]))
    r.update(json.loads(res.read_text()))
    res.unlink()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["demo", "sdxl"], default="demo")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the rows here too")
    ap.add_argument("--only", action="append", help="only these artifact rows (fp16, gguf:Q8_0, "
                                                    "nf4); the baseline always runs")
    args = ap.parse_args()
    arts, fp32, size, n = artifacts_for(args.model)
    arts = [a for a in arts if not args.only or a[0] in args.only]
    rows: dict[str, list[dict]] = {"baseline fp32": []}
    for _ in range(args.repeat):
        rows["baseline fp32"].append(measure(fp32, None, False, size, n))
        for name, path, base in arts:
            rows.setdefault(name, []).append(measure(path, base, True, size, n))
    base_t = min(r["per_image"] for r in rows["baseline fp32"])
    print(f"{args.model}: {size}x{size}, 4 steps, best of {args.repeat} "
          f"({n} image(s) per run)")
    print("| row | file GB | load s | s / image | x baseline | peak RSS GB | RSS - file GB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    files = {"baseline fp32": fp32, **{nm: p for nm, p, _ in arts}}
    out = {}
    for name, rs in rows.items():
        best = min(rs, key=lambda r: r["per_image"])
        size_gb = files[name].stat().st_size / 1e9
        rss = max(r["peak_rss_mb"] for r in rs) / 1024
        out[name] = {"file_gb": size_gb, "load_s": best["load"], "per_image_s": best["per_image"],
                     "ratio": best["per_image"] / base_t, "peak_rss_gb": rss}
        print(f"| {name} | {size_gb:.2f} | {best['load']:.1f} | {best['per_image']:.2f} | "
              f"{best['per_image'] / base_t:.2f} | {rss:.2f} | {rss - size_gb:+.2f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
