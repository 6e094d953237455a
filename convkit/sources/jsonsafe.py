"""JSON from input files, parsed defensively.

Headers and small JSON blobs come from files convkit did not write. ``json.loads`` raises
``RecursionError`` on deeply nested arrays (a traceback, not a message) and silently keeps the
last of two equal keys (two parsers may then disagree on what a file holds). :func:`loads`
turns both into ``ValueError`` with a message the caller puts on one line.
"""
from __future__ import annotations

import json

class DuplicateKey(ValueError):
    def __init__(self, key: str):
        self.key = key
        super().__init__(f"the key '{key}' appears twice")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


def loads(raw: str | bytes, what: str = "JSON"):
    """Parse ``raw``; ValueError (one line) on bad JSON, nesting too deep for the parser
    (CPython's scanner raises RecursionError), or an object with the same key twice."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except DuplicateKey as e:
        raise ValueError(f"{what}: {e}") from None
    except RecursionError:
        raise ValueError(f"{what} nests too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON ({e.msg} at byte {e.pos})") from None
