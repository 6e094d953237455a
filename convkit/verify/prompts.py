"""Prompt sets: the named sets of ``formats/verify/prompts.toml`` or a file of the user's.

A file is TOML (``[[prompts]]`` tables with ``text`` and optional ``name``/``seed``), JSON (a
list of such objects, or of strings) or plain text (one prompt per line; ``#`` starts a comment
line). A prompt without a seed gets its line number (0, 1, ...), without a name ``p<number>``.
"""
from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .. import data
from ..errors import InputFormatError, UnknownNameError, UsageError

DEFAULT_SET = "sdxl-lightning"
MAX_SEED = 2**63 - 1          # torch.Generator.manual_seed takes a signed 64-bit seed


@dataclass(frozen=True)
class Prompt:
    name: str
    seed: int
    text: str

    def to_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "text": self.text}


def named_sets() -> dict[str, list[Prompt]]:
    d = data.load_toml("verify/prompts.toml")
    return {name: _parse(s["prompts"], f"formats/verify/prompts.toml [sets.{name}]")
            for name, s in d["sets"].items()}


def load_prompts(spec: str | None) -> list[Prompt]:
    """``spec``: a set name (default :data:`DEFAULT_SET`) or a file."""
    spec = spec or DEFAULT_SET
    sets = named_sets()
    if spec in sets:
        return sets[spec]
    path = Path(spec)
    if not path.exists():
        if "/" not in spec and "." not in spec:
            raise UnknownNameError("prompt set", spec, tuple(sets))
        raise UsageError(f"no such prompt file: {spec}",
                         hint=f"give a file or one of the sets: {', '.join(sets)}")
    if not path.is_file():
        raise UsageError("the prompt file is not a file", path=path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFormatError(f"the prompt file is not UTF-8 text (byte {e.start})", path=path,
                               hint="save it as UTF-8") from None
    where = str(path)
    if path.suffix == ".toml":
        try:
            items = tomllib.loads(text).get("prompts", [])
        except tomllib.TOMLDecodeError as e:
            raise InputFormatError(f"not valid TOML: {e}", path=path) from None
    elif path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputFormatError(f"not valid JSON: {e}", path=path) from None
        if isinstance(items, dict):
            items = items.get("prompts", [])
    else:
        items = [ln.strip() for ln in text.splitlines()]
        items = [{"text": t, "seed": i} for i, t in enumerate(items) if t and not t.startswith("#")]
    prompts = _parse(items, where)
    if not prompts:
        raise InputFormatError("the prompt file has no prompts", path=path,
                               hint="one prompt per line, or [[prompts]] tables with text = ...")
    return prompts


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:40] or "prompt"


def _parse(items, where: str) -> list[Prompt]:
    if not isinstance(items, list):
        raise InputFormatError(f"{where}: expected a list of prompts")
    out, names = [], set()
    for i, it in enumerate(items):
        if isinstance(it, str):
            it = {"text": it}
        text = it.get("text") if isinstance(it, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InputFormatError(f"{where}: prompt {i + 1} has no text")
        seed = it.get("seed", i)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InputFormatError(f"{where}: prompt {i + 1} has seed {seed!r}; seeds are "
                                   f"integers 0..{MAX_SEED}")
        name = _slug(str(it.get("name") or f"p{i}"))
        if name in names:
            name = f"{name}-{i}"
        names.add(name)
        out.append(Prompt(name, seed, it["text"].strip()))
    return out
