"""What runs one artifact, wherever it runs (this process, a local worker process, a Ray task):
the payload is plain data, the result is plain data (files with sizes and sha256, the
operation's summary), so every executor moves it the same way."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from .. import provenance
from ..progress import Progress

#: a worker process's terminal line for its progress bars (set by the local pool's initializer)
POSITION: int | None = None


def sha256_file(p: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def artifact_files(root: Path, path: Path) -> list[dict]:
    """Every file an artifact consists of, relative to the output folder, with its identity."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    out = []
    for f in files:
        st = f.stat()
        out.append({"path": f.relative_to(root).as_posix(), "bytes": st.st_size,
                    "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(f)})
    return out


def run_task(payload: dict) -> dict:
    from . import ops

    op = ops.get(payload["op"])
    root = Path(payload["root"])
    out = root / payload["path"]
    out.parent.mkdir(parents=True, exist_ok=True)
    opts = dict(payload["options"])
    if opts.get("extras"):          # quantize --extras: a folder of the run, not of the cwd
        opts["extras"] = str(root / opts["extras"])
    progress = Progress(enabled=payload.get("progress", False), label=payload["artifact"],
                        position=POSITION)
    t0 = time.perf_counter()
    with provenance.extra({"convkit.recipe": payload["recipe"],
                           "convkit.artifact": payload["artifact"],
                           "convkit.content_key": payload["key"]}):
        result = op.run(opts, out, progress=progress)
    seconds = time.perf_counter() - t0
    files = artifact_files(root, out)
    if opts.get("extras"):
        files += artifact_files(root, Path(opts["extras"]))
    return {"summary": _relative(op.summarise(result), root), "seconds": round(seconds, 2),
            "files": files}


def _relative(summary: dict, root: Path) -> dict:
    """Paths a summary names (verify's artifacts) relative to the output folder: the record
    must not depend on the directory the run was started from."""
    base = root.resolve()
    for a in summary.get("artifacts", []):
        p = Path(a["path"]).resolve()
        if base in p.parents:
            a["path"] = p.relative_to(base).as_posix()
    return summary
