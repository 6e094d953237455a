"""The Hub side of ``convkit publish``, through the real ``huggingface_hub`` client (it knows
the upload protocol: preupload, LFS batch and transfers, the NDJSON commit)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import ConvkitError
from .result import PublishError, PublishResult, git_blob_sha1
from .card import CardError
from .collect import FileEntry


class NoTokenError(ConvkitError, PermissionError):
    exit_code = 2


def _token() -> str:
    from huggingface_hub import get_token

    tok = get_token()       # HF_TOKEN, else the token `hf auth login` stored under HF_HOME
    if not tok:
        raise NoTokenError("no Hugging Face token", hint="log in with `hf auth login` (or "
                           "`huggingface-cli login`), or set HF_TOKEN to a write token")
    return tok


def _http_status(e: Exception) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _hub_error(what: str, e: Exception) -> PublishError:
    status = _http_status(e)
    # the client's message names the URL and the server's reason; it never holds the token
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return PublishError(f"{what} failed" + (f" (HTTP {status})" if status else "")
                        + f": {reason}")


def _remote_files(api, repo: str, rev: str) -> dict[str, tuple[str | None, str | None, int]]:
    """path -> (lfs sha256, git blob id, size) on the Hub; empty for a new repo or branch."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, \
        RevisionNotFoundError

    try:
        entries = list(api.list_repo_tree(repo, revision=rev, recursive=True))
    except (EntryNotFoundError, RevisionNotFoundError):
        return {}
    except RepositoryNotFoundError as e:
        raise _hub_error(f"listing {repo}", e) from None
    out = {}
    for x in entries:
        if getattr(x, "lfs", None) is not None or hasattr(x, "blob_id"):
            lfs = getattr(x, "lfs", None)
            out[x.path] = (getattr(lfs, "sha256", None) if lfs else None,
                           getattr(x, "blob_id", None), getattr(x, "size", 0))
    return out


def _same(remote, local_sha: str, data_fn, size: int) -> bool:
    if remote is None:
        return False
    lfs_sha, blob, rsize = remote
    if lfs_sha is not None:
        return lfs_sha == local_sha
    return rsize == size and blob == git_blob_sha1(data_fn())


def upload(result: PublishResult, files: list[FileEntry], card: bytes, *, private: bool,
           create_pr: bool, message: str) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=_token())
    repo, rev = result.repo, result.revision
    try:
        user = api.whoami()
    except HfHubHTTPError as e:
        if _http_status(e) == 401:
            raise NoTokenError("the Hub refused the token (401)",
                               hint="log in again with `hf auth login`, or set HF_TOKEN") from None
        raise _hub_error("checking the token", e) from None
    result.notes.append(f"logged in as {user.get('name')}")
    # the card first: nothing is created or uploaded for a card the Hub would reject
    try:
        ModelCard(card.decode("utf-8")).validate(repo_type="model")
    except ValueError as e:
        raise CardError(f"the Hub rejected the card's metadata: {e}") from None
    except HfHubHTTPError as e:
        raise _hub_error("validating the card", e) from None
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        result.notes.append(f"repo {url}")
        if rev != "main":
            api.create_branch(repo, branch=rev, exist_ok=True)
        remote = _remote_files(api, repo, rev)
    except HfHubHTTPError as e:
        raise _hub_error(f"preparing {repo}", e) from None
    adds, by_path = [], {e.path: e for e in files}
    for op in result.operations:
        if op["path"] == "README.md":
            same = _same(remote.get("README.md"), op["sha256"], lambda: card, len(card))
            source = card
        else:
            e = by_path[op["path"]]
            same = _same(remote.get(e.path), e.sha256, lambda p=e.local: Path(p).read_bytes(),
                         e.bytes)
            source = str(e.local)
        op["action"] = "unchanged" if same else ("update" if op["path"] in remote else "add")
        if not same:
            adds.append(CommitOperationAdd(path_in_repo=op["path"], path_or_fileobj=source))
    if not adds:
        result.notes.append("nothing changed since the last publish: no commit")
        return
    try:
        info = api.create_commit(repo, operations=adds, commit_message=message, revision=rev,
                                 create_pr=create_pr, repo_type="model")
    except HfHubHTTPError as e:
        raise PublishError(f"the Hub failed during the commit (HTTP {_http_status(e)}): "
                           "nothing was published", hint="run the same command again; files "
                           "the Hub already has are not sent twice") from None
    result.commit_url, result.commit_oid = info.commit_url, info.oid
    result.pr_url = getattr(info, "pr_url", None)
    result.uploaded_bytes = sum(o["bytes"] for o in result.changed)
    _check_committed(api, result, files, card)


def _check_committed(api, result: PublishResult, files: list[FileEntry], card: bytes) -> None:
    """After the commit, each file as the Hub reports it must be the local file."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        remote = _remote_files(api, result.repo, result.commit_oid or result.revision)
    except HfHubHTTPError as e:
        raise _hub_error("reading back the commit", e) from None
    bad = []
    for e in files:
        if not _same(remote.get(e.path), e.sha256, lambda p=e.local: Path(p).read_bytes(),
                     e.bytes):
            bad.append(e.path)
    if not _same(remote.get("README.md"), hashlib.sha256(card).hexdigest(), lambda: card,
                 len(card)):
        bad.append("README.md")
    if bad:
        raise PublishError(f"after the commit the Hub reports other contents for "
                           f"{', '.join(bad[:5])}" + (f" and {len(bad) - 5} more"
                                                      if len(bad) > 5 else ""),
                           hint=f"see {result.commit_url}")
    result.checked = len(files) + 1
