"""CLIP text tokenizers without a download.

The BPE merges ship in ``formats/tokenizers/`` (with their licence); the vocabulary is derived
from them as CLIP does (``formats/tokenizers/clip.toml``). :func:`clip_tokenizer_folder` writes a
Hub-style tokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json) once per kind into convkit's cache, and :func:`clip_tokenizer` loads it
with transformers' own ``CLIPTokenizer`` — the same class and files a diffusers pipeline loads
from a model folder, so token ids are the real ones.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

from . import data
from .errors import InputFormatError, UnknownNameError
from .runtime import cache_root

_SPEC = "tokenizers/clip.toml"


def _spec() -> dict:
    return data.load_toml(_SPEC)


def kinds() -> tuple[str, ...]:
    """Every tokenizer kind convkit ships: the CLIP ones and T5."""
    return tuple(_spec()["kinds"]) + ("t5",)


def _t5_files() -> dict[str, bytes]:
    spec = data.load_toml("tokenizers/t5.toml")
    path = data.path("tokenizers/" + spec["file"])
    raw = gzip.decompress(path.read_bytes())
    if hashlib.sha256(raw).hexdigest() != spec["sha256"]:
        raise InputFormatError(f"{path}: not the T5 tokenizer convkit ships (sha256 differs); "
                               "reinstall convkit or fix CONVKIT_FORMATS_DIR")
    cfg = dict(spec["config"])
    special = {k: cfg[k] for k in ("eos_token", "pad_token", "unk_token")}
    return {"tokenizer.json": raw,
            "tokenizer_config.json": json.dumps(cfg, indent=2).encode("utf-8"),
            "special_tokens_map.json": json.dumps(special, indent=2).encode("utf-8")}


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in CLIP's vocabulary order
    (the printable bytes as themselves, then the others mapped to 256 + n)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49,408-entry vocabulary and its merges, from the shipped BPE file."""
    spec = _spec()
    path = data.path("tokenizers/" + spec["bpe"])
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != spec["bpe_sha256"]:
        raise InputFormatError(f"{path}: not the CLIP BPE file convkit ships (sha256 differs); "
                         "reinstall convkit or fix CONVKIT_FORMATS_DIR")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1:1 + spec["merges"]]
    syms = byte_symbols()
    tokens = syms + [s + "</w>" for s in syms] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != spec["vocab_size"]:
        raise InputFormatError(f"{path}: {len(tokens)} tokens derived, {spec['vocab_size']} expected")
    return {t: i for i, t in enumerate(tokens)}, merges


def tokenizer_files(kind: str) -> dict[str, bytes]:
    """The files of a Hub-style tokenizer folder of ``kind`` (clip_l, clip_g, t5)."""
    if kind == "t5":
        return _t5_files()
    spec = _spec()
    if kind not in spec["kinds"]:
        raise UnknownNameError("tokenizer", kind, tuple(spec["kinds"]))
    vocab, merges = vocab_and_merges()
    cfg = dict(spec["config"], **spec["kinds"][kind])
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"),
        "tokenizer_config.json": json.dumps(cfg, indent=2).encode("utf-8"),
        "special_tokens_map.json": json.dumps(special, indent=2).encode("utf-8"),
    }


def clip_tokenizer_folder(kind: str) -> Path:
    """A tokenizer folder for ``kind`` in convkit's cache (written once, atomically)."""
    spec = _spec() if kind != "t5" else data.load_toml("tokenizers/t5.toml")
    key = hashlib.sha256(json.dumps([spec, kind], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / "tokenizers" / f"{kind}-{key}"
    if (folder / "special_tokens_map.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=folder.parent))
    for name, blob in tokenizer_files(kind).items():
        (tmp / name).write_bytes(blob)
    try:
        os.rename(tmp, folder)
    except OSError:          # another process wrote it first
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    return folder


@functools.cache
def tokenizer(kind: str):
    """transformers' tokenizer of ``kind`` (CLIP or T5), loaded from the local folder."""
    if kind != "t5":
        return clip_tokenizer(kind)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(clip_tokenizer_folder(kind)), local_files_only=True)


@functools.cache
def clip_tokenizer(kind: str):
    """transformers' ``CLIPTokenizer`` of ``kind``, loaded from the local folder."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder(kind)), local_files_only=True)
