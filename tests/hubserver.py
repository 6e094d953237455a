"""A local stand-in for the Hugging Face Hub's HTTP API, for tests that publish with the real client.

`HubServer` speaks enough of the Hub protocol for `huggingface_hub` (2.x, with `HF_HUB_DISABLE_XET=1`) to
create repos, validate model cards, upload through the legacy LFS path, commit, list, inspect and download:

    with HubServer(tokens={"hf_secret": "alice"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret", "HF_HUB_DISABLE_XET": "1", ...}
        ...run the client in a subprocess...
        assert hub.files("alice/model")["README.md"].startswith(b"---")

Everything lives in memory: repos -> refs -> commits -> full file snapshots, plus an LFS object store keyed
by sha256. Like the real Hub, a new repo starts with an "initial commit" holding a `.gitattributes`, so
`files()` and tree listings include that file.

Endpoints (repo types model/dataset/space; model URLs carry no type prefix, the others `datasets/`, `spaces/`):

    GET  /api/agent-harnesses                    (fetched by the client itself to build its user-agent)
    GET  /api/whoami-v2
    POST /api/repos/create
    POST /api/validate-yaml
    GET  /api/{type}s/{repo}                     GET /api/{type}s/{repo}/revision/{rev}
    POST /api/{type}s/{repo}/preupload/{rev}     POST /api/{type}s/{repo}/commit/{rev}   (NDJSON)
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}] POST /api/{type}s/{repo}/paths-info/{rev}
    GET  /api/{type}s/{repo}/refs                GET /api/{type}s/{repo}/commits/{rev}
    POST /[{type}s/]{repo}.git/info/lfs/objects/batch   and   .../objects/verify
    PUT  /_lfs/upload/{ticket}                   (the "presigned" URL the batch answer hands out)
    GET|HEAD /[{type}s/]{repo}/resolve/{rev}/{path}

Test hooks: `fail_next()`, `requests` / `count()` / `log_text()` (Authorization values redacted),
`seen_tokens`, `server_errors`, `commits()`, `files()`, `lfs_paths()`, `refs()`, `create_repo()`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Licence identifiers accepted in a card's `license:` field (https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset({
    "apache-2.0", "mit", "openrail", "openrail++", "bigscience-openrail-m", "creativeml-openrail-m",
    "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd",
    "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5",
    "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0",
    "cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0",
    "cc-by-nc-sa-4.0", "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0",
    "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0",
    "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "lppl-1.3c", "ms-pl", "mpl-2.0", "odc-by", "odbl",
    "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr",
    "deepfloyd-if-license", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma",
    "apple-ascl", "apple-amlr", "unknown", "other",
})

# Task ids accepted in `pipeline_tag:` (a subset of the Hub's task list, wide enough for diffusion and LLM cards).
PIPELINE_TAGS = frozenset({
    "text-to-image", "image-to-image", "image-to-text", "image-to-video", "text-to-video", "video-to-video",
    "unconditional-image-generation", "image-text-to-text", "visual-question-answering", "image-classification",
    "image-segmentation", "object-detection", "depth-estimation", "mask-generation", "image-feature-extraction",
    "zero-shot-image-classification", "text-to-3d", "image-to-3d", "text-generation", "text2text-generation",
    "text-classification", "token-classification", "fill-mask", "question-answering", "summarization",
    "translation", "feature-extraction", "sentence-similarity", "zero-shot-classification", "text-to-speech",
    "text-to-audio", "automatic-speech-recognition", "audio-classification", "audio-to-audio", "any-to-any",
    "video-classification", "reinforcement-learning", "robotics", "tabular-classification",
    "tabular-regression", "other",
})

BASE_MODEL_RELATIONS = frozenset({"adapter", "merge", "quantized", "finetune"})

# The Hub refuses plain git blobs from 10 MiB on; such files must go through LFS.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

# Patterns of the `.gitattributes` written by the initial commit, as on the Hub (plus gguf and images, which
# are binary and would go to LFS on the Hub anyway): preupload answers "lfs" for paths matching them.
DEFAULT_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
    "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
    "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*", "*.png", "*.jpg", "*.jpeg", "*.webp",
)
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in DEFAULT_LFS_PATTERNS)

# Endpoint names used by fail_next(), count() and RequestRecord.endpoint.
ENDPOINTS = frozenset({
    "agent-harnesses", "whoami", "create-repo", "validate-yaml", "repo-info", "preupload", "lfs-batch",
    "lfs-upload", "lfs-verify", "commit", "tree", "paths-info", "refs", "commits", "resolve",
})

_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_NAME = re.compile(r"^\w(?:[\w.-]{0,94}\w)?$", re.ASCII)
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{7,40}$")
# Card metadata: a `---` line, the YAML, then the next line that is exactly `---`.
_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(?P<yaml>.*?)^---[ \t]*\r?$", re.DOTALL | re.MULTILINE)
# The client matches this exact message to tell a bad token from a hidden repo.
_BAD_TOKEN_MESSAGE = "Invalid credentials in Authorization header"


# ---------------------------------------------------------------------------------------------- helpers


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as `oid` for regular files."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git stores in place of an LFS object (its blob sha1 is the file's git `oid`)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(dt: datetime) -> str:
    # The client's parse_datetime expects the Hub's exact shape: milliseconds and a literal Z.
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _now() -> datetime:
    return datetime.now(UTC)


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def parse_card_metadata(content: str) -> Any:
    """The parsed YAML front matter of a card, or None without one. Raises yaml.YAMLError if malformed."""
    m = _FRONT_MATTER.match(content)
    return yaml.safe_load(m["yaml"]) if m else None


def validate_card(content: str, repo_type: str = "model") -> tuple[list[str], list[str]]:
    """(errors, warnings) for a card, with a plausible subset of the Hub's /api/validate-yaml checks."""
    empty_warning = "Empty or missing yaml metadata in repo card"
    try:
        meta = parse_card_metadata(content)
    except yaml.YAMLError as e:
        return [f"Invalid YAML in the card metadata: {e}"], []
    if meta is None:
        return [], [empty_warning]
    if not isinstance(meta, dict):
        return [f"The card metadata must be a YAML mapping, not {type(meta).__name__}"], []

    errors: list[str] = []
    lic = meta.get("license")
    if "license" in meta and (not isinstance(lic, str) or lic not in HUB_LICENSES):
        errors.append(f'"license" must be one of the Hub licence identifiers '
                      f'(https://huggingface.co/docs/hub/repositories-licenses), got {lic!r}')
    for key in ("license_name", "license_link"):
        if key in meta:
            if lic != "other":
                errors.append(f'"{key}" is only allowed when "license" is "other"')
            elif not isinstance(meta[key], str):
                errors.append(f'"{key}" must be a string')
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        errors.append('"tags" must be a list of strings')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')

    if repo_type == "model":
        base = meta.get("base_model")
        if "base_model" in meta:
            ids = [base] if isinstance(base, str) else base
            if not (isinstance(ids, list) and ids and all(isinstance(b, str) and _MODEL_ID.match(b) for b in ids)):
                errors.append(f'"base_model" must be a model id "owner/name" or a list of them, got {base!r}')
        if "base_model_relation" in meta:
            rel = meta["base_model_relation"]
            if not isinstance(rel, str) or rel not in BASE_MODEL_RELATIONS:
                errors.append(f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}, got {rel!r}')
            if "base_model" not in meta:
                errors.append('"base_model_relation" requires "base_model"')
        tag = meta.get("pipeline_tag")
        if "pipeline_tag" in meta and (not isinstance(tag, str) or tag not in PIPELINE_TAGS):
            errors.append(f'"pipeline_tag" must be a known task id, got {tag!r}')
    return errors, []


def _lfs_patterns(gitattributes: bytes | None) -> list[str]:
    if gitattributes is None:
        return list(DEFAULT_LFS_PATTERNS)
    patterns = []
    for line in gitattributes.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if parts and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _matches_any(path: str, patterns: list[str]) -> bool:
    # gitattributes semantics, roughly: a pattern without a slash matches the basename anywhere.
    base = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in p else base, p) for p in patterns)


# ---------------------------------------------------------------------------------------------- state


class StoredFile:
    """One file of a commit snapshot; LFS files keep their bytes too (shared with the object store)."""

    __slots__ = ("blob_oid", "data", "lfs", "pointer_size", "sha256")

    def __init__(self, data: bytes, lfs: bool):
        self.data = data
        self.lfs = lfs
        self.sha256 = hashlib.sha256(data).hexdigest()
        pointer = lfs_pointer(self.sha256, len(data)) if lfs else None
        self.blob_oid = git_blob_sha1(pointer if lfs else data)
        self.pointer_size = len(pointer) if lfs else 0

    @property
    def size(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"StoredFile(size={self.size}, lfs={self.lfs}, oid={self.blob_oid[:10]})"


@dataclass
class CommitRecord:
    """A commit as the server stores it: `files` is the full snapshot after the commit."""

    oid: str
    parent: str | None
    ref: str  # the branch or refs/pr/N it was made on
    summary: str
    description: str
    author: str
    date: datetime
    files: dict[str, StoredFile]
    added: tuple[str, ...]  # paths new or with new content
    deleted: tuple[str, ...]

    @property
    def changed(self) -> list[str]:
        return sorted({*self.added, *self.deleted})


@dataclass
class RequestRecord:
    """One request as received; `headers` has Authorization values redacted."""

    method: str
    path: str
    endpoint: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None
    injected: bool = False  # failed on purpose by fail_next()


@dataclass
class _Repo:
    type: str
    id: str
    private: bool
    created: datetime
    refs: dict[str, str] = field(default_factory=dict)  # "main" / "refs/pr/1" -> commit oid
    commits: dict[str, CommitRecord] = field(default_factory=dict)  # insertion order = creation order
    lfs_oids: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo
    next_discussion: int = 1

    @property
    def namespace(self) -> str:
        return self.id.split("/")[0]


@dataclass
class _Identity:
    name: str
    role: str  # "write" or "read"


class HubError(Exception):
    """An error answer: JSON {"error": message}, with the Hub's X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200, content_type: str = "application/json") -> _Response:
        body = json.dumps(obj, default=str).encode()
        return cls(status, body, {"Content-Type": f"{content_type}; charset=utf-8"})


def _not_found_repo(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


# ---------------------------------------------------------------------------------------------- server


class HubServer:
    """In-memory Hub on 127.0.0.1 (OS-chosen port), served from a daemon thread.

    tokens: token -> user name, or token -> (user name, "write" | "read").
    orgs:   org name -> member user names (members may create and write repos in the org).
    """

    def __init__(self, tokens: dict[str, str | tuple[str, str]], orgs: dict[str, list[str]] | None = None):
        self._tokens = {t: _Identity(*((v, "write") if isinstance(v, str) else v)) for t, v in tokens.items()}
        self._orgs = {org: set(members) for org, members in (orgs or {}).items()}
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lfs: dict[str, bytes] = {}  # sha256 -> content
        self._upload_tickets: dict[str, tuple[tuple[str, str], str, int]] = {}  # ticket -> (repo key, oid, size)
        self._failures: dict[str, list[int]] = {}
        self._seq = 0  # feeds commit ids: deterministic for a given sequence of operations
        self._started = _now()
        self.requests: list[RequestRecord] = []
        self.seen_tokens: set[str] = set()
        self.server_errors: list[str] = []  # tracebacks of handler crashes (answered with 500)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> Self:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        # Do not wait on shutdown for handler threads parked on idle keep-alive connections.
        self._httpd.block_on_close = False
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- test hooks

    def fail_next(self, endpoint: str, times: int = 1, status: int = 500) -> None:
        """Answer the next `times` requests to `endpoint` with `status`, before doing anything else.

        Note that the client retries 408/429/5xx on preupload, lfs-batch, lfs-upload and lfs-verify (after 1 s,
        2 s, 4 s...), but not on commit, create-repo or whoami.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {sorted(ENDPOINTS)}")
        with self._lock:
            self._failures.setdefault(endpoint, []).extend([status] * times)

    def count(self, endpoint: str, *, ok: bool | None = None) -> int:
        """Requests received on `endpoint` (only successful ones with ok=True, failed ones with ok=False)."""
        with self._lock:
            return sum(1 for r in self.requests if r.endpoint == endpoint
                       and (ok is None or ok == (r.status is not None and r.status < 400)))

    def log_text(self) -> str:
        """Every request line, headers (Authorization redacted) and body as text; binary bodies summarised."""
        out = []
        with self._lock:
            records = list(self.requests)
        for r in records:
            out.append(f"{r.method} {r.path} [{r.endpoint}] -> {r.status}{' (injected)' if r.injected else ''}")
            out.extend(f"  {k}: {v}" for k, v in r.headers.items())
            if r.body:
                try:
                    text = r.body.decode()
                except UnicodeDecodeError:
                    text = f"<{len(r.body)} bytes>"
                out.append("  " + (text if len(text) <= 4000 else text[:4000] + f"... <{len(text)} chars>"))
        return "\n".join(out)

    def commits(self, repo_id: str, rev: str | None = None, repo_type: str = "model") -> list[CommitRecord]:
        """All commits of a repo in creation order, or the first-parent history of `rev` (oldest first)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            if rev is None:
                return list(repo.commits.values())
            return list(reversed(self._history(repo, self._resolve(repo, rev))))

    def files(self, repo_id: str, rev: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """{path: content} at `rev` (LFS files resolved to their content)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return {p: f.data for p, f in self._resolve(repo, rev).files.items()}

    def lfs_paths(self, repo_id: str, rev: str = "main", repo_type: str = "model") -> set[str]:
        """Paths stored through LFS at `rev`."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return {p for p, f in self._resolve(repo, rev).files.items() if f.lfs}

    def refs(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        """{"main": oid, "refs/pr/1": oid, ...}"""
        with self._lock:
            return dict(self._get_repo(repo_type, repo_id).refs)

    def create_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model",
                    files: dict[str, bytes] | None = None) -> None:
        """Seed a repo directly: its initial commit, then a commit "seed" with `files` if given.

        Files go to LFS by the same rules as uploads, and their objects count as uploaded to the repo.
        """
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            owner = repo_id.split("/")[0]
            repo = self._new_repo(repo_type, repo_id, private, owner)
            if files:
                initial = repo.commits[repo.refs["main"]]
                patterns = self._patterns_at(initial)
                snapshot = dict(initial.files)
                for path, data in files.items():
                    stored = StoredFile(data, self._needs_lfs(patterns, path, len(data), data[:512]))
                    if stored.lfs:
                        self._lfs[stored.sha256] = data
                        repo.lfs_oids.add(stored.sha256)
                    snapshot[path] = stored
                self._record_commit(repo, "main", initial.oid, snapshot, "seed", "", owner)

    # -- state helpers (called with the lock held)

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return repo

    def _resolve(self, repo: _Repo, rev: str) -> CommitRecord:
        """A branch, refs/heads/<branch>, refs/pr/N or a (7+ char) commit id -> commit; HubError if unknown."""
        name = rev.removeprefix("refs/heads/")
        if name in repo.refs:
            return repo.commits[repo.refs[name]]
        if _HEX_PREFIX.match(rev):
            hits = [c for oid, c in repo.commits.items() if oid.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _history(self, repo: _Repo, head: CommitRecord) -> list[CommitRecord]:
        """First-parent history, newest first."""
        chain, commit = [], head
        while commit is not None:
            chain.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return chain

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.url}/{_URL_PREFIXES[repo.type]}{repo.id}"

    def _is_member(self, ident: _Identity | None, namespace: str) -> bool:
        return ident is not None and (ident.name == namespace or ident.name in self._orgs.get(namespace, ()))

    def _readable_repo(self, repo_type: str, repo_id: str, ident: _Identity | None) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        # Like the Hub, a private repo the caller may not see is reported as missing.
        if repo is None or (repo.private and not self._is_member(ident, repo.namespace)):
            raise _not_found_repo(repo_id)
        return repo

    def _writable_repo(self, repo_type: str, repo_id: str, ident: _Identity | None,
                       pull_request: bool = False) -> _Repo:
        """The repo if `ident` may write to it; any write token may open a pull request on a repo it sees."""
        repo = self._readable_repo(repo_type, repo_id, ident)
        if ident is None:
            raise HubError(401, "You must be authenticated to write to a repo")
        if ident.role != "write" or not (pull_request or self._is_member(ident, repo.namespace)):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _new_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> _Repo:
        repo = _Repo(type=repo_type, id=repo_id, private=private, created=_now())
        self._repos[(repo_type, repo_id)] = repo
        snapshot = {".gitattributes": StoredFile(DEFAULT_GITATTRIBUTES.encode(), lfs=False)}
        self._record_commit(repo, "main", None, snapshot, "initial commit", "", author)
        return repo

    def _patterns_at(self, commit: CommitRecord) -> list[str]:
        attrs = commit.files.get(".gitattributes")
        return _lfs_patterns(attrs.data if attrs else None)

    @staticmethod
    def _needs_lfs(patterns: list[str], path: str, size: int, sample: bytes) -> bool:
        # Tracked by .gitattributes, too big for git, or binary (a NUL in the first bytes) as the Hub sniffs.
        return _matches_any(path, patterns) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample

    def _record_commit(self, repo: _Repo, ref: str, parent: str | None, snapshot: dict[str, StoredFile],
                       summary: str, description: str, author: str) -> CommitRecord:
        before = repo.commits[parent].files if parent else {}
        added = tuple(sorted(p for p, f in snapshot.items()
                             if p not in before or before[p].blob_oid != f.blob_oid))
        deleted = tuple(sorted(p for p in before if p not in snapshot))
        self._seq += 1
        listing = "".join(f"{p}\0{f.blob_oid}\n" for p, f in sorted(snapshot.items()))
        seed = f"{repo.type}/{repo.id}\n{self._seq}\n{parent}\n{summary}\n{description}\n{listing}"
        commit = CommitRecord(
            oid=hashlib.sha1(seed.encode()).hexdigest(), parent=parent, ref=ref, summary=summary,
            description=description, author=author, date=_now(), files=snapshot, added=added, deleted=deleted)
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit

    # -- tree entries

    @staticmethod
    def _dirs_of(files: dict[str, StoredFile]) -> set[str]:
        dirs = set()
        for path in files:
            parts = path.split("/")[:-1]
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        return dirs

    def _last_commit(self, repo: _Repo, head: CommitRecord, path: str, is_dir: bool) -> dict:
        """The newest commit that changed `path` (or anything under it), as the tree's `lastCommit`."""
        prefix = path + "/"
        for commit in self._history(repo, head):
            touched = (*commit.added, *commit.deleted)
            if (is_dir and any(p.startswith(prefix) for p in touched)) or (not is_dir and path in touched):
                break
        return {"id": commit.oid, "title": commit.summary, "date": _iso(commit.date)}

    def _entry(self, repo: _Repo, commit: CommitRecord, path: str, expand: bool) -> dict:
        f = commit.files.get(path)
        if f is not None:
            entry: dict[str, Any] = {"type": "file", "oid": f.blob_oid, "size": f.size, "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        else:
            prefix = path + "/"
            listing = "".join(f"{p}\0{g.blob_oid}\n" for p, g in sorted(commit.files.items())
                              if p.startswith(prefix))
            entry = {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0,
                     "path": path}
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit, path, is_dir=f is None)
        return entry

    # -- endpoint handlers (called with the lock held; raise HubError to answer an error)

    def _h_agent_harnesses(self, req: _Request) -> _Response:
        # huggingface_hub fetches this registry (once a day, cached in HF_HOME) to tag its user-agent when
        # run by an AI coding agent; an empty registry means "no agent detected".
        return _Response.json({"standardEnvVars": [], "harnesses": {}})

    def _h_whoami(self, req: _Request) -> _Response:
        ident = req.require_user()
        orgs = sorted(org for org, members in self._orgs.items() if ident.name in members)
        return _Response.json({
            "type": "user", "id": hashlib.sha1(ident.name.encode()).hexdigest()[:24], "name": ident.name,
            "fullname": ident.name, "email": f"{ident.name}@example.invalid", "emailVerified": True,
            "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "",
            "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write"} for o in orgs],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": f"{ident.name}-token", "role": ident.role,
                                     "createdAt": _iso(self._started)}},
        })

    def _h_create_repo(self, req: _Request) -> _Response:
        ident = req.require_user()
        body = req.json()
        name, namespace = body.get("name"), body.get("organization") or ident.name
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIXES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not isinstance(name, str) or not _REPO_NAME.match(name) or "--" in name or ".." in name \
                or name.endswith(".git"):
            raise HubError(400, "Repo id must use alphanumeric chars or '-', '_', '.'; '--' and '..' are "
                                "forbidden, '-' and '.' cannot start or end the name, max length is 96: "
                                f"{name!r}")
        if not isinstance(namespace, str) or not _REPO_NAME.match(namespace):
            raise HubError(400, f"Invalid namespace: {namespace!r}")
        repo_id = f"{namespace}/{name}"
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None and (not existing.private or self._is_member(ident, namespace)):
            # exist_ok=True in the client relies on a 409 that still carries the url.
            return _Response.json({"error": f"You already created this {repo_type} repo",
                                   "url": self._repo_url(existing)}, status=409)
        if ident.role != "write" or not self._is_member(ident, namespace):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace "
                                f"\"{namespace}\"")
        if existing is not None:
            raise HubError(409, f"You already created this {repo_type} repo")
        private = body.get("visibility") == "private" or body.get("private") is True
        repo = self._new_repo(repo_type, repo_id, private, ident.name)
        return _Response.json({"url": self._repo_url(repo), "name": repo_id,
                               "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _h_validate_yaml(self, req: _Request) -> _Response:
        body = req.json()
        content = body.get("content")
        if not isinstance(content, str):
            raise HubError(400, '"content" must be the card text')
        errors, warnings = validate_card(content, body.get("repoType") or "model")
        payload: dict[str, Any] = {}
        if warnings:
            payload["warnings"] = [{"message": w} for w in warnings]
        if errors:
            payload.update(error="Invalid metadata in README.md", errors=[{"message": e} for e in errors])
            return _Response.json(payload, status=400)
        return _Response.json(payload)

    def _h_repo_info(self, req: _Request, repo_type: str, repo_id: str, rev: str | None) -> _Response:
        repo = self._readable_repo(repo_type, repo_id, req.ident)
        commit = self._resolve(repo, rev or "main")
        card = commit.files.get("README.md")
        try:
            meta = parse_card_metadata(card.data.decode("utf-8", "replace")) if card else None
        except yaml.YAMLError:
            meta = None
        meta = meta if isinstance(meta, dict) else None
        tags: list[str] = []
        if meta:
            tags += [t for t in meta.get("tags") or [] if isinstance(t, str)]
            if isinstance(meta.get("library_name"), str):
                tags.append(meta["library_name"])
            if isinstance(meta.get("license"), str):
                tags.append(f"license:{meta['license']}")
            bases = meta.get("base_model")
            for b in [bases] if isinstance(bases, str) else bases if isinstance(bases, list) else []:
                tags.append(f"base_model:{b}")
                if isinstance(meta.get("base_model_relation"), str):
                    tags.append(f"base_model:{meta['base_model_relation']}:{b}")
        siblings = []
        for path, f in sorted(commit.files.items()):
            sib: dict[str, Any] = {"rfilename": path, "size": f.size, "blobId": f.blob_oid}
            if f.lfs:
                sib["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(sib)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "author": repo.namespace,
            "sha": commit.oid, "lastModified": _iso(commit.date), "createdAt": _iso(repo.created),
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": list(dict.fromkeys(tags)), "siblings": siblings,
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        if meta:
            info["cardData"] = meta
            for key in ("library_name", "pipeline_tag"):
                if isinstance(meta.get(key), str):
                    info[key] = meta[key]
        return _Response.json(info)

    def _h_preupload(self, req: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        repo = self._writable_repo(repo_type, repo_id, req.ident, pull_request=_truthy(req.query.get("create_pr")))
        commit = self._resolve(repo, rev)
        files = req.json().get("files")
        if not isinstance(files, list) or not all(isinstance(item, dict) for item in files):
            raise HubError(400, '"files" must be a list of objects')
        patterns = self._patterns_at(commit)
        answer = []
        for item in files:
            path, size = item.get("path"), item.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise HubError(400, "each file needs a path and a size")
            try:
                sample = base64.b64decode(item.get("sample") or "", validate=True)
            except ValueError:
                raise HubError(400, f"Invalid base64 sample for {path}") from None
            lfs = self._needs_lfs(patterns, path, size, sample)
            entry: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular",
                                     "shouldIgnore": False}
            existing = commit.files.get(path)
            if existing is not None:
                # The client compares this with sha256 for LFS files and the git blob id for regular ones.
                entry["oid"] = existing.sha256 if existing.lfs else existing.blob_oid
            answer.append(entry)
        return _Response.json({"files": answer})

    def _h_lfs_batch(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        # Objects alone change nothing in the repo, and uploads for a pull request come without a
        # revision, so any write token that sees the repo may store objects in it.
        repo = self._writable_repo(repo_type, repo_id, req.ident, pull_request=True)
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(422, "Only the upload operation is supported")
        if not isinstance(body.get("objects"), list) or not all(isinstance(o, dict) for o in body["objects"]):
            raise HubError(422, '"objects" must be a list of {oid, size}')
        git_url = f"{self._repo_url(repo)}.git/info/lfs/objects"
        objects = []
        for obj in body["objects"]:
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
            elif oid in repo.lfs_oids and len(self._lfs[oid]) == size:
                objects.append({"oid": oid, "size": size})  # no actions: already stored, nothing to send
            else:
                # An unguessable one-off URL stands in for the presigned storage URL the Hub hands out.
                ticket = secrets.token_urlsafe(16)
                self._upload_tickets[ticket] = ((repo.type, repo.id), oid, size)
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self.url}/_lfs/upload/{ticket}", "expires_in": 3600},
                    "verify": {"href": f"{git_url}/verify"},
                }})
        return _Response.json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                              content_type="application/vnd.git-lfs+json")

    def _h_lfs_upload(self, req: _Request, ticket: str) -> _Response:
        grant = self._upload_tickets.get(ticket)
        if grant is None:
            raise HubError(403, "Invalid or expired upload URL")
        key, oid, size = grant
        if len(req.body) != size or hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
        # Idempotent: a retried PUT of the same bytes just stores them again.
        self._lfs[oid] = req.body
        self._repos[key].lfs_oids.add(oid)
        return _Response(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})

    def _h_lfs_verify(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._writable_repo(repo_type, repo_id, req.ident, pull_request=True)
        body = req.json()
        oid, size = body.get("oid"), body.get("size")
        if oid not in repo.lfs_oids:
            raise HubError(404, f"LFS object {oid} was not uploaded")
        if len(self._lfs[oid]) != size:
            raise HubError(422, f"LFS object {oid} has size {len(self._lfs[oid])}, not {size}")
        return _Response.json({"success": True})

    def _h_commit(self, req: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        create_pr = _truthy(req.query.get("create_pr"))
        branch = rev.removeprefix("refs/heads/")
        repo = self._writable_repo(repo_type, repo_id, req.ident,
                                   pull_request=create_pr or branch.startswith("refs/pr/"))
        if branch not in repo.refs:
            raise HubError(404, f"Invalid rev id: {rev} (commits go to a branch or a refs/pr/N)",
                           "RevisionNotFound")
        if create_pr and branch.startswith("refs/pr/"):
            raise HubError(400, "A pull request cannot target another pull request")
        lines = [line for line in req.body.splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except json.JSONDecodeError as e:
            raise HubError(400, f"The commit payload must be NDJSON: {e}") from None
        if not all(isinstance(item, dict) and isinstance(item.get("value", {}), dict) for item in items):
            raise HubError(400, 'Each line of the commit payload must be {"key": ..., "value": {...}}')
        if not items or items[0].get("key") != "header":
            raise HubError(400, "The first line of the commit payload must be the header")
        header = items[0].get("value") or {}
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HubError(400, "The commit summary must not be empty")

        head = repo.refs[branch]
        parent = head
        wanted_parent = header.get("parentCommit")
        if wanted_parent:
            matches = [oid for oid in repo.commits if oid.startswith(wanted_parent)]
            if len(matches) != 1:
                raise HubError(400, f"Unknown parent commit {wanted_parent}")
            if create_pr:
                parent = matches[0]  # the PR branches off the given commit
            elif matches[0] != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")

        # Apply everything to a copy first: a refused operation leaves the repo untouched.
        patterns = self._patterns_at(repo.commits[parent])
        snapshot = dict(repo.commits[parent].files)
        for item in items[1:]:
            self._apply_operation(repo, patterns, snapshot, item.get("key"), item.get("value") or {})
        # As in git, a path cannot be both a file and a folder.
        clashes = self._dirs_of(snapshot) & set(snapshot)
        if clashes:
            raise HubError(400, f"{min(clashes)} cannot be both a file and a folder")

        ref = branch
        pr_num = None
        if create_pr:
            pr_num = repo.next_discussion
            repo.next_discussion += 1
            ref = f"refs/pr/{pr_num}"
        commit = self._record_commit(repo, ref, parent, snapshot, summary, header.get("description") or "",
                                     req.ident.name)
        answer = {"success": True, "commitOid": commit.oid, "commitUrl": f"{self._repo_url(repo)}/commit/"
                  f"{commit.oid}", "hookOutput": ""}
        if pr_num is not None:
            answer["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{pr_num}"
        return _Response.json(answer)

    def _apply_operation(self, repo: _Repo, patterns: list[str], snapshot: dict[str, StoredFile],
                         key: str | None, value: dict) -> None:
        path = value.get("path")
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/") \
                or path.split("/")[0] == ".git":
            raise HubError(400, f"Invalid path in commit: {path!r}")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"Unsupported encoding for {path}")
            try:
                data = base64.b64decode(value.get("content") or "", validate=True)
            except ValueError:
                raise HubError(400, f"Invalid base64 content for {path}") from None
            # The Hub refuses to store binary or LFS-tracked content as a plain git blob.
            if data and self._needs_lfs(patterns, path, len(data), data[:512]):
                raise HubError(400, f"Your push was rejected because it contains files that must be stored "
                                    f"with LFS: {path}")
            snapshot[path] = StoredFile(data, lfs=False)
        elif key == "lfsFile":
            oid, size = value.get("oid"), value.get("size")
            if value.get("algo", "sha256") != "sha256" or oid not in repo.lfs_oids:
                raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that "
                                    f"does not exist: {path} (oid {oid})")
            if size is not None and size != len(self._lfs[oid]):
                raise HubError(400, f"LFS object {oid} has size {len(self._lfs[oid])}, not {size}: {path}")
            snapshot[path] = StoredFile(self._lfs[oid], lfs=True)
        elif key == "deletedFile":
            if path not in snapshot:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del snapshot[path]
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            doomed = [p for p in snapshot if p.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del snapshot[p]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")

    def _h_tree(self, req: _Request, repo_type: str, repo_id: str, rev: str, path: str) -> _Response:
        repo = self._readable_repo(repo_type, repo_id, req.ident)
        commit = self._resolve(repo, rev)
        path = path.strip("/")
        dirs = self._dirs_of(commit.files)
        if path and path not in dirs:
            raise HubError(404, f"{path} is not a folder at {rev}", "EntryNotFound")
        recursive, expand = _truthy(req.query.get("recursive")), _truthy(req.query.get("expand"))
        prefix = path + "/" if path else ""
        below = [p for p in sorted(set(commit.files) | dirs) if p.startswith(prefix)]
        if not recursive:
            below = [p for p in below if "/" not in p[len(prefix):]]
        return _Response.json([self._entry(repo, commit, p, expand) for p in below])

    def _h_paths_info(self, req: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        repo = self._readable_repo(repo_type, repo_id, req.ident)
        commit = self._resolve(repo, rev)
        form = req.form()
        paths, expand = form.get("paths") or [], _truthy((form.get("expand") or [""])[0])
        dirs = self._dirs_of(commit.files)
        found = [p.strip("/") for p in paths if p.strip("/") in commit.files or p.strip("/") in dirs]
        # Missing paths are left out, as on the Hub.
        return _Response.json([self._entry(repo, commit, p, expand) for p in dict.fromkeys(found)])

    def _h_create_branch(self, req: _Request, repo_type: str, repo_id: str,
                         branch: str) -> _Response:
        """POST /api/{type}s/{repo}/branch/{branch} (HfApi.create_branch): from the given
        startingPoint, else main's head; 409 if it exists (the client's exist_ok reads it)."""
        repo = self._writable_repo(repo_type, repo_id, req.ident, pull_request=False)
        if branch in repo.refs:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = (req.json() or {}).get("startingPoint") if req.body else None
        repo.refs[branch] = repo.refs[start] if start in repo.refs else \
            (start if start else repo.refs["main"])
        return _Response.json({})

    def _h_refs(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._readable_repo(repo_type, repo_id, req.ident)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid}
                    for n, oid in repo.refs.items() if not n.startswith("refs/")]
        answer: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if _truthy(req.query.get("include_prs")):
            answer["pullRequests"] = [{"name": n, "ref": n, "targetCommit": oid}
                                      for n, oid in repo.refs.items() if n.startswith("refs/pr/")]
        return _Response.json(answer)

    def _h_commits(self, req: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        repo = self._readable_repo(repo_type, repo_id, req.ident)
        return _Response.json([
            {"id": c.oid, "title": c.summary, "message": c.description, "date": _iso(c.date),
             "authors": [{"user": c.author, "avatar": None}]}
            for c in self._history(repo, self._resolve(repo, rev))])

    def _h_resolve(self, req: _Request, repo_type: str, repo_id: str, rev: str, path: str) -> _Response:
        repo = self._readable_repo(repo_type, repo_id, req.ident)
        commit = self._resolve(repo, rev)
        f = commit.files.get(path)
        if f is None:
            # X-Repo-Commit lets the client cache the file's absence for this commit.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        etag = f.sha256 if f.lfs else f.blob_oid
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.oid,
                   "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            # On the Hub these ride on the redirect to the CDN; here the bytes are served directly.
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(f.size)})
        data, status = f.data, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range", "").strip())
        if m:
            start = int(m[1])
            end = min(int(m[2]) if m[2] else f.size - 1, f.size - 1)
            if start >= f.size:
                raise HubError(416, "Requested range not satisfiable",
                               headers={"Content-Range": f"bytes */{f.size}"})
            data, status = f.data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        return _Response(status, data, headers)


# ---------------------------------------------------------------------------------------------- HTTP layer


class _Request:
    def __init__(self, method: str, headers, body: bytes, query: dict[str, list[str]]):
        self.method, self.headers, self.body = method, headers, body
        self.query = {k: v[-1] for k, v in query.items()}
        self.ident: _Identity | None = None

    def require_user(self) -> _Identity:
        if self.ident is None:
            raise HubError(401, "Invalid username or password.")
        return self.ident

    def json(self) -> dict:
        try:
            value = json.loads(self.body or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from None
        if not isinstance(value, dict):
            raise HubError(400, "The JSON body must be an object")
        return value

    def form(self) -> dict[str, list[str]]:
        """Form fields (paths-info is sent form-encoded); a JSON body is accepted too."""
        if "json" in self.headers.get("Content-Type", ""):
            data = self.json()
            paths = data.get("paths") or []
            return {"paths": [paths] if isinstance(paths, str) else list(paths),
                    "expand": [str(data.get("expand", "")).lower()]}
        return parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)


def _split_revision(parts: list[str]) -> tuple[str, str] | None:
    """(revision, remaining path) from URL segments; an unencoded refs/pr/N spans three segments."""
    if not parts or not parts[0]:
        return None
    n = 3 if parts[0] == "refs" and len(parts) >= 3 else 1
    return "/".join(parts[:n]), "/".join(parts[n:])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 60
    server_version = "hubserver"

    def log_message(self, format: str, *args) -> None:
        pass  # tests read hub.requests; stderr noise would only hide real failures

    def do_GET(self):
        self._serve()

    def do_HEAD(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def do_PUT(self):
        self._serve()

    def do_DELETE(self):
        self._serve()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _route(self, method: str, segs: list[str]) -> tuple[str, Callable[..., _Response], tuple]:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["agent-harnesses"] and method == "GET":
                return "agent-harnesses", hub._h_agent_harnesses, ()
            if rest == ["whoami-v2"] and method == "GET":
                return "whoami", hub._h_whoami, ()
            if rest == ["repos", "create"] and method == "POST":
                return "create-repo", hub._h_create_repo, ()
            if rest == ["validate-yaml"] and method == "POST":
                return "validate-yaml", hub._h_validate_yaml, ()
            if len(rest) >= 3 and rest[0] in _API_TYPES:
                repo = (_API_TYPES[rest[0]], f"{rest[1]}/{rest[2]}")
                action, tail = (rest[3], rest[4:]) if len(rest) > 3 else ("", [])
                # The client quotes revisions with safe="", so a revision is one segment; joining the tail
                # also accepts an unencoded "refs/pr/1" where nothing follows the revision.
                rev = "/".join(tail)
                if action == "" and method == "GET":
                    return "repo-info", hub._h_repo_info, (*repo, None)
                if action == "revision" and rev and method == "GET":
                    return "repo-info", hub._h_repo_info, (*repo, rev)
                if action == "preupload" and rev and method == "POST":
                    return "preupload", hub._h_preupload, (*repo, rev)
                if action == "commit" and rev and method == "POST":
                    return "commit", hub._h_commit, (*repo, rev)
                if action == "tree" and tail and tail[0] and method == "GET":
                    return "tree", hub._h_tree, (*repo, *_split_revision(tail))
                if action == "paths-info" and rev and method == "POST":
                    return "paths-info", hub._h_paths_info, (*repo, rev)
                if action == "branch" and len(tail) == 1 and method == "POST":
                    return "create-branch", hub._h_create_branch, (*repo, tail[0])
                if action == "refs" and not tail and method == "GET":
                    return "refs", hub._h_refs, repo
                if action == "commits" and rev and method == "GET":
                    return "commits", hub._h_commits, (*repo, rev)
        if len(segs) == 3 and segs[:2] == ["_lfs", "upload"] and method == "PUT":
            return "lfs-upload", hub._h_lfs_upload, (segs[2],)
        repo_type, s = "model", segs
        if s and s[0] in ("datasets", "spaces"):
            repo_type, s = _API_TYPES[s[0]], s[1:]
        if len(s) == 6 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo = (repo_type, f"{s[0]}/{s[1][:-4]}")
            if s[5] == "batch":
                return "lfs-batch", hub._h_lfs_batch, repo
            if s[5] == "verify":
                return "lfs-verify", hub._h_lfs_verify, repo
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            rev = _split_revision(s[3:])
            if rev and rev[1]:
                return "resolve", hub._h_resolve, (repo_type, f"{s[0]}/{s[1]}", *rev)
        return "unknown", _unknown_route, ()

    def _serve(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        body = self._read_body()  # always drained, so a refused request leaves the connection usable
        split = urlsplit(self.path)
        segs = [unquote(s) for s in split.path.split("/")[1:]]
        endpoint, handler, args = self._route(self.command, segs)

        redacted = {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in self.headers.items()}
        record = RequestRecord(self.command, self.path, endpoint, redacted, body)
        req = _Request(self.command, self.headers, body, parse_qs(split.query, keep_blank_values=True))
        with hub._lock:
            hub.requests.append(record)
            failures = hub._failures.get(endpoint)
            injected = failures.pop(0) if failures else None
            try:
                if injected is not None:
                    record.injected = True
                    raise HubError(injected, f"Injected failure on {endpoint} (fail_next)")
                auth = self.headers.get("Authorization", "")
                if auth:
                    token = auth.removeprefix("Bearer ")
                    hub.seen_tokens.add(token)
                    req.ident = hub._tokens.get(token)
                    if req.ident is None:
                        raise HubError(401, _BAD_TOKEN_MESSAGE)
                response = handler(req, *args)
            except HubError as e:
                response = _Response.json({"error": e.message}, status=e.status)
                response.headers.update(e.headers)
                response.headers["X-Error-Message"] = e.message.replace("\n", " ")[:500]
                if e.code:
                    response.headers["X-Error-Code"] = e.code
            except Exception:  # noqa: BLE001 - a server bug must reach the test as a 500 plus a traceback
                hub.server_errors.append(traceback.format_exc())
                response = _Response.json({"error": "Internal error in hubserver"}, status=500)
            record.status = response.status
        self._send(response)

    def _send(self, response: _Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            # Header values must be latin-1; messages may carry any character.
            self.send_header(name, value.encode("latin-1", "replace").decode("latin-1"))
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


def _unknown_route(req: _Request) -> _Response:
    raise HubError(404, f"hubserver does not implement {req.method} on this path")
