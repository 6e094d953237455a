"""What an output says about itself: its source's own metadata, and convkit's provenance.

Every output carries its source's ``__metadata__`` (``modelspec.*``, kohya ``ss_*``, the
publisher's keys) minus the keys that describe a storage format it no longer has
(``formats/storage.toml``: a float file made from a GGUF does not say ``gguf:Q8_0``), plus
``convkit.version``, ``convkit.source`` (file name), ``convkit.source_bytes`` and
``convkit.steps`` (a JSON list the source's steps are kept in, with this step appended).

Sampling facts (``convkit.prediction``, ``convkit.sampler``: :mod:`convkit.sampling`) are carried
even by an output that keeps none of its source's other metadata (a LoRA extracted from a 1-step
model is sampled like it); the facts a user states for a command override inherited ones and
are recorded in its step.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path

from . import __version__, sampling
from .sources.view import plain_metadata


#: keys a caller adds to every output made in its context (a recipe run: recipe, artifact and
#: content key, so that a file says which run made it even away from the run's manifest)
_EXTRA: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("convkit_extra", default={})


@contextlib.contextmanager
def extra(keys: dict[str, str]):
    token = _EXTRA.set({**_EXTRA.get(), **keys})
    try:
        yield
    finally:
        _EXTRA.reset(token)


def safe_name(path: str | os.PathLike) -> str:
    """A file name as text that any JSON/UTF-8 writer takes: bytes that are not UTF-8 (names are
    bytes on Linux) are kept visible as ``\\xNN`` instead of crashing the encoder."""
    return os.fsencode(Path(path).name).decode("utf-8", "backslashreplace")


def _steps(previous: dict[str, str]) -> list:
    try:
        steps = json.loads(previous.get("convkit.steps", "[]"))
    except (json.JSONDecodeError, RecursionError):
        return []
    return steps if isinstance(steps, list) else []


def provenance(sources, step: dict, previous: dict[str, str] | None = None) -> dict[str, str]:
    """convkit's keys for an output made from ``sources`` (one source or a list) by ``step``."""
    srcs = sources if isinstance(sources, (list, tuple)) else [sources]
    steps = _steps(previous or {})
    steps.append({**step, "convkit": __version__})
    size = sum(f.stat().st_size for s in srcs for f in s.files() if f.exists())
    return {"convkit.version": __version__,
            "convkit.source": ", ".join(safe_name(s.path) for s in srcs),
            "convkit.source_bytes": str(size),
            "convkit.steps": json.dumps(steps, ensure_ascii=True), **_EXTRA.get()}


def output_metadata(sources, step: dict, *, storage: dict[str, str] | None = None,
                    keep_source: bool = True, facts_from=()) -> dict[str, str]:
    """The metadata of an output: the (first) source's plain metadata, provenance, and the
    output's own storage keys (``storage``: e.g. ``convkit.quantization``). ``facts_from``:
    metadata of further inputs whose sampling facts override the source's (merge-lora: the
    LoRAs'); the facts stated in :func:`convkit.sampling.stated` override all of them."""
    srcs = sources if isinstance(sources, (list, tuple)) else [sources]
    meta = dict(srcs[0].metadata) if srcs else {}
    own = getattr(srcs[0], "plain_metadata", None) if srcs else None
    out = (own() if callable(own) else plain_metadata(meta)) if keep_source else {}
    inherited = sampling.Facts()
    for m in facts_from:
        # only what convkit recorded: a kohya LoRA's modelspec keys describe its training
        inherited = inherited.over(sampling.from_metadata(m, own_only=True))
    if not keep_source:
        inherited = inherited.over(sampling.from_metadata(meta))
    step = dict(step)
    sampling.apply(out, step, inherited=inherited)
    out.update(provenance(srcs, step, meta))
    out.update(storage or {})
    return out
