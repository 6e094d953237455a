"""diffusers folders: model_index.json + one folder per component, single or sharded weights.

Keys are exposed as ``<component>/<name>`` (``unet/conv_in.weight``), so a folder looks like one
flat checkpoint whose component prefixes are folder names. A lone component folder (config.json
plus weights, no model_index.json) is read with no prefix.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputFormatError
from .base import TensorInfo, TensorSource
from .files import open_file
from .jsonsafe import loads

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def component_weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The weight files of one component folder, preferring safetensors, honouring shards."""
    for stem in WEIGHT_NAMES:
        base = f"{stem}.{variant}" if variant else stem
        index = folder / f"{base}.safetensors.index.json"
        if index.exists():
            try:
                weight_map = loads(index.read_bytes(), "shard index")["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise InputFormatError(f"shard index has no valid weight_map ({e})",
                                       path=index) from None
            if not all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..")
                       for f in files):
                raise InputFormatError("shard index names files outside its folder", path=index)
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise InputFormatError(f"shard(s) missing: {', '.join(missing)}", path=index,
                                       hint="the download is incomplete")
            return [folder / f for f in files]
        single = folder / f"{base}.safetensors"
        if single.exists():
            return [single]
    for stem in WEIGHT_NAMES:
        base = f"{stem}.{variant}" if variant else stem
        for ext in (".bin", ".pt"):
            if (folder / f"{base}{ext}").exists():
                return [folder / f"{base}{ext}"]
    return []


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").exists()
                              or ((path / "config.json").exists()
                                  and bool(component_weight_files(path))))


# model_index.json classes that have no weights of their own (tokenizers, schedulers, image
# processors): every other listed class is a model whose folder must hold weights
_WEIGHTLESS = ("Tokenizer", "TokenizerFast", "Scheduler", "Processor", "FeatureExtractor")


class DiffusersFolder(TensorSource):
    def __init__(self, path, variant: str | None = None):
        path = Path(path)
        super().__init__(path=path, format="diffusers")
        self.components: dict[str, list[Path]] = {}
        self.model_index: dict = {}
        self._parts: dict[str, tuple[TensorSource, str]] = {}
        self._sources: list[TensorSource] = []
        if (path / "model_index.json").exists():
            try:
                self.model_index = loads((path / "model_index.json").read_bytes(),
                                         "model_index.json")
            except ValueError as e:
                raise InputFormatError(str(e), path=path) from None
            if not isinstance(self.model_index, dict):
                raise InputFormatError("model_index.json is not a JSON object", path=path)
            names = [k for k, v in self.model_index.items()
                     if not k.startswith("_") and isinstance(v, list)]
            prefixes = {n: f"{n}/" for n in names}
        else:  # a lone component folder (e.g. just unet/): its keys carry no prefix
            prefixes = {"": ""}
        self.lone_component = not self.model_index
        self.configs: dict[str, dict] = {}      # component -> its config.json (if any)
        self.component_metadata: dict[str, dict] = {}   # component -> its first file's metadata
        for comp, prefix in prefixes.items():
            folder = path / comp if comp else path
            files = component_weight_files(folder, variant) if folder.is_dir() else []
            if not files:
                cls = self.model_index.get(comp, [None, None])[-1] if comp else None
                if cls and not str(cls).endswith(_WEIGHTLESS):
                    raise InputFormatError(
                        f"{comp}/ is in model_index.json ({cls}) but has no weights"
                        + (f" for variant '{variant}'" if variant else ""), path=path,
                        hint=f"add the {comp} weights, or set \"{comp}\": [null, null] in "
                             "model_index.json to say the model has none")
                continue
            self.components[comp] = files
            cfg = folder / "config.json"
            if cfg.is_file():
                try:
                    c = loads(cfg.read_bytes(), "config.json")
                except ValueError as e:
                    raise InputFormatError(str(e), path=cfg) from None
                if isinstance(c, dict):
                    self.configs[comp] = c
            for f in files:
                src = open_file(f)
                self._sources.append(src)
                for info in src.infos():
                    key = prefix + info.name
                    self._infos[key] = TensorInfo(key, info.dtype, info.shape, info.nbytes,
                                                  info.storage)
                    self._parts[key] = (src, info.name)
                if not self.metadata and src.metadata:
                    self.metadata = dict(src.metadata)
                if comp not in self.component_metadata:
                    self.component_metadata[comp] = dict(src.metadata or {})
        if not self._infos:
            raise InputFormatError("no weight files found (expected <component>/"
                                   "diffusion_pytorch_model.safetensors or model.safetensors)",
                                   path=path)

    def _load(self, name: str) -> torch.Tensor:
        src, inner = self._parts[name]
        return src.load(inner)

    @property
    def supports_ranges(self) -> bool:
        return all(s.supports_ranges for s in self._sources)

    def read_range(self, name: str, start: int, out: torch.Tensor) -> None:
        src, inner = self._parts[name]
        src.read_range(inner, start, out)

    def files(self) -> list[Path]:
        return [f for fs in self.components.values() for f in fs]

    def close(self) -> None:
        for s in self._sources:
            s.close()
