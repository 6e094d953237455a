"""How a smoke render is made: sampler, steps, guidance, size, prediction type.

Presets and each architecture's defaults are data (``formats/verify/render.toml``); a setting
the user does not give comes from there, the size from the model's native size when that is
smaller (the demo model draws at 64 px).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .. import data
from ..errors import UnknownNameError, UsageError

# what a file's metadata may say about its prediction type -> diffusers' prediction_type
# (modelspec.prediction_type: Stability AI's ModelSpec; convkit.prediction: convkit's own)
PREDICTION_KEYS = ("convkit.prediction", "modelspec.prediction_type")
PREDICTION_NAMES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction",
                    "v_prediction": "v_prediction", "sample": "sample", "x0": "sample",
                    "flow": None}


def render_data() -> dict:
    return data.load_toml("verify/render.toml")


def samplers() -> dict[str, dict]:
    return render_data()["samplers"]


@dataclass(frozen=True)
class RenderSettings:
    sampler: str
    steps: int
    guidance: float
    width: int
    height: int
    prediction: str | None = None       # diffusers prediction_type override
    device: str = "cpu"

    @property
    def scheduler_class(self) -> str:
        return samplers()[self.sampler]["class"]

    @property
    def scheduler_overrides(self) -> dict:
        o = dict(samplers()[self.sampler].get("overrides", {}))
        if self.prediction:
            o["prediction_type"] = self.prediction
        return o

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return (f"{self.sampler}, {self.steps} steps, guidance {self.guidance:g}, "
                f"{self.width}x{self.height}" + (f", {self.prediction}" if self.prediction
                                                 else ""))


def parse_size(text) -> tuple[int, int]:
    if isinstance(text, int):
        return text, text
    t = str(text).lower().replace(" ", "")
    try:
        w, _, h = t.partition("x")
        return int(w), int(h or w)
    except ValueError:
        raise UsageError(f"cannot read size '{text}' (e.g. 512 or 768x512)") from None


def settings_for(arch: str, native_size: int | None, *, sampler=None, steps=None,
                 guidance=None, size=None, prediction=None, device="cpu") -> RenderSettings:
    d = render_data()
    a = d["archs"].get(arch)
    if a is None:
        raise UsageError(f"no render defaults for {arch} in formats/verify/render.toml")
    sampler = sampler or a["sampler"]
    if sampler not in d["samplers"]:
        raise UnknownNameError("sampler", sampler, tuple(d["samplers"]))
    if size is None:
        s = a["size"] if not native_size else min(a["size"], native_size)
        w = h = s
    else:
        w, h = parse_size(size)
    m = a["size_multiple"]
    if w <= 0 or h <= 0 or w % m or h % m:
        raise UsageError(f"size {w}x{h} is not a multiple of {m} ({arch} renders in "
                         f"{m}-pixel units)", hint=f"e.g. --size {max(m, (w // m) * m)}")
    steps = a["steps"] if steps is None else int(steps)
    if steps < 1:
        raise UsageError(f"--steps must be at least 1 (got {steps})")
    if prediction is not None and prediction not in PREDICTION_NAMES:
        raise UnknownNameError("prediction type", prediction, tuple(PREDICTION_NAMES))
    pred = PREDICTION_NAMES.get(prediction) if prediction else None
    return RenderSettings(sampler, steps, float(a["guidance"] if guidance is None else guidance),
                          w, h, pred, device)


def prediction_from_metadata(meta: dict[str, str]) -> str | None:
    for k in PREDICTION_KEYS:
        v = meta.get(k)
        if v and v.lower() in PREDICTION_NAMES:
            return PREDICTION_NAMES[v.lower()]
    return None


def with_prediction(s: RenderSettings, pred: str | None) -> RenderSettings:
    return s if not pred or s.prediction else replace(s, prediction=pred)
