"""Recipe inputs: paths on disk, or built-in models so that every shipped recipe runs as is.

* ``demo:NAME`` - the trained demo model (``convkit/tiny/demo``, SDXL architecture):
  ``base``, ``custom`` and ``lightning`` full checkpoints, ``lightning-lora`` (lightning - base,
  rank 32, kohya names) — the same files ``convkit demo`` makes.
* ``tiny:ARCH`` - a seeded tiny model of the real diffusers classes as a diffusers folder
  (``tiny:flux_dev``): random weights, real layout.

Built-in inputs are made once per convkit version in the cache (``convkit.runtime.cache_root``),
under a lock, each file renamed into place whole, so parallel runs share them.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from .. import __version__
from ..errors import InputFormatError, UnknownNameError

DEMO_INPUTS = ("base", "custom", "lightning", "lightning-lora")


def is_builtin(path: str) -> bool:
    return path.startswith(("demo:", "tiny:"))


def resolve(path: str, where: str = "") -> Path:
    """The file or folder an input names; built-in inputs are made if needed."""
    if path.startswith("demo:"):
        return _demo(path[5:])
    if path.startswith("tiny:"):
        return _tiny(path[5:])
    p = Path(path).expanduser()
    if not p.exists():
        raise InputFormatError("no such file or folder", path=path,
                               hint=f"{where}: give it with --set" if where else None)
    return p


def identity(p: Path) -> dict:
    """What a recipe's content keys say about an input on disk: name, size and modification time
    of each file (hashing tens of GB on every run would cost more than the runs it saves)."""
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*")
                                            if f.is_file() and not f.name.startswith("."))
    rows = []
    for f in files:
        st = f.stat()
        rel = f.name if f == p else f.relative_to(p).as_posix()
        rows.append([rel, st.st_size, st.st_mtime_ns])
    return {"path": str(p.resolve()), "files": rows}


def _cache(kind: str) -> Path:
    from ..runtime import cache_root

    d = Path(cache_root()) / "recipe-inputs" / f"{kind}-{__version__}"
    d.mkdir(parents=True, exist_ok=True)
    return d


class _Lock:
    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def __enter__(self):
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _demo(name: str) -> Path:
    from ..demo_scenario import DEMO_DIR, LORA_RANK, demo_available, demo_spec, with_unet

    if name not in DEMO_INPUTS:
        raise UnknownNameError("demo input", name, DEMO_INPUTS)
    if not demo_available():
        raise InputFormatError("the demo model is not installed", path=str(DEMO_DIR),
                               hint="reinstall convkit, or train it: python tools/train_demo.py")
    d = _cache("demo")
    out = d / (f"{name}.safetensors")
    if out.is_file():
        return out
    # what this one is made from is made first (the lock is not re-entrant)
    needs = {"custom": ("base",), "lightning": ("base",),
             "lightning-lora": ("lightning", "base")}.get(name, ())
    made = [_demo(n) for n in needs]
    with _Lock(d):
        if out.is_file():
            return out
        tmp = d / f".{name}.{os.getpid()}.tmp.safetensors"
        try:
            if name == "base":
                shutil.copyfile(DEMO_DIR / "base.safetensors", tmp)
            elif name in ("custom", "lightning"):
                with_unet(made[0], DEMO_DIR / f"{name}_unet.safetensors", tmp,
                          demo_spec()["components"]["unet"])
            else:   # the Lightning LoRA, as convkit demo extracts it
                from ..lora.extract import extract_lora

                extract_lora(made[0], made[1], tmp, rank=LORA_RANK, overwrite=True)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def _tiny(arch: str) -> Path:
    from .. import tiny

    tiny.spec(arch)         # an unknown name fails here, with the nearest one
    d = _cache("tiny")
    out = d / arch
    if out.is_dir():
        return out
    with _Lock(d):
        if out.is_dir():
            return out
        tmp = d / f".{arch}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tiny.save_diffusers(tiny.build(arch, 0), tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def digest(obj) -> str:
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
