"""The convkit error family.

Every error a user can cause is a :class:`ConvkitError`. Each subclass also derives from the
built-in exception that matches it, so library callers can catch ``ValueError`` or ``OSError``
as they would anywhere else. Messages are one line and name the file, the key and the fix.
The CLI turns these into a message and an exit code in one place (``convkit.cli``).
"""
from __future__ import annotations

import difflib
from typing import Iterable, Sequence


class ConvkitError(Exception):
    """Base class of every error convkit reports to a user."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None,
                 hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.key = key
        self.hint = hint
        self.detail = message
        super().__init__(self._compose())

    def _compose(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        if self.key:
            parts.append(f"tensor '{self.key}': ")
        parts.append(self.detail)
        if self.hint:
            parts.append(f" ({self.hint})")
        return "".join(parts)


class InputFormatError(ConvkitError, ValueError):
    """The input file is not what it claims to be (bad header, truncated, bad offsets)."""

    exit_code = 3


class UnsafeFileError(ConvkitError, PermissionError):
    """The input would need unpickling of code to load; convkit refuses."""

    exit_code = 3


class UnknownArchitectureError(ConvkitError, LookupError):
    exit_code = 4


class UnknownNameError(ConvkitError, KeyError):
    """An unknown converter/dtype/component name; suggests the nearest known one."""

    exit_code = 2

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
        hint = f"did you mean '{close[0]}'?" if close else None
        super().__init__(f"unknown {kind} '{name}'; known: {', '.join(known)}", hint=hint)
        self.name = name

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return self._compose()


class UsageError(ConvkitError, ValueError):
    """Arguments that do not fit together (same input and output, bad component list...)."""

    exit_code = 2


class OutputExistsError(ConvkitError, FileExistsError):
    exit_code = 5


class OutputError(ConvkitError, OSError):
    """The output cannot be written (directory missing, read-only...)."""

    exit_code = 5


class DiskSpaceError(OutputError):
    exit_code = 6


class TensorValueError(ConvkitError, ValueError):
    """A tensor holds values the operation cannot take (NaN/Inf, overflow when refused)."""

    exit_code = 7


class Interrupted(ConvkitError, KeyboardInterrupt):
    exit_code = 130


class ErrorGroup(ConvkitError, ValueError):
    """Several problems found up front, reported together."""

    SHOWN_KEYS = 3      # tensors named per kind of problem; the rest are counted

    def __init__(self, errors: Sequence[ConvkitError]):
        self.errors = list(errors)
        # the same problem in many tensors of one file (a scaled-fp8 file without any of its
        # scales) is one part of the line: its first tensors named, the rest counted
        groups: dict[tuple, list[ConvkitError]] = {}
        for e in self.errors:
            same = (type(e), e.path, e.detail, e.hint) if e.key else (id(e),)
            groups.setdefault(same, []).append(e)
        parts = []
        for g in groups.values():
            if len(g) == 1:
                parts.append(str(g[0]))
                continue
            e = g[0]
            keys = ", ".join(f"'{x.key}'" for x in g[:self.SHOWN_KEYS])
            more = f" and {len(g) - self.SHOWN_KEYS} more" if len(g) > self.SHOWN_KEYS else ""
            parts.append((f"{e.path}: " if e.path else "") + f"{len(g)} tensors ({keys}{more}): "
                         + e.detail + (f" ({e.hint})" if e.hint else ""))
        super().__init__(f"{len(self.errors)} problems: " + "; ".join(parts))
        self.exit_code = max(e.exit_code for e in self.errors)


def raise_all(errors: Sequence[ConvkitError]) -> None:
    """Raise nothing, the one error, or an ErrorGroup of all of them."""
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    raise ErrorGroup(errors)
