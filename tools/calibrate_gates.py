"""Calibrate formats/verify/gates.toml on the demo model: what each artifact kind scores, and
what each planted defect scores, against the same reference.

Reference: the demo's Lightning merge (custom + extracted LoRA) in fp32, rendered at its 4-step
settings with the demo prompt set. Artifacts: its fp16 / bf16 conversions, fp8 (plain, scaled),
GGUF Q8_0 / Q6_K / Q5_K / Q4_K / Q3_K and NF4; the planted defects of issue 9's proof. Prints a
markdown table (mean and worst PSNR/SSIM, worst seed-floor ratio, verdict under the current
gates) — the numbers docs/verify.md records.

    python tools/calibrate_gates.py --work /tmp/calibrate
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import safetensors.torch as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convkit.convert import convert  # noqa: E402
from convkit.demo_scenario import LORA_RANK, demo_spec, with_unet, DEMO_DIR  # noqa: E402
from convkit.lora import extract_lora, merge_lora  # noqa: E402
from convkit.quantize import quantize  # noqa: E402
from convkit.verify import verify  # noqa: E402


def planted(src: Path, dst: Path, edit) -> Path:
    sd = st.load_file(str(src))
    edit(sd)
    st.save_file(sd, str(dst))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    spec = demo_spec()
    base = DEMO_DIR / "base.safetensors"
    custom = with_unet(base, DEMO_DIR / "custom_unet.safetensors", w / "custom.safetensors",
                       spec["components"]["unet"])
    light = with_unet(base, DEMO_DIR / "lightning_unet.safetensors", w / "lightning.safetensors",
                      spec["components"]["unet"])
    lora = w / "lora.safetensors"
    extract_lora(light, base, lora, rank=LORA_RANK, overwrite=True)
    ref = w / "ref-fp32.safetensors"
    merge_lora(custom, [f"{lora}:1.0"], ref, dtype="fp32", overwrite=True)
    arts: list[tuple[str, Path, Path | None]] = []
    for dt in ("fp16", "bf16"):
        p = w / f"{dt}.safetensors"
        convert(ref, p, dt, overwrite=True)
        arts.append((dt, p, None))
    fp16 = w / "fp16.safetensors"
    for target in ("fp8-e4m3fn", "fp8-e5m2", "fp8-scaled", "nf4", "gguf:Q8_0", "gguf:Q6_K",
                   "gguf:Q5_K", "gguf:Q4_K", "gguf:Q3_K"):
        name = target.replace(":", "-")
        p = w / (f"{name}.gguf" if target.startswith("gguf") else f"{name}.safetensors")
        quantize(ref, p, target, overwrite=True)
        arts.append((target, p, ref if target.startswith("gguf") else None))

    def zero_xattn(sd):
        for k in sd:
            if "attn2.to_out.0.weight" in k:
                sd[k] = sd[k] * 0

    def nan(sd):
        k = next(k for k in sd if k.startswith("model.diffusion_model.") and "attn1.to_q" in k)
        sd[k] = sd[k].clone()
        sd[k].view(-1)[5] = float("nan")

    def vae(sd):
        sd["first_stage_model.decoder.conv_out.weight"] *= 0

    def noscale(sd):       # scales and the marker gone: a plain fp8 file to every reader
        for k in [k for k in sd if k.endswith((".scale_weight", "scaled_fp8"))]:
            del sd[k]

    arts.append(("defect: zeroed cross-attn out", planted(fp16, w / "d-xattn.safetensors",
                                                          zero_xattn), None))
    arts.append(("defect: NaN in a UNet weight", planted(fp16, w / "d-nan.safetensors", nan),
                 None))
    arts.append(("defect: VAE conv_out zeroed", planted(fp16, w / "d-vae.safetensors", vae),
                 None))
    arts.append(("defect: scaled fp8 without scales",
                 planted(w / "fp8-scaled.safetensors", w / "d-noscale.safetensors", noscale),
                 None))
    minus = w / "d-minus.safetensors"
    merge_lora(custom, [f"{lora}:-1.0"], minus, overwrite=True)
    arts.append(("defect: LoRA at weight -1", minus, None))
    ls = spec["sampling"]["lightning"]
    bs = spec["sampling"]["base"]
    few = dict(steps=ls["steps"], sampler=ls["sampler"], guidance=ls["guidance"])
    many = dict(reference_steps=bs["steps"], reference_sampler=bs["sampler"],
                reference_guidance=bs["guidance"])
    table("Quantized and planted-defect variants against the merge (fp32), both at "
          f"{ls['steps']} steps", [(label, path, ref, b, {}) for label, path, b in arts], few)
    # the lora kind: a 4-step model against its teacher at 25 steps, guidance 5
    table(f"The lora kind: {ls['steps']}-step models against a teacher at {bs['steps']} steps",
          [("base + LoRA vs base (distilled on it)", light, base, None, many),
           ("merge: custom + LoRA vs custom", ref, custom, None, many),
           ("defect: custom without the LoRA vs custom", custom, custom, None, many),
           ("defect: custom + LoRA at -1 vs custom", minus, custom, None, many),
           ("defect: base + LoRA (wrong model) vs custom", light, custom, None, many)],
          few, gate=["kind=lora"])


def table(title: str, rows_in, few: dict, gate: list[str] | None = None) -> None:
    rows = []
    seed_d: list[float] = []
    for label, path, ref, b, ref_kw in rows_in:
        r = verify([path], ref, base=b, prompts="demo", size=demo_spec()["size"], gate=gate or [],
                   **few, **ref_kw)
        a = r.artifacts[0]
        worst_p = min(s.psnr for s in a.scores)
        worst_s = min(s.ssim for s in a.scores)
        floor = max((1 - s.ssim) / s.seed_distance for s in a.scores if s.seed_distance)
        rows.append((label, a.kind, a.mean["psnr"], worst_p, a.mean["ssim"], worst_s, floor,
                     "pass" if a.ok else "FAIL: " + (a.first_failure() or "").split(": ", 2)[-1]))
        seed_d = [s.seed_distance for s in a.scores]
    print(f"\n{title}\nseed distance (1 - SSIM between seed and seed+1 renders of the last "
          f"reference): min {min(seed_d):.3f}, mean {sum(seed_d) / len(seed_d):.3f}")
    print("| artifact | kind | mean PSNR | worst PSNR | mean SSIM | worst SSIM | "
          "worst (1-SSIM)/seed distance | verdict |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, kind, mp, wp, ms, ws, fl, v in rows:
        f = lambda x: "inf" if math.isinf(x) else f"{x:.2f}"  # noqa: E731
        print(f"| {label} | {kind} | {f(mp)} | {f(wp)} | {ms:.4f} | {ws:.4f} | {fl:.3f} | {v} |")

if __name__ == "__main__":
    main()
