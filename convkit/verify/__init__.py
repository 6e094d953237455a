"""``convkit verify``: prove artifacts by rendering them against a reference.

Reference and artifacts render the same prompts with the same seeds (:mod:`.renderer`: the real
diffusers pipeline, weights through the logical-weights view, layers decoding their stored
weights as they run); every artifact image is scored against the reference's with PSNR and SSIM
and gated by its kind's thresholds (:mod:`.gate`, ``formats/verify/gates.toml``); the reference
is also rendered at a second seed per prompt for the seed floor. :func:`verify` checks every
input before it renders anything and returns a :class:`VerifyResult`; :mod:`.report` writes the
report folder (JSON, PNGs, contact sheet, HTML).
"""
from __future__ import annotations

import math
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__, archs
from ..errors import ConvkitError, ErrorGroup, UsageError
from ..progress import Progress
from ..sources import open_source
from . import gate as gates
from .models import ModelRef, check_renderable, complete, native_size, parse_artifact
from .prompts import Prompt, load_prompts
from .renderer import RenderCache, Run, render_model
from .settings import RenderSettings, for_model, model_facts, settings_for


class GateFailed(ConvkitError, AssertionError):
    """An artifact's renders failed the gate (exit code 10, documented in docs/verify.md)."""

    exit_code = 10


@dataclass
class ArtifactResult:
    ref: ModelRef
    kind: str
    thresholds: gates.Thresholds
    run: Run
    scores: list[gates.ImageScore]
    mean: dict
    failures: list[str] = field(default_factory=list)   # set-level (means, must-differ)
    differ_psnr: float | None = None

    @property
    def ok(self) -> bool:
        return not self.failures and all(s.ok for s in self.scores)

    def first_failure(self) -> str | None:
        for s in self.scores:
            if s.failures:
                return f"{self.ref.name}: prompt '{s.prompt}' (seed {s.seed}): {s.failures[0]}"
        if self.failures:
            return f"{self.ref.name}: {self.failures[0]}"
        return None

    def to_dict(self) -> dict:
        r = self.run
        return {"artifact": str(self.ref.path), "name": self.ref.name,
                "base": str(self.ref.base) if self.ref.base else None,
                "lora_weight": self.ref.lora_weight, "kind": self.kind,
                "thresholds": self.thresholds.to_dict(), "ok": self.ok,
                "failures": self.failures + [f"{s.prompt}: {f}" for s in self.scores
                                             for f in s.failures],
                "mean": {k: (None if math.isnan(v) else round(v, 4)) for k, v in self.mean.items()},
                "must_differ_psnr": self.differ_psnr,
                "images": [s.to_dict() for s in self.scores],
                "render": _run_dict(r)}


def _run_dict(r: Run) -> dict:
    n = sum(1 for i in r.images if not i.cached)
    return {"settings": r.settings.to_dict(), "load_seconds": round(r.load_seconds, 2),
            "rendered": n, "cached": len(r.images) - n,
            "seconds_per_image": round(r.render_seconds / n, 3) if n else None,
            "peak_rss_bytes": r.peak_rss, "stored_weight_bytes": r.stored_bytes}


@dataclass
class VerifyResult:
    reference: Run
    reference_other: Run | None
    prompts: list[Prompt]
    artifacts: list[ArtifactResult]
    differ: Run | None = None
    report_dir: Path | None = None
    contact_sheet: Path | None = None

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.artifacts)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "convkit_version": __version__,
                "reference": {"path": str(self.reference.ref.path),
                              "render": _run_dict(self.reference)},
                "prompts": [p.to_dict() for p in self.prompts],
                "artifacts": [a.to_dict() for a in self.artifacts],
                "must_differ_from": str(self.differ.ref.path) if self.differ else None,
                "report_dir": str(self.report_dir) if self.report_dir else None,
                "contact_sheet": str(self.contact_sheet) if self.contact_sheet else None}

    def failure_message(self) -> str:
        bad = [a for a in self.artifacts if not a.ok]
        first = bad[0].first_failure()
        more = sum(len(a.scores) - sum(s.ok for s in a.scores) for a in bad)
        th = bad[0].thresholds
        return (f"{len(bad)} of {len(self.artifacts)} artifacts failed the gate: {first} "
                f"[{th.kind}: PSNR >= {th['psnr']:g} dB, SSIM >= {th['ssim']:g}]"
                + (f"; {more} failing images in all" if more > 1 else ""))


@dataclass
class VerifyPlan:
    """What ``verify`` would do (``dry_run``): every input checked, nothing rendered."""

    reference: ModelRef
    reference_settings: RenderSettings
    settings: RenderSettings
    prompts: list[Prompt]
    artifacts: list[ModelRef]
    differ: ModelRef | None
    overrides: dict
    report_dir: Path | None
    artifact_settings: dict = field(default_factory=dict)   # ModelRef -> its own settings

    def settings_of(self, m: ModelRef) -> RenderSettings:
        return self.artifact_settings.get(m, self.settings)

    def kinds(self) -> list[tuple[ModelRef, gates.Thresholds]]:
        _, ref_dtype = _storage(self.reference.path)
        out = []
        for m in self.artifacts:
            kind = "lora" if m.is_lora else gates.kind_for(_storage(m.path)[0], ref_dtype)
            out.append((m, gates.thresholds(kind, self.overrides)))
        return out

    def to_dict(self) -> dict:
        renders = len(self.prompts) * (2 + len(self.artifacts) + (1 if self.differ else 0))
        return {"dry_run": True, "reference": str(self.reference.path),
                "reference_settings": self.reference_settings.to_dict(),
                "settings": self.settings.to_dict(),
                "prompts": [p.to_dict() for p in self.prompts],
                "artifacts": [{"artifact": str(m.path), "name": m.name, "kind": th.kind,
                               "base": str(m.base) if m.base else None,
                               "lora_weight": m.lora_weight, "thresholds": th.to_dict(),
                               "settings": self.settings_of(m).to_dict()}
                              for m, th in self.kinds()],
                "must_differ_from": str(self.differ.path) if self.differ else None,
                "renders": renders,
                "report_dir": str(self.report_dir) if self.report_dir else None}

    def format(self) -> str:
        d = self.to_dict()
        lines = [f"reference {d['reference']}: {self.reference_settings.label()} "
                 f"(and at seed + 1 for the seed floor)",
                 f"artifacts: {self.settings.label()}; prompts: "
                 + ", ".join(f"{p.name} ({p.seed})" for p in self.prompts)]
        for (m, _), a in zip(self.kinds(), d["artifacts"]):
            th = a["thresholds"]
            own = self.settings_of(m)
            lines.append(f"  {a['name']}: kind {a['kind']} (PSNR >= {th['psnr']:g} dB, SSIM >= "
                         f"{th['ssim']:g}; means >= {th['mean_psnr']:g} dB, "
                         f"{th['mean_ssim']:g})"
                         + (f"; as its metadata says: {own.label()}" if own != self.settings
                            else ""))
        if self.differ:
            lines.append(f"  must differ from {self.differ.path}")
        lines.append(f"{d['renders']} renders (cached ones are not redone)"
                     + (f"; report in {self.report_dir}" if self.report_dir else ""))
        return "\n".join(lines)


def _storage(path: Path) -> tuple[Counter, str | None]:
    """Storage labels of the diffusion model's tensors, and its dominant float dtype."""
    with open_source(path) as src:
        det = archs.detect(src)
        keys = det.component_keys.get(det.arch.diffusion_component) or list(src.keys())
        labels = Counter(src.decoder(k).label for k in keys)
        floats = Counter(src.info(k).dtype for k in keys if src.info(k).dtype in
                         ("F16", "BF16", "F32"))
    return labels, floats.most_common(1)[0][0] if floats else None


def verify(artifacts, reference, *, base=None, prompts: str | None = None,
           steps: int | None = None, size=None, sampler: str | None = None,
           guidance: float | None = None, prediction: str | None = None,
           reference_steps: int | None = None, reference_sampler: str | None = None,
           reference_guidance: float | None = None, gate=(), must_differ_from=None,
           config_from=None, report_dir=None, device: str = "cpu", cache: bool = True,
           lpips_weights=(), dry_run: bool = False, progress: Progress | None = None
           ) -> VerifyResult | VerifyPlan:
    """Render ``reference`` and every artifact with the same prompts and seeds and gate each
    artifact against the reference. Nothing is rendered until every input has been checked."""
    from .report import ReportWriter

    progress = progress or Progress(enabled=False)
    base = Path(base) if base else None
    config_from = Path(config_from) if config_from else None
    problems: list[Exception] = []

    def attempt(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except ConvkitError as e:
            problems.append(e)
            return None

    if not artifacts:
        raise UsageError("give at least one artifact to verify")
    ref_path = Path(reference)
    if not ref_path.exists():
        raise UsageError(f"no such reference: {ref_path}")
    # --base completes the reference only where it needs completing (the cache key of a
    # complete reference must not depend on it)
    ref_base = None if base is None or attempt(complete, ref_path) else base
    ref = ModelRef(ref_path, ref_base, None, config_from, label="reference")
    ref_arch = attempt(check_renderable, ref, "the reference")
    arts: list[ModelRef] = []
    for a in artifacts:
        m = attempt(parse_artifact, str(a), base, config_from)
        if m is None:
            continue
        arch = attempt(check_renderable, m, "the artifact")
        if arch and ref_arch and arch != ref_arch:
            problems.append(UsageError(f"the artifact is {archs.get(arch).title}, the reference "
                                       f"is {archs.get(ref_arch).title}", path=m.path))
        arts.append(m)
    differ = None
    if must_differ_from:
        differ = ModelRef(Path(must_differ_from), base, None, config_from,
                          label=Path(must_differ_from).name)
        if not differ.path.exists():
            problems.append(UsageError(f"no such file: {differ.path} (--must-differ-from)"))
            differ = None
        else:
            arch = attempt(check_renderable, differ, "--must-differ-from")
            if arch and ref_arch and arch != ref_arch:
                problems.append(UsageError(f"--must-differ-from is {archs.get(arch).title}, the "
                                           f"reference is {archs.get(ref_arch).title}",
                                           path=differ.path))
    overrides = attempt(gates.parse_overrides, gate) or {}
    lpips_fn = None
    if lpips_weights:
        from .lpips import LPIPS
        lpips_fn = attempt(LPIPS.from_files, list(lpips_weights))
    prompt_list = attempt(load_prompts, prompts)
    settings = ref_settings = None
    if ref_arch:
        native = native_size(ref)
        settings = attempt(settings_for, ref_arch, native, sampler=sampler, steps=steps,
                           guidance=guidance, size=size, prediction=prediction, device=device)
        ref_settings = attempt(settings_for, ref_arch, native,
                               sampler=reference_sampler or sampler,
                               steps=reference_steps if reference_steps is not None else steps,
                               guidance=reference_guidance if reference_guidance is not None
                               else guidance, size=size, prediction=prediction, device=device)
    # a model whose metadata says how it is sampled (an LCM merge: lcm; the 1-step Lightning
    # model: prediction type sample) renders that way unless the command line says otherwise
    own: dict[ModelRef, RenderSettings] = {}
    if settings and ref_settings:
        for m in arts + ([differ] if differ else []):
            facts = attempt(model_facts, m)
            if facts is not None:
                own[m] = attempt(for_model, settings, facts, sampler_given=bool(sampler)) \
                    or settings
        facts = attempt(model_facts, ref)
        if facts is not None:
            ref_settings = attempt(for_model, ref_settings, facts,
                                   sampler_given=bool(reference_sampler or sampler)) \
                or ref_settings
    writer = attempt(ReportWriter, report_dir) if report_dir else None
    # names shown in reports must tell artifacts apart
    seen: Counter = Counter()
    for i, m in enumerate(arts):
        seen[m.name] += 1
        if seen[m.name] > 1:
            arts[i] = ModelRef(m.path, m.base, m.lora_weight, m.config_from,
                               label=f"{m.name}#{seen[m.name]}")
            if m in own:
                own[arts[i]] = own[m]
    if problems:
        if writer:
            writer.discard()
        unique = list({str(p): p for p in problems}.values())   # one line per distinct problem
        raise unique[0] if len(unique) == 1 else ErrorGroup(unique)
    assert settings and ref_settings and prompt_list is not None

    if dry_run:
        if writer:
            writer.discard()
        return VerifyPlan(ref, ref_settings, settings, prompt_list, arts, differ, overrides,
                          Path(report_dir) if report_dir else None, own)
    offset = int(gates.gates_data()["seed"]["seed_offset"])
    jobs = [(p, p.seed) for p in prompt_list]
    other_jobs = [(p, (p.seed + offset) % (2**63)) for p in prompt_list]
    rc = RenderCache(enabled=cache)
    total = len(jobs) * (2 + len(arts) + (1 if differ else 0))
    work = Path(tempfile.mkdtemp(prefix="convkit-verify-"))
    try:
        with progress.bar(total, desc="renders", unit="img") as bar:
            ref_run = render_model(ref, ref_settings, jobs, cache=rc, workdir=work, bar=bar)
            other_run = render_model(ref, ref_settings, other_jobs, cache=rc, workdir=work,
                                     bar=bar)
            differ_run = (render_model(differ, own.get(differ, settings), jobs, cache=rc,
                                       workdir=work, bar=bar) if differ else None)
            runs = [render_model(m, own.get(m, settings), jobs, cache=rc, workdir=work, bar=bar)
                    for m in arts]
    except BaseException:
        if writer:
            writer.discard()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for img in ref_run.images:
        if img.nonfinite:
            raise UsageError(f"the reference itself has NaN/Inf in the {img.nonfinite} for "
                             f"prompt '{img.prompt.name}': nothing to compare against",
                             path=ref_path)
    _, ref_dtype = _storage(ref_path)
    results = []
    for m, run in zip(arts, runs):
        kind = "lora" if m.is_lora else gates.kind_for(_storage(m.path)[0], ref_dtype)
        th = gates.thresholds(kind, overrides)
        scores = [gates.score_image(img.prompt.name, img.seed, img.pixels, r.pixels, o.pixels,
                                    th, img.nonfinite, lpips_fn)
                  for img, r, o in zip(run.images, ref_run.images, other_run.images)]
        mean, fails = gates.mean_failures(scores, th)
        res = ArtifactResult(m, th.kind, th, run, scores, mean, fails)
        if differ_run is not None:
            v, f = gates.differ_failure([i.pixels for i in run.images],
                                        [i.pixels for i in differ_run.images], th,
                                        differ.name)
            res.differ_psnr = round(v, 3)
            if f:
                res.failures.append(f)
        results.append(res)
    result = VerifyResult(ref_run, other_run, prompt_list, results, differ_run)
    if writer:
        writer.write(result)
    return result


__all__ = ["verify", "VerifyResult", "VerifyPlan", "ArtifactResult", "GateFailed",
           "RenderSettings"]
