"""The image-similarity gate: PSNR and SSIM (torchmetrics), hard fails, the seed floor.

Thresholds are data (``formats/verify/gates.toml``): per artifact kind, chosen from how the
artifact's diffusion model is stored, and each value overridable (``--gate KEY=VALUE``).
"""
from __future__ import annotations

import fnmatch
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .. import data
from ..errors import UnknownNameError, UsageError


def gates_data() -> dict:
    return data.load_toml("verify/gates.toml")


def gate_keys() -> list[str]:
    d = gates_data()
    keys = {"kind"} | set(d["hard"]) | set(d["seed"]) | set(d["differ"])
    for k in d["kinds"].values():
        keys |= set(k)
    return sorted(keys)


@dataclass
class Thresholds:
    kind: str
    values: dict[str, float]

    def __getitem__(self, k: str) -> float:
        return self.values[k]

    def to_dict(self) -> dict:
        return {"kind": self.kind, **self.values}


def parse_overrides(items) -> dict[str, str]:
    """``KEY=VALUE`` strings -> dict; unknown keys get the nearest name."""
    out: dict[str, str] = {}
    keys = gate_keys()
    for it in items or ():
        k, sep, v = str(it).partition("=")
        k = k.strip()
        if not sep or not v.strip():
            raise UsageError(f"cannot read gate setting '{it}' (use KEY=VALUE, e.g. psnr=30)")
        if k not in keys:
            raise UnknownNameError("gate setting", k, tuple(keys))
        if k == "kind":
            kinds = tuple(gates_data()["kinds"])
            if v.strip() not in kinds:
                raise UnknownNameError("gate kind", v.strip(), kinds)
        else:
            try:
                float(v)
            except ValueError:
                raise UsageError(f"gate setting {k} needs a number, not '{v}'") from None
        out[k] = v.strip()
    return out


def kind_for(storage: Counter, reference_dtype: str | None, is_lora: bool = False) -> str:
    """An artifact's kind from its diffusion model's storage labels ({label: tensor count})
    and the reference's float dtype: the loosest kind any of its tensors has; a float
    artifact is ``lossless`` in the reference's own dtype (or fp32), else its dtype's kind."""
    if is_lora:
        return "lora"
    rules = gates_data()["storage"]
    found = set()
    for label in storage:
        for pat, kind in rules.items():
            if fnmatch.fnmatchcase(label, pat):
                found.add(kind)
                break
    for k in ("int4", "int8", "fp8"):
        if k in found:
            return k
    for k in ("bf16", "fp16"):
        if k in found:
            return "lossless" if reference_dtype and FLOAT_KINDS.get(reference_dtype) == k else k
    return "lossless"


FLOAT_KINDS = {"F16": "fp16", "BF16": "bf16", "F32": "lossless"}


def thresholds(kind: str, overrides: dict[str, str]) -> Thresholds:
    d = gates_data()
    kind = overrides.get("kind", kind)
    vals = {**d["hard"], **d["seed"], **d["differ"], **d["kinds"][kind]}
    for k, v in overrides.items():
        if k != "kind":
            vals[k] = float(v)
    return Thresholds(kind, {k: float(v) for k, v in vals.items()})


# -- metrics --------------------------------------------------------------------------------

def _t(img: np.ndarray):
    import torch

    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).double() / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over 8-bit RGB (equal images: inf)."""
    if np.array_equal(a, b):
        return math.inf
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(_t(a), _t(b), data_range=1.0))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) over 8-bit RGB."""
    if np.array_equal(a, b):
        return 1.0
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(_t(a), _t(b), data_range=1.0))


def _stats(img: np.ndarray) -> tuple[float, float]:
    g = img.astype(np.float64).mean(axis=2)
    return float(g.mean()), float(img.astype(np.float64).std(axis=(0, 1)).max())


def hard_fail(img, ref, th: Thresholds, nonfinite: str | None) -> str | None:
    """The hard fail of one image, or None. Flat/black/white only count when the reference
    is not so itself (a prompt may ask for a dark image)."""
    if nonfinite:
        return f"NaN/Inf in the {nonfinite}"
    mean, std = _stats(img)
    rmean, rstd = _stats(ref)
    if std < th["flat_std"] and rstd >= th["flat_std"]:
        return f"flat image (pixel std {std:.2f} < {th['flat_std']:g})"
    if mean < th["black_mean"] and rmean >= th["black_mean"]:
        return f"black image (mean {mean:.1f} < {th['black_mean']:g})"
    if mean > th["white_mean"] and rmean <= th["white_mean"]:
        return f"white image (mean {mean:.1f} > {th['white_mean']:g})"
    return None


@dataclass
class ImageScore:
    prompt: str
    seed: int
    psnr: float
    ssim: float
    seed_distance: float | None = None        # 1 - SSIM between two reference seeds
    lpips: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "psnr": _num(self.psnr),
                "ssim": round(self.ssim, 5), "seed_distance": None if self.seed_distance is None
                else round(self.seed_distance, 5),
                "lpips": None if self.lpips is None else round(self.lpips, 5),
                "ok": self.ok, "failures": self.failures}


def _num(x: float):
    return "inf" if math.isinf(x) else round(x, 3)


def score_image(prompt: str, seed: int, img, ref, ref_other, th: Thresholds,
                nonfinite: str | None, lpips_fn=None) -> ImageScore:
    s = ImageScore(prompt, seed, psnr(img, ref), ssim(img, ref))
    hard = hard_fail(img, ref, th, nonfinite)
    if hard:
        s.failures.append(hard)
    if s.psnr < th["psnr"]:
        s.failures.append(f"PSNR {s.psnr:.2f} dB < {th['psnr']:g}")
    if s.ssim < th["ssim"]:
        s.failures.append(f"SSIM {s.ssim:.4f} < {th['ssim']:g}")
    if ref_other is not None:
        s.seed_distance = 1.0 - ssim(ref, ref_other)
        d = 1.0 - s.ssim
        if s.seed_distance > 0 and d > th["seed_floor"] * s.seed_distance:
            s.failures.append(f"as far from the reference (1-SSIM {d:.3f}) as "
                              f"{d / s.seed_distance:.2f}x another seed's render; the floor is "
                              f"{th['seed_floor']:g}x")
    if lpips_fn is not None:
        s.lpips = float(lpips_fn(img, ref))
        if s.lpips > th["lpips"]:
            s.failures.append(f"LPIPS {s.lpips:.4f} > {th['lpips']:g}")
    return s


def mean_failures(scores: list[ImageScore], th: Thresholds) -> tuple[dict, list[str]]:
    ps = [min(x.psnr, 100.0) for x in scores]   # an equal image counts as 100 dB in a mean
    ss = [x.ssim for x in scores]
    mean = {"psnr": float(np.mean(ps)) if ps else math.nan,
            "ssim": float(np.mean(ss)) if ss else math.nan}
    if any(x.lpips is not None for x in scores):
        mean["lpips"] = float(np.mean([x.lpips for x in scores if x.lpips is not None]))
    out = []
    if mean["psnr"] < th["mean_psnr"]:
        out.append(f"mean PSNR {mean['psnr']:.2f} dB < {th['mean_psnr']:g}")
    if mean["ssim"] < th["mean_ssim"]:
        out.append(f"mean SSIM {mean['ssim']:.4f} < {th['mean_ssim']:g}")
    return mean, out


def differ_failure(images, other, th: Thresholds, other_name: str) -> tuple[float, str | None]:
    """--must-differ-from: the mean PSNR to the other model's renders, and the failure."""
    v = float(np.mean([min(psnr(a, b), 100.0) for a, b in zip(images, other)]))
    if v >= th["differ_psnr"]:
        return v, (f"renders like {other_name} (mean PSNR {v:.2f} dB >= "
                   f"{th['differ_psnr']:g}): the change did not take")
    return v, None

