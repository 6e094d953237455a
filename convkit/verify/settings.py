"""How a smoke render is made: sampler, steps, guidance, size, prediction type.

Presets and each architecture's defaults are data (``formats/verify/render.toml``); a setting
the user does not give comes from there, the size from the model's native size when that is
smaller (the demo model draws at 64 px). A model whose metadata states how it is sampled
(``convkit.sampler``, ``convkit.prediction`` / ``modelspec.prediction_type``:
:mod:`convkit.sampling`, ``formats/sampling.toml``) is rendered that way unless the command
line says otherwise (:func:`for_model`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .. import data, sampling
from ..errors import UnknownNameError, UsageError

# what a file's metadata may say about its prediction type (formats/sampling.toml: convkit's
# own key, then Stability AI's ModelSpec)
PREDICTION_KEYS = tuple(sampling._data()["prediction"]["keys"])
# --prediction: diffusers' prediction_type names and their other spellings; flow = the
# flow-matching models' own (nothing to override)
PREDICTION_NAMES = {**sampling.prediction_spellings(), "flow": None}


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
    return sampling.from_metadata(meta).prediction


def model_facts(ref) -> sampling.Facts:
    """How a verify input (:class:`convkit.verify.models.ModelRef`) says it is sampled: its
    own metadata, over its base's; a LoRA by what convkit recorded in it (a kohya LoRA's
    ``modelspec.prediction_type`` describes its training), over its base's, as its merge
    says (merge-lora)."""
    own = sampling.of_path(ref.path, own_only=ref.is_lora)
    return own.over(sampling.of_path(ref.base)) if ref.base else own


def for_model(s: RenderSettings, facts: sampling.Facts, *, sampler_given: bool
              ) -> RenderSettings:
    """The settings a model renders with: the sampler and prediction type its metadata states
    (``facts``) unless the command line gave them (``--sampler``, ``--prediction`` win)."""
    if facts.sampler and not sampler_given and facts.sampler != s.sampler:
        if facts.sampler not in samplers():
            raise UnknownNameError("sampler", facts.sampler, tuple(samplers()))
        s = replace(s, sampler=facts.sampler)
    return with_prediction(s, facts.prediction)


def with_prediction(s: RenderSettings, pred: str | None) -> RenderSettings:
    return s if not pred or s.prediction else replace(s, prediction=pred)
