"""``convkit publish``: one release folder -> one commit on the Hugging Face Hub, with a card.

The card's YAML is checked locally and by the Hub (``validate-yaml``) before anything is
uploaded; only files whose sha256 differs from the Hub's copy are sent, all in one commit (so a
second publish of the same folder makes no commit); after the commit every file's sha256 as the
Hub reports it is compared with the local one. The token comes from ``HF_TOKEN`` or the
huggingface_hub login and is handed to the client only: never printed, logged or written.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from . import card as cards
from .collect import FileEntry, Release, collect
from .result import GatesFailedError, PublishError, PublishResult, git_blob_sha1


def prepare(folder, repo: str, *, license=None, license_name=None, license_link=None,
            base_model=(), relation=None, title=None, allow_failed=False):
    """Everything checked and the card made, with no network."""
    cards.check_repo_id(repo)
    release = collect(folder)
    if release.failed_gates and not allow_failed:
        raise GatesFailedError("the run's verify failed for "
                               + ", ".join(release.failed_gates),
                               path=str(folder), hint="fix and run the recipe again, or "
                               "--allow-failed to publish anyway (the card says FAIL)")
    lic = cards.choose_licence(release, license, license_name, license_link)
    bases = cards.base_models(release, tuple(base_model))
    rel = cards.relation(release, relation) if bases else None
    meta = cards.metadata(release, lic, bases, rel)
    name = title or release.record.get("recipe", {}).get("name") or Path(folder).name
    text = cards.render(release, meta, f"{repo.split('/')[1]} ({name})"
                        if name != repo.split("/")[1] else name)
    return release, meta, text


def publish(folder, repo: str, *, revision: str | None = None, private: bool = False,
            create_pr: bool = False, dry_run: bool = False, license=None, license_name=None,
            license_link=None, base_model=(), relation=None, message: str | None = None,
            allow_failed: bool = False) -> PublishResult:
    release, meta, text = prepare(folder, repo, license=license, license_name=license_name,
                                  license_link=license_link, base_model=base_model,
                                  relation=relation, allow_failed=allow_failed)
    card_bytes = text.encode("utf-8")
    ops = [{"path": e.path, "bytes": e.bytes, "sha256": e.sha256, "action": "add"}
           for e in release.files]
    ops.append({"path": "README.md", "bytes": len(card_bytes),
                "sha256": hashlib.sha256(card_bytes).hexdigest(), "action": "add"})
    rev = revision or "main"
    result = PublishResult(repo, rev, text, meta, ops, dry_run)
    if dry_run:
        return result
    from .hub import upload

    upload(result, release.files, card_bytes, private=private, create_pr=create_pr,
           message=message or f"convkit: {len(release.weights)} files"
           + (f" ({release.record['recipe']['name']})" if release.record.get("recipe") else ""))
    return result


__all__ = ["publish", "prepare", "PublishResult", "PublishError", "GatesFailedError",
           "FileEntry", "Release", "collect", "git_blob_sha1"]
