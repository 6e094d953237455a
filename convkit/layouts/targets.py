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
    """The component of ``arch`` that part ``part`` is (None when it has none): the one whose
    ``part`` (formats/<arch>.toml) names it, else the one whose key map the part's table lists."""
    spec = part_names().get(part)
    if spec is None:
        from ..errors import UnknownNameError
        raise UnknownNameError("part", part, list(part_names()) + ["lora"])
    named = next((c for c, comp in arch.components.items() if comp.part == part), None)
    if named is not None:
        return named
    return next((c for c, comp in arch.components.items()
                 if not comp.part and comp.keymap in spec["keymaps"]), None)


def part_of(arch: archs.Arch, comp: str) -> str:
    """The part name of component ``comp``: its own ``part`` when the key map does not say it
    (SD3's two clip_proj encoders: clip_l, clip_g), else formats/layouts/part_names.toml's."""
    c = arch.components[comp]
    if c.part:
        return c.part
    found = next((p for p, spec in part_names().items() if c.keymap in spec["keymaps"]), None)
    if found is None:
        raise UsageError(f"{arch.title}'s {comp} (key map {c.keymap}) is no split/assemble part",
                         hint=f"give it part = \"...\" in {arch.source_file} or list its key "
                              f"map in formats/{PART_NAMES_FILE}")
    return found


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
    #: the rule holds for architectures whose diffusion model has one of these key map kinds
    #: (formats/keymaps/index.toml: "mmdit" = every SD3/SD3.5), as ``archs`` names them
    diffusion: tuple[str, ...] = ()

    def holds_for(self, arch: archs.Arch) -> bool:
        if self.archs and arch.name not in self.archs:
            return False
        return not self.diffusion or \
            arch.components[arch.diffusion_component].keymap in self.diffusion

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
            if r.holds_for(arch):
                return r
        raise UsageError(f"split --for {self.name} has no place for {part} of {arch.title}")


def _parse(name: str, d: dict) -> LayoutTarget:
    rules = {part: tuple(PartRule(part, r["file"], r.get("naming", "single"), r.get("prefix", ""),
                                  r.get("loader", ""), r.get("format", ""),
                                  tuple(r.get("archs", ())), r.get("gguf_loader", ""),
                                  tuple(r.get("diffusion", ())))
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
