"""What a publish did (or, with --dry-run, would do), and how it fails."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..errors import ConvkitError


class PublishError(ConvkitError, RuntimeError):
    """The Hub refused or failed (exit 11); nothing half-published: a commit is atomic."""

    exit_code = 11


class GatesFailedError(ConvkitError, RuntimeError):
    exit_code = 10


@dataclass
class PublishResult:
    repo: str
    revision: str
    card: str
    metadata: dict
    operations: list[dict]          # {"path", "bytes", "sha256", "action": add|unchanged}
    dry_run: bool
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    uploaded_bytes: int = 0
    checked: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> list[dict]:
        return [o for o in self.operations if o["action"] != "unchanged"]

    def to_dict(self) -> dict:
        return {"repo": self.repo, "revision": self.revision, "dry_run": self.dry_run,
                "metadata": self.metadata, "operations": self.operations,
                "commit_url": self.commit_url, "commit_oid": self.commit_oid,
                "pr_url": self.pr_url, "uploaded_bytes": self.uploaded_bytes,
                "verified_files": self.checked, "notes": self.notes,
                **({"card": self.card} if self.dry_run else {})}


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the Hub's tree, for files not in LFS) gives a file's bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
