"""Where each part goes for one tool (``split --for``), from ``formats/layouts/<tool>.toml``;
registered as kind ``layout-target``. Part names (unet, clip_l, clip_g, t5, vae, lora) and the
components they are come from ``formats/layouts/part_names.toml``."""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import archs, registry
from ..data import list_files, load_toml
from ..errors import UsageError

PART_NAMES_FILE = "layouts/part_names.toml"


def part_names() -> dict[str, dict]:
    return load_toml(PART_NAMES_FILE)["parts"]


def component_of(arch: archs.Arch, part: str) -> str | None:
    """The component of ``arch`` that part ``part`` is (None when it has none)."""
    spec = part_names().get(part)
    if spec is None:
        from ..errors import UnknownNameError
        raise UnknownNameError("part", part, list(part_names()) + ["lora"])
    return next((c for c, comp in arch.components.items() if comp.keymap in spec["keymaps"]),
                None)


def part_of(arch: archs.Arch, comp: str) -> str:
    km = arch.components[comp].keymap
    return next(p for p, spec in part_names().items() if km in spec["keymaps"])


@dataclass(frozen=True)
class PartRule:
    part: str
    file: str                  # pattern under -o: {name}, {component}, {rank}
    naming: str = "single"     # single | diffusers
    prefix: str = ""           # "@full": the architecture's full single-file prefix
    loader: str = ""
    format: str = ""           # lora: the LoRA format written
    archs: tuple[str, ...] = ()
    gguf_loader: str = ""      # what loads the part when it is a GGUF (--to gguf:...)

    def prefix_for(self, arch: archs.Arch, comp: str) -> str:
        if self.prefix == "@full":
            return arch.layout(arch.single_file_layout).prefixes[comp]
        return self.prefix


@dataclass(frozen=True)
class LayoutTarget:
    name: str
    title: str
    rules: dict = field(hash=False, compare=False)       # part -> [PartRule]
    diffusers_folder: bool = False

    def rule(self, arch: archs.Arch, part: str) -> PartRule:
        for r in self.rules.get(part, ()):
            if not r.archs or arch.name in r.archs:
                return r
        raise UsageError(f"split --for {self.name} has no place for {part} of {arch.title}")


def _parse(name: str, d: dict) -> LayoutTarget:
    rules = {part: tuple(PartRule(part, r["file"], r.get("naming", "single"), r.get("prefix", ""),
                                  r.get("loader", ""), r.get("format", ""),
                                  tuple(r.get("archs", ())), r.get("gguf_loader", ""))
                         for r in rs)
             for part, rs in d["parts"].items()}
    return LayoutTarget(name, d.get("title", name), rules, d.get("diffusers_folder", False))


def _register() -> None:
    for rel in list_files("layouts"):
        d = load_toml(rel)
        if "parts" in d and "title" in d:
            name = rel.rsplit("/", 1)[-1].removesuffix(".toml")
            registry.add("layout-target", name, _parse(name, d), help=d["title"])


_register()


def get(name: str) -> LayoutTarget:
    return registry.get("layout-target", name)
