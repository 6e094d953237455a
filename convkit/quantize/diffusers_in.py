"""diffusers-folder input for quantize: the folder seen with single-file (SGM / ComfyUI-Flux) names.

Each single-file tensor is a recipe over the folder's tensors, found with ``convkit.keymap``:
one source tensor (possibly transformed: VAE attention ``conv1x1``, Flux ``swap_halves``), or the
concatenation along dim 0 of several (Flux fused qkv / linear1, OpenCLIP ``in_proj``), or a
tensor real single files carry that diffusers has no parameter for (CLIP ``position_ids``,
OpenCLIP ``logit_scale``). Shapes and dtypes are worked out on ``meta`` tensors, so nothing is
read until the quantize plan streams the tensor; fused tensors are assembled on load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import dtypes, keymap
from ..sources.base import TensorInfo, TensorSource


def _config(folder: Path) -> dict | None:
    f = folder / "config.json"
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


class SingleFileView(TensorSource):
    """A diffusers folder (``DiffusersFolder``) presented with single-file names."""

    def __init__(self, inner: TensorSource, det):
        super().__init__(path=inner.path, format="diffusers-mapped", metadata=dict(inner.metadata))
        from ..keymap import _fwd, _make_extra

        self.inner = inner
        self._fwd = _fwd
        self._recipes: dict[str, tuple] = {}
        comps = keymap.components(det.arch.name)
        for comp, keys in det.component_keys.items():
            if comp not in comps:
                continue
            kind, prefix = comps[comp]
            dprefix = det.layout.prefixes.get(comp, "")
            names = {k[len(dprefix):]: k for k in keys}
            meta = {n: torch.empty(inner.info(k).shape, dtype=dtypes.to_torch(inner.info(k).dtype),
                                   device="meta") for n, k in names.items()}
            folder = inner.path / dprefix.rstrip("/") if dprefix else inner.path
            km = keymap.get_map(kind, _config(folder), names=list(meta), side="d", sd=meta)
            recipes: dict[str, tuple] = {
                single: ("map", transform, [names[n] for n in parts])
                for single, (transform, parts) in keymap.single_file_recipes(
                    kind, km, list(names), where=f" of '{comp}'").items()}
            shapes = {s: self._assemble(r, meta_of=lambda k: meta[k[len(dprefix):]])
                      for s, r in recipes.items()}
            for e in km.extras:
                made = _make_extra(e, shapes)
                if made is not None:
                    recipes[e.single] = ("const", made)
                    shapes[e.single] = made
            for s, r in recipes.items():
                t = shapes[s]
                name = prefix + s
                self._recipes[name] = r
                src_infos = [inner.info(k) for k in r[2]] if r[0] == "map" else []
                self._infos[name] = TensorInfo(
                    name, dtypes.from_torch(t.dtype), tuple(t.shape),
                    sum(i.nbytes for i in src_infos) or t.numel() * t.element_size(),
                    storage=src_infos[0].storage if src_infos else "")

    def _assemble(self, recipe, meta_of=None) -> torch.Tensor:
        kind, *rest = recipe
        if kind == "const":
            return rest[0]
        transform, keys = rest
        load = meta_of or self.inner.load
        parts = [load(k) for k in keys]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return self._fwd(transform, t)

    def _load(self, name: str) -> torch.Tensor:
        t = self._assemble(self._recipes[name])
        return t.contiguous()

    # ranges of a tensor that is one folder tensor under another name go straight through
    def _simple(self, name: str) -> str | None:
        r = self._recipes[name]
        if r[0] == "map" and r[1] in (None, "conv1x1") and len(r[2]) == 1:
            return r[2][0]
        return None

    def chunkable(self, name: str) -> bool:
        k = self._simple(name)
        return k is not None and self.inner.chunkable(k)

    def granule(self, name: str) -> int:
        k = self._simple(name)
        return self.inner.granule(k) if k else 0

    def is_direct(self, name: str) -> bool:
        k = self._simple(name)
        return k is not None and self.inner.is_direct(k)

    def read_logical(self, name, start, count, out, scratch=None):
        return self.inner.read_logical(self._simple(name), start, count, out, scratch)

    def stored_span(self, name, start, count):
        return self.inner.stored_span(self._simple(name), start, count)

    @property
    def supports_ranges(self) -> bool:
        return self.inner.supports_ranges

    def files(self):
        return self.inner.files()

    def close(self):
        self.inner.close()
