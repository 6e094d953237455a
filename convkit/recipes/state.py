"""A run's record in its output folder: ``convkit-run.json`` (which artifact was built from what,
its content key, files with sizes and sha256, the operation's summary) and the lock that keeps
two runs out of one folder.

The record is rewritten whole (temp file, rename) after each artifact completes, so it never
names an artifact that is not complete on disk: a run killed at any point leaves the previous
record, and the next run rebuilds whatever the record does not vouch for.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from ..errors import OutputError
from ..writer import create_temp

MANIFEST = "convkit-run.json"
LOCK = ".convkit-run.lock"
FORMAT = 1


def load(out: Path) -> dict:
    p = out / MANIFEST
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}       # unreadable: vouches for nothing, every artifact is rebuilt
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else {}


def save(out: Path, doc: dict) -> None:
    p = out / MANIFEST
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    data = (json.dumps({**doc, "format": FORMAT}, indent=1, sort_keys=True) + "\n").encode()
    try:
        fd = create_temp(tmp)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write the run record: {e.strerror}", path=str(p)) from None


def up_to_date(entry: dict | None, key: str, out: Path) -> bool:
    """The record says this artifact was built with ``key`` and its files are as recorded."""
    if not entry or entry.get("key") != key or not entry.get("files"):
        return False
    for f in entry["files"]:
        try:
            st = (out / f["path"]).stat()
        except OSError:
            return False
        if st.st_size != f["bytes"] or st.st_mtime_ns != f["mtime_ns"]:
            return False
    return True


class RunLock:
    """One run per output folder (an flock: released by the kernel if the run is killed)."""

    def __init__(self, out: Path):
        self.path = out / LOCK

    def __enter__(self):
        self.f = open(self.path, "a")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise OutputError("another convkit run is writing to this folder",
                              path=str(self.path.parent),
                              hint="wait for it, or give another -o") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
