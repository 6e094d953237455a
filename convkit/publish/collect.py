"""What a release folder holds, as the model card describes it: each file with its size, sha256,
format, the tool that loads it and from which folder, and its gate scores.

A folder a recipe made has a run record (``convkit-run.json``): the files, their sha256, what
made each and how it was verified come from there (a file changed since is hashed again). Any
other folder is described from the files themselves (``convkit inspect``).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import data
from ..errors import UsageError
from ..recipes import state
from ..recipes.worker import sha256_file

SKIP = {state.MANIFEST, state.LOCK, "README.md"}
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


@dataclass
class FileEntry:
    path: str                   # in the repo (= in the folder), POSIX
    local: Path
    bytes: int
    sha256: str
    artifact: str | None = None
    kind: str = "other"         # checkpoint, diffusion_model, gguf, lora, diffusers, part, ...
    format: str = ""
    loader: str = ""
    about: str = ""
    gate: dict | None = None    # {"kind", "ok", "psnr", "ssim", "report"}
    architecture: str | None = None


@dataclass
class Release:
    folder: Path
    files: list[FileEntry]
    record: dict = field(default_factory=dict)
    weights: list[FileEntry] = field(default_factory=list)
    images: list[FileEntry] = field(default_factory=list)
    failed_gates: list[str] = field(default_factory=list)
    architectures: set[str] = field(default_factory=set)
    ops: set[str] = field(default_factory=set)


def _entry(folder: Path, rel: str, known: dict | None) -> FileEntry:
    p = folder / rel
    st = p.stat()
    if known and known.get("bytes") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        sha = known["sha256"]       # the run hashed it and it has not changed since
    else:
        sha = sha256_file(p)
    return FileEntry(rel, p, st.st_size, sha)


def collect(folder) -> Release:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError("not a folder", path=str(folder),
                         hint="give the output folder of convkit run (or any folder of files)")
    record = state.load(folder)
    rel = _from_record(folder, record) if record.get("artifacts") else _from_files(folder)
    if not rel.weights:
        raise UsageError("nothing to publish: no .safetensors, .gguf or diffusers folder",
                         path=str(folder))
    return rel


def _from_record(folder: Path, record: dict) -> Release:
    info = record.get("artifact_info", {})
    rel = Release(folder, [], record)
    gates: dict[str, dict] = {}
    for name, a in record["artifacts"].items():
        meta = info.get(name, {})
        if a.get("op") != "verify":
            continue
        s = a.get("summary", {})
        if not s.get("ok", False):
            rel.failed_gates.append(name)
        for g in s.get("artifacts", []):     # paths relative to the folder (the worker's doing)
            gates[g["path"]] = {**g, "report": meta.get("path")}
        if s.get("contact_sheet"):
            img = f"{a['path']}/{s['contact_sheet']}"
            if (folder / img).is_file():
                e = _entry(folder, img, None)
                e.kind, e.artifact = "image", name
                rel.images.append(e)
    for name, a in record["artifacts"].items():
        meta = info.get(name, {})
        if a.get("op") == "verify" or not meta.get("publish", True):
            continue
        rel.ops.add(a["op"])
        known = {f["path"]: f for f in a.get("files", [])}
        top = folder / a["path"]
        for rel_path, f in known.items():
            if not (folder / rel_path).is_file():
                raise UsageError(f"{rel_path} of artifact {name} is missing", path=str(folder),
                                 hint="run the recipe again")
            e = _entry(folder, rel_path, f)
            e.artifact, e.about = name, meta.get("about", "")
            e.gate = gates.get(rel_path) or gates.get(a["path"])
            rel.files.append(e)
        _describe(rel, [x for x in rel.files if x.artifact == name], {**a, **meta}, top)
    rec = folder / "recipe.toml"
    if rec.is_file():
        e = _entry(folder, "recipe.toml", None)
        e.kind = "recipe"
        rel.files.append(e)
    rel.files += rel.images
    return rel


def _from_files(folder: Path) -> Release:
    rel = Release(folder, [])
    for p in sorted(folder.rglob("*")):
        r = p.relative_to(folder).as_posix()
        if not p.is_file() or any(x.startswith(".") for x in Path(r).parts) or r in SKIP:
            continue
        rel.files.append(_entry(folder, r, None))
    diffusers_roots = {p.parent for p in folder.rglob("model_index.json")}
    for e in rel.files:
        root = next((d for d in diffusers_roots if d in e.local.parents), None)
        if root is not None:
            if e.path.endswith(WEIGHT_SUFFIXES):
                _classify_folder(rel, e, root)
        elif e.path.endswith(WEIGHT_SUFFIXES):
            _classify(rel, e, {})
        elif e.path.endswith(".png"):
            e.kind = "image"
            rel.images.append(e)
    return rel


def _describe(rel: Release, entries: list[FileEntry], a: dict, top: Path) -> None:
    manifest = top / "manifest.json" if top.is_dir() else None
    if manifest is not None and manifest.is_file():     # split parts: the manifest says
        _from_split_manifest(rel, entries, json.loads(manifest.read_text()))
        return
    if top.is_dir() and (top / "model_index.json").is_file():
        for e in entries:
            if e.path.endswith(WEIGHT_SUFFIXES):
                _classify_folder(rel, e, top)
        return
    for e in entries:
        if e.path.endswith(WEIGHT_SUFFIXES):
            _classify(rel, e, a)


def _from_split_manifest(rel: Release, entries: list[FileEntry], man: dict) -> None:
    by_path = {}
    for part in man.get("parts", []):
        for f in part.get("files", []):
            by_path[f["path"]] = (part, f)
    arch = man.get("architecture")
    for e in entries:
        hit = next((v for k, v in by_path.items() if e.path.endswith("/" + k) or e.path == k),
                   None)
        if hit is None:
            continue
        part, f = hit
        e.kind, e.loader, e.architecture = f"part_{part['part']}", part.get("loader", ""), arch
        e.format = f"{part['part']}, " + ", ".join(f.get("dtypes", []))
        rel.weights.append(e)
        if arch:
            rel.architectures.add(arch)


def _classify_folder(rel: Release, e: FileEntry, root: Path) -> None:
    cards = data.load_toml("publish/card.toml")
    e.kind, e.loader = "diffusers", cards["loaders"]["diffusers"]
    e.format = f"diffusers {e.local.parent.name}"
    rel.weights.append(e)
    arch = _folder_arch(root)
    if arch:
        e.architecture = arch
        rel.architectures.add(arch)


@functools.lru_cache(maxsize=None)
def _folder_arch(root: Path) -> str | None:
    """The architecture of a diffusers folder, detected from its weights as every command
    does (the pipeline class alone does not tell Flux dev from schnell)."""
    from .. import archs
    from ..errors import ConvkitError
    from ..sources import open_source

    try:
        with open_source(root) as src:
            return archs.detect(src).arch.name
    except ConvkitError:
        return None


def _classify(rel: Release, e: FileEntry, a: dict) -> None:
    from ..inspection import inspect

    cards = data.load_toml("publish/card.toml")["loaders"]
    info = inspect(e.local)
    arch = info.get("architecture")
    if info.get("lora"):
        e.kind = "lora"
        lo = info["lora"]
        arch = arch or lo.get("architecture")
        e.format = "LoRA" + (f", {lo.get('format')}" if lo.get("format") else "") + \
            (f", rank {lo['rank']}" if lo.get("rank") else "")
    else:
        comps = list(info.get("components", {}))
        quant = str(info.get("quantization") or "")
        full = len(comps) > 1
        if e.path.endswith(".gguf"):
            sdcpp = a.get("options", {}).get("layout") == "sdcpp"    # quantize --layout
            e.kind = "gguf_sdcpp" if sdcpp else "gguf"
        elif "nf4" in quant.lower() or "fp4" in quant.lower():
            e.kind = "checkpoint_nf4" if full else "diffusion_model_nf4"
        else:
            e.kind = "checkpoint" if full else "diffusion_model"
        e.format = _format_label(info, quant)
    e.loader = cards.get(e.kind, "")
    e.architecture = arch
    if arch:
        rel.architectures.add(arch)
    rel.weights.append(e)


def _format_label(info: dict, quant: str) -> str:
    storage = info.get("storage", {})
    floats = {k: v for k, v in storage.items() if k in ("F16", "BF16", "F32")}
    main = max(floats, key=floats.get) if floats else ""
    comps = list(info.get("components", {}))
    what = "full checkpoint" if len(comps) > 1 else (comps[0] if comps else "weights")
    enc = quant or {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}.get(main, main)
    return f"{what}, {enc}" if enc else what
