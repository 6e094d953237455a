"""tests/hubserver.py against the real huggingface_hub client.

The client runs in a fresh interpreter so that HF_ENDPOINT / HF_HOME / HF_HUB_DISABLE_XET / HF_TOKEN are set
before `huggingface_hub` is imported (it reads them at import time), exactly as `convkit publish` will run.
A few refusals the client never provokes are checked with raw HTTP.
"""

import hashlib
import http.client
import json
import os
import random
import subprocess
import sys
import textwrap
from urllib.parse import urlsplit

import pytest

from tests.hubserver import HubServer, validate_card

USER = "alice"
# Distinctive, so that a leak into any output is unmistakable.
TOKEN = "hf_" + "Tk9sEcReT" * 4
READ_TOKEN = "hf_readonly_bob"
OUTSIDER_TOKEN = "hf_carol"  # may write, but not to alice's repos

# Every script gets `api`, `params` (from the test), `out` (printed as JSON at the end) and `fails()`.
_PRELUDE = """
import hashlib, json, os
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download
api = HfApi()
params = json.loads(os.environ["HUBTEST_PARAMS"])
out = {}

def fails(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:
        return [type(e).__name__, str(e)]
    return None

def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
"""


@pytest.fixture
def hub():
    tokens = {TOKEN: USER, READ_TOKEN: ("bob", "read"), OUTSIDER_TOKEN: "carol"}
    with HubServer(tokens=tokens, orgs={"team": [USER]}) as server:
        yield server
        assert server.server_errors == [], server.server_errors[0]
        # The token reaches the server (it must), but never its request log.
        assert TOKEN not in server.log_text()


def run_client(hub: HubServer, tmp_path, body: str, **params) -> dict:
    """Run `body` with the real client against `hub`; returns the script's `out`."""
    # conftest sets HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE; huggingface_hub honours either.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN,
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
               HUBTEST_PARAMS=json.dumps(params))
    script = _PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def call(hub: HubServer, method: str, path: str, body: bytes | dict | None = None, token: str | None = TOKEN,
         content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:
    """A raw request, for what the client never sends."""
    conn = http.client.HTTPConnection(urlsplit(hub.url).netloc, timeout=10)
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    result = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return result


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


# Computed here rather than taken from the server, so the server's ids are checked, not echoed.
def blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def pointer_sha1(data: bytes) -> str:
    pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
               f"size {len(data)}\n").encode()
    return blob_sha1(pointer)


CARD = b"---\nlicense: openrail++\nbase_model: stabilityai/stable-diffusion-xl-base-1.0\n" \
       b"base_model_relation: quantized\npipeline_tag: text-to-image\ntags: [gguf, sdxl]\n---\n# Tiny SDXL\n"


@pytest.fixture
def payload(tmp_path):
    """A README and two LFS-bound files (1 MiB of weights, a small PNG), on disk as a publisher has them."""
    rng = random.Random(0)
    files = {
        "README.md": CARD,
        "unet/model.safetensors": rng.randbytes(1 << 20),
        "preview.png": b"\x89PNG\r\n\x1a\n" + rng.randbytes(2000),
    }
    root = tmp_path / "upload"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root, files


def test_whoami_and_create_repo(hub, tmp_path):
    out = run_client(hub, tmp_path, """
        out["me"] = api.whoami()
        out["bad_token"] = fails(api.whoami, token="hf_not_a_token")
        out["first"] = api.create_repo("alice/pub", private=True)
        out["again"] = api.create_repo("alice/pub", private=True, exist_ok=True)
        out["dup"] = fails(api.create_repo, "alice/pub")
        out["foreign"] = fails(api.create_repo, "bob/pub")
        out["org"] = api.create_repo("team/shared")
    """)
    assert out["me"]["name"] == USER and out["me"]["type"] == "user"
    assert out["me"]["auth"]["accessToken"]["role"] == "write"
    assert [o["name"] for o in out["me"]["orgs"]] == ["team"]
    assert out["bad_token"][0] == "HfHubHTTPError" and "Invalid user token" in out["bad_token"][1]
    assert out["first"] == out["again"] == f"{hub.url}/alice/pub"
    assert "409" in out["dup"][1]
    assert "403" in out["foreign"][1]
    assert out["org"] == f"{hub.url}/team/shared"

    assert [r.status for r in hub.requests if r.endpoint == "create-repo"] == [200, 409, 409, 403, 200]
    assert hub.seen_tokens == {TOKEN, "hf_not_a_token"}
    # A new repo holds the Hub's initial commit; a private one is hidden from others.
    assert [c.summary for c in hub.commits("alice/pub")] == ["initial commit"]
    assert list(hub.files("alice/pub")) == [".gitattributes"]
    status, headers, _ = call(hub, "GET", "/api/models/alice/pub", token=None)
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    assert call(hub, "GET", "/api/models/alice/pub")[0] == 200
    # Names the client would refuse before sending them.
    for name in ("-dash", "dots..", "double--dash", "x.git", "a" * 97):
        assert call(hub, "POST", "/api/repos/create", {"name": name})[0] == 400, name


def test_model_card_validation(hub, tmp_path):
    out = run_client(hub, tmp_path, """
        out["good"] = fails(ModelCard(params["good"]).validate)
        out["bad"] = fails(ModelCard(params["bad"]).validate)
    """, good=CARD.decode(), bad="---\nlicense: my-own-licence\n---\n# card\n")
    assert out["good"] is None
    assert out["bad"][0] == "ValueError" and "my-own-licence" in out["bad"][1]
    assert [r.status for r in hub.requests if r.endpoint == "validate-yaml"] == [200, 400]


@pytest.mark.parametrize(("card", "problem"), [
    (CARD.decode(), None),
    ("---\nlicense: other\nlicense_name: tiny-licence\nlicense_link: LICENSE.md\n---\n", None),
    ("---\nbase_model: [a/b, c/d]\nbase_model_relation: merge\n---\n", None),
    ("---\nlicense: mit\nlicense_name: x\n---\n", '"license_name" is only allowed'),
    ("---\nlicense: Apache 2.0\n---\n", '"license" must be one of'),
    ("---\nbase_model: sdxl\n---\n", '"base_model" must be a model id'),
    ("---\nbase_model: a/b\nbase_model_relation: distilled\n---\n", '"base_model_relation" must be one of'),
    ("---\nbase_model_relation: adapter\n---\n", '"base_model_relation" requires "base_model"'),
    ("---\npipeline_tag: text-to-picture\n---\n", '"pipeline_tag" must be a known task'),
    ("---\ntags: sdxl\n---\n", '"tags" must be a list of strings'),
    ("---\nlibrary_name: [diffusers]\n---\n", '"library_name" must be a string'),
    ("---\n- just\n- a list\n---\n", "must be a YAML mapping"),
    ("---\nlicense: [mit\n---\n", "Invalid YAML"),
])
def test_validate_card_rules(card, problem):
    errors, _ = validate_card(card)
    if problem is None:
        assert errors == []
    else:
        assert len(errors) == 1 and problem in errors[0], errors


def test_validate_card_without_metadata_warns():
    assert validate_card("# No metadata\n") == ([], ["Empty or missing yaml metadata in repo card"])


def test_publish_round_trip(hub, tmp_path, payload):
    root, files = payload
    out = run_client(hub, tmp_path, """
        repo = "alice/tiny-sdxl"
        api.create_repo(repo, exist_ok=True)
        ops = [CommitOperationAdd(rel, os.path.join(params["root"], rel)) for rel in params["files"]]
        info = api.create_commit(repo, operations=ops, commit_message="Publish", revision="main")
        out["oid"], out["commit_url"] = info.oid, info.commit_url
        out["tree"] = [
            {"path": e.path, "kind": type(e).__name__, "blob_id": getattr(e, "blob_id", None),
             "size": getattr(e, "size", None), "lfs": e.lfs["sha256"] if getattr(e, "lfs", None) else None,
             "last_commit": e.last_commit.oid if e.last_commit else None}
            for e in api.list_repo_tree(repo, revision="main", recursive=True, expand=True)]
        out["paths_info"] = {
            e.path: [e.blob_id, e.lfs.sha256 if e.lfs else None, e.lfs.size if e.lfs else None]
            for e in api.get_paths_info(repo, list(params["files"]) + ["missing.txt"], revision=info.oid)}
        model = api.model_info(repo, revision=info.oid)
        out["info"] = {"sha": model.sha, "license": model.card_data.license, "tags": model.tags,
                       "pipeline_tag": model.pipeline_tag,
                       "siblings": {s.rfilename: s.lfs.sha256 if s.lfs else s.blob_id for s in model.siblings}}
        downloaded = {rel: hf_hub_download(repo, rel, revision="main") for rel in params["files"]}
        out["downloads"] = {rel: sha256_of(path) for rel, path in downloaded.items()}
        # The cache names each blob after the ETag the server sent.
        out["blobs"] = {rel: os.path.basename(os.path.realpath(path)) for rel, path in downloaded.items()}
        out["exists"] = [api.file_exists(repo, "README.md"), api.file_exists(repo, "nope.bin")]
    """, root=str(root), files=list(files))

    lfs_files = ("unet/model.safetensors", "preview.png")
    sha256 = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    assert out["commit_url"] == f"{hub.url}/alice/tiny-sdxl/commit/{out['oid']}"
    assert hub.files("alice/tiny-sdxl").keys() == {".gitattributes", *files}
    assert {rel: hub.files("alice/tiny-sdxl")[rel] for rel in files} == files
    assert hub.lfs_paths("alice/tiny-sdxl") == set(lfs_files)
    commits = hub.commits("alice/tiny-sdxl")
    assert [c.summary for c in commits] == ["initial commit", "Publish"]
    assert commits[-1].oid == out["oid"] and commits[-1].changed == sorted(files)

    # Tree: LFS files report their sha256 and the blob id of their pointer; regular files their blob id.
    tree = {e["path"]: e for e in out["tree"]}
    assert list(tree) == [".gitattributes", "README.md", "preview.png", "unet", "unet/model.safetensors"]
    assert tree["unet"]["kind"] == "RepoFolder"
    assert tree["README.md"]["blob_id"] == blob_sha1(CARD) and tree["README.md"]["lfs"] is None
    for rel in lfs_files:
        assert tree[rel]["lfs"] == sha256[rel]
        assert tree[rel]["blob_id"] == pointer_sha1(files[rel])
        assert tree[rel]["size"] == len(files[rel])
    assert {e["last_commit"] for p, e in tree.items() if p != ".gitattributes"} == {out["oid"]}
    assert tree[".gitattributes"]["last_commit"] == commits[0].oid

    assert out["paths_info"] == {
        "README.md": [blob_sha1(CARD), None, None],
        **{rel: [pointer_sha1(files[rel]), sha256[rel], len(files[rel])] for rel in lfs_files},
    }
    assert out["info"]["sha"] == out["oid"]
    assert out["info"]["license"] == "openrail++" and out["info"]["pipeline_tag"] == "text-to-image"
    assert "base_model:quantized:stabilityai/stable-diffusion-xl-base-1.0" in out["info"]["tags"]
    assert out["info"]["siblings"]["unet/model.safetensors"] == sha256["unet/model.safetensors"]
    assert out["info"]["siblings"]["README.md"] == blob_sha1(CARD)
    assert out["downloads"] == sha256
    assert out["blobs"] == {**sha256, "README.md": blob_sha1(CARD)}
    assert out["exists"] == [True, False]

    # The legacy LFS path: one batch call, then one PUT and one verify per object.
    assert (hub.count("lfs-batch"), hub.count("lfs-upload"), hub.count("lfs-verify")) == (1, 2, 2)
    put_sizes = sorted(len(r.body) for r in hub.requests if r.endpoint == "lfs-upload")
    assert put_sizes == sorted(len(files[rel]) for rel in lfs_files)
    # The card was checked before anything was uploaded.
    assert [r.endpoint for r in hub.requests if r.endpoint != "agent-harnesses"][:3] == \
        ["create-repo", "validate-yaml", "preupload"]


def test_second_commit_of_same_lfs_object_uploads_nothing(hub, tmp_path):
    weights = random.Random(1).randbytes(300_000)
    hub.create_repo("alice/dedup", files={"unet/model.safetensors": weights})
    out = run_client(hub, tmp_path, """
        repo = "alice/dedup"
        weights = open(params["weights"], "rb").read()
        same = api.create_commit(repo, [CommitOperationAdd("unet/model.safetensors", weights)],
                                 commit_message="unchanged")
        copy = api.create_commit(repo, [CommitOperationAdd("copies/model.safetensors", weights)],
                                 commit_message="copy")
        out["same"], out["copy"] = same.oid, copy.oid
    """, weights=str(_write(tmp_path / "w.safetensors", weights)))

    commits = hub.commits("alice/dedup")
    # Unchanged file: the client skips the commit (preupload's oid matched) and reports the current head.
    assert [c.summary for c in commits] == ["initial commit", "seed", "copy"]
    assert out["same"] == commits[1].oid and out["copy"] == commits[2].oid
    # Both times the batch answer said "already stored": no byte was sent again.
    assert hub.count("lfs-batch") == 2
    assert hub.count("lfs-upload") == 0 and hub.count("lfs-verify") == 0
    assert hub.files("alice/dedup")["copies/model.safetensors"] == weights
    assert hub.lfs_paths("alice/dedup") == {"unet/model.safetensors", "copies/model.safetensors"}


def test_failed_commit_leaves_no_commit_and_a_retry_succeeds(hub, tmp_path, payload):
    root, files = payload
    hub.create_repo("alice/retry")
    hub.fail_next("commit", status=500)
    out = run_client(hub, tmp_path, """
        def operations():
            return [CommitOperationAdd(rel, os.path.join(params["root"], rel)) for rel in params["files"]]
        out["first"] = fails(api.create_commit, "alice/retry", operations(), commit_message="Publish")
        out["heads_after_failure"] = api.list_repo_refs("alice/retry").branches[0].target_commit
        out["second"] = api.create_commit("alice/retry", operations(), commit_message="Publish").oid
    """, root=str(root), files=list(files))

    assert out["first"][0] == "HfHubHTTPError" and "500" in out["first"][1]
    initial, published = hub.commits("alice/retry")
    assert out["heads_after_failure"] == initial.oid
    assert published.oid == out["second"] and hub.refs("alice/retry") == {"main": published.oid}
    assert [r.status for r in hub.requests if r.endpoint == "commit"] == [500, 200]
    # The objects uploaded before the failed commit were kept: the retry sent no byte again.
    assert hub.count("lfs-upload") == 2 and hub.count("lfs-batch") == 2
    assert hub.files("alice/retry").keys() == {".gitattributes", *files}


def test_lfs_upload_is_retried_after_a_server_error(hub, tmp_path):
    weights = random.Random(2).randbytes(100_000)
    hub.create_repo("alice/flaky")
    hub.fail_next("lfs-upload", status=503)
    out = run_client(hub, tmp_path, """
        info = api.create_commit("alice/flaky", [CommitOperationAdd("model.gguf", params["weights"])],
                                 commit_message="gguf")
        out["oid"] = info.oid
    """, weights=str(_write(tmp_path / "model.gguf", weights)))
    assert [r.status for r in hub.requests if r.endpoint == "lfs-upload"] == [503, 200]
    assert hub.files("alice/flaky")["model.gguf"] == weights
    assert hub.commits("alice/flaky")[-1].oid == out["oid"]


def test_create_pr_opens_a_pull_request_ref(hub, tmp_path):
    hub.create_repo("alice/pr", files={"README.md": CARD})
    main_before = hub.refs("alice/pr")["main"]
    out = run_client(hub, tmp_path, """
        info = api.create_commit("alice/pr", [CommitOperationAdd("notes.txt", b"from a PR\\n")],
                                 commit_message="Propose notes", create_pr=True)
        out["pr"] = [info.pr_revision, info.pr_num, info.pr_url, info.oid]
        refs = api.list_repo_refs("alice/pr", include_pull_requests=True)
        out["prs"] = [[r.ref, r.target_commit] for r in refs.pull_requests]
        out["tree"] = sorted(e.path for e in api.list_repo_tree("alice/pr", revision=info.pr_revision))
        out["download"] = open(hf_hub_download("alice/pr", "notes.txt", revision=info.pr_revision)).read()
        out["missing_on_main"] = fails(hf_hub_download, "alice/pr", "notes.txt")
    """)
    pr_revision, pr_num, pr_url, oid = out["pr"]
    assert (pr_revision, pr_num, pr_url) == ("refs/pr/1", 1, f"{hub.url}/alice/pr/discussions/1")
    assert out["prs"] == [["refs/pr/1", oid]]
    assert hub.refs("alice/pr") == {"main": main_before, "refs/pr/1": oid}
    assert "notes.txt" not in hub.files("alice/pr")
    assert hub.files("alice/pr", "refs/pr/1")["notes.txt"] == b"from a PR\n"
    assert out["tree"] == [".gitattributes", "README.md", "notes.txt"]
    assert out["download"] == "from a PR\n"
    assert out["missing_on_main"][0] == "RemoteEntryNotFoundError"
    assert [r.path for r in hub.requests if r.endpoint == "commit"] == ["/api/models/alice/pr/commit/main?create_pr=1"]


def test_server_refuses_what_the_hub_refuses(hub):
    hub.create_repo("alice/strict", files={"README.md": b"# hi\n"})
    head = hub.refs("alice/strict")["main"]
    header = {"key": "header", "value": {"summary": "sneaky"}}
    commit = "/api/models/alice/strict/commit/main"
    never_uploaded = {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "ab" * 32,
                                                  "size": 3}}
    status, _, body = call(hub, "POST", commit, ndjson(header, never_uploaded), content_type="application/x-ndjson")
    assert status == 400 and b"does not exist" in body
    binary_as_git_blob = {"key": "file", "value": {"path": "w.safetensors", "content": "AAEC", "encoding": "base64"}}
    status, _, body = call(hub, "POST", commit, ndjson(header, binary_as_git_blob))
    assert status == 400 and b"LFS" in body
    under_a_file = {"key": "file", "value": {"path": "README.md/notes.txt", "content": "aGk=", "encoding": "base64"}}
    status, _, body = call(hub, "POST", commit, ndjson(header, under_a_file))
    assert status == 400 and b"both a file and a folder" in body
    status, headers, _ = call(hub, "POST", commit, ndjson(header, {"key": "deletedFile", "value": {"path": "x"}}))
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert call(hub, "POST", commit, ndjson(header), token=None)[0] == 401
    assert call(hub, "POST", commit, ndjson(header), token=READ_TOKEN)[0] == 403
    # Anyone with a write token may open a pull request, not push to main.
    assert call(hub, "POST", commit, ndjson(header), token=OUTSIDER_TOKEN)[0] == 403
    assert call(hub, "POST", commit + "?create_pr=1", ndjson(header), token=OUTSIDER_TOKEN)[0] == 200
    assert hub.refs("alice/strict").keys() == {"main", "refs/pr/1"}
    status, headers, _ = call(hub, "POST", commit, ndjson(header), token="hf_forged")
    assert status == 401 and headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    assert hub.refs("alice/strict")["main"] == head  # nothing above reached main

    # An upload URL only takes the bytes announced in the batch call.
    data = b"weights"
    oid = hashlib.sha256(data).hexdigest()
    _, _, body = call(hub, "POST", "/alice/strict.git/info/lfs/objects/batch",
                      {"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]})
    upload_url = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    assert call(hub, "PUT", urlsplit(upload_url).path, b"tampered", token=None)[0] == 400
    verify = {"oid": oid, "size": len(data)}
    assert call(hub, "POST", "/alice/strict.git/info/lfs/objects/verify", verify)[0] == 404
    assert call(hub, "PUT", urlsplit(upload_url).path, data, token=None)[0] == 200
    assert call(hub, "PUT", urlsplit(upload_url).path, data, token=None)[0] == 200  # a retry is harmless
    assert call(hub, "POST", "/alice/strict.git/info/lfs/objects/verify", verify)[0] == 200

    # The Hub's error codes, which the client turns into specific exceptions.
    for path, code in [("/alice/strict/resolve/main/nope.txt", "EntryNotFound"),
                       ("/alice/strict/resolve/v9/README.md", "RevisionNotFound"),
                       ("/alice/gone/resolve/main/README.md", "RepoNotFound")]:
        status, headers, _ = call(hub, "HEAD", path)
        assert (status, headers.get("X-Error-Code")) == (404, code), path
    assert call(hub, "HEAD", "/alice/strict/resolve/main/nope.txt")[1]["X-Repo-Commit"] == head

