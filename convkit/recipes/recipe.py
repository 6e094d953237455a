"""A recipe: inputs, artifacts (each one registered operation with its options) and publishing
hints, read from TOML, with ``--set`` overrides, validated whole before anything runs.

::

    [recipe]
    name = "lightning-merge"
    output = "lightning-merge"          # default output folder (-o overrides)

    [vars]
    stem = "custom-lightning"           # {stem} in paths and string options

    [inputs.model]
    path = "demo:custom"                # a file, a folder, or a built-in demo:/tiny: input
    hub = "RunDiffusion/Juggernaut-XL"  # optional, for the model card
    license = "openrail++"

    [artifacts.merged]
    op = "merge-lora"                   # any registered operation (convkit.recipes.ops)
    base = "@model"                     # @input or @artifact, @name/sub/path, @name:WEIGHT
    loras = ["@lora:1.0"]
    path = "{stem}-fp16.safetensors"    # inside the output folder
    about = "full checkpoint, fp16"     # for the model card

Every problem found is reported together, each naming the recipe file and the key.
"""
from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .. import registry
from ..errors import ConvkitError, UnknownNameError, UsageError, raise_all
from .ops import Operation, Opt

ARTIFACT_FIELDS = {"op", "path", "about", "publish", "needs"}
INPUT_FIELDS = {"path", "about", "hub", "license", "demo_vars"}
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
REF = re.compile(r"^@(?P<node>[A-Za-z][A-Za-z0-9_-]*)(?P<sub>/[^:]*)?(?::(?P<weight>[-+0-9.eE]+))?$")


class RecipeError(UsageError):
    """Something in the recipe itself (exit 2)."""


@dataclass(frozen=True)
class Ref:
    node: str
    sub: str | None = None          # a file inside a folder artifact
    weight: str | None = None       # LoRA weight suffix, kept as written

    def text(self) -> str:
        return f"@{self.node}{self.sub or ''}" + (f":{self.weight}" if self.weight else "")


@dataclass
class Input:
    name: str
    path: str
    about: str = ""
    hub: str = ""
    license: str = ""


@dataclass
class Artifact:
    name: str
    op: Operation
    path: str                       # relative to the output folder, POSIX
    options: dict[str, Any]         # every option of the op (defaults filled); refs as Ref
    about: str = ""
    publish: bool = True
    needs: tuple[str, ...] = ()     # ordering-only dependencies

    def refs(self) -> list[Ref]:
        out = []
        for k, v in self.options.items():
            if self.op.options[k].is_input:
                out += [v] if isinstance(v, Ref) else [x for x in (v or ()) if isinstance(x, Ref)]
        return out

    def deps(self, artifacts) -> list[str]:
        names = [r.node for r in self.refs() if r.node in artifacts] + list(self.needs)
        return list(dict.fromkeys(names))


@dataclass
class Recipe:
    name: str
    source: Path | None
    text: str
    description: str
    output: str
    vars: dict[str, str]
    inputs: dict[str, Input]
    artifacts: dict[str, Artifact]          # in a valid run order
    publish: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    def order(self) -> list[str]:
        return list(self.artifacts)


# --- loading --------------------------------------------------------------------------------

def find_recipe(name_or_path: str) -> Path:
    """A recipe file, or the name of a shipped one (``lightning-merge``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = shipped_recipes()
    stem = p.name[:-5] if p.name.endswith(".toml") else p.name
    if stem in shipped and not p.parent.name:
        return shipped[stem]
    if p.suffix == ".toml" or "/" in name_or_path:
        raise RecipeError("no such recipe file", path=name_or_path,
                          hint=f"shipped recipes: {', '.join(sorted(shipped))}")
    raise UnknownNameError("recipe", stem, shipped)


def shipped_recipes() -> dict[str, Path]:
    from importlib import resources

    d = Path(str(resources.files("convkit.recipe_files")))
    return {f.stem: f for f in sorted(d.glob("*.toml"))}


def load(name_or_path: str, sets: list[str] = ()) -> Recipe:
    path = find_recipe(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"not valid TOML: {e}", path=path) from None
    return parse(doc, path, text, list(sets))


def _value(text: str) -> Any:
    """A --set value: a TOML value if it reads as one (numbers, booleans, lists), else text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_sets(doc: dict, sets: list[str], path) -> tuple[list[ConvkitError], set[str]]:
    """Apply ``--set`` overrides to the document; returns the problems and the variables set."""
    errors: list[ConvkitError] = []
    explicit: set[str] = set()
    inputs = doc.setdefault("inputs", {})
    vars_ = doc.setdefault("vars", {})
    arts = doc.setdefault("artifacts", {})
    for s in sets:
        key, eq, raw = s.partition("=")
        key = key.strip()
        if not eq or not key:
            errors.append(RecipeError(f"--set '{s}' is not KEY=VALUE", path=path,
                                      hint="e.g. --set model=/models/juggernautXL.safetensors"))
            continue
        val = _value(raw.strip())
        parts = key.split(".")
        if len(parts) == 1:         # a bare name: an input's path, else a variable
            if key in inputs:
                parts = ["inputs", key, "path"]
            elif key in vars_:
                parts = ["vars", key]
            else:
                known = [*inputs, *vars_]
                errors.append(_unknown(path, f"--set {key}", "input or variable", key, known))
                continue
        if parts[0] == "inputs" and len(parts) == 2:
            parts.append("path")
        if parts[0] not in ("inputs", "vars", "artifacts", "recipe", "publish"):
            errors.append(_unknown(path, f"--set {key}", "section", parts[0],
                                   ["inputs", "vars", "artifacts", "recipe", "publish"]))
            continue
        table = doc.setdefault(parts[0], {})
        for i, p in enumerate(parts[1:-1], 1):
            if parts[0] in ("inputs", "artifacts") and i == 1 and p not in table:
                known = list(table)
                errors.append(_unknown(path, f"--set {key}", parts[0][:-1], p, known))
                break
            table = table.setdefault(p, {})
        else:
            table[parts[-1]] = str(val) if parts[0] == "vars" else val
            if parts[0] == "vars":
                explicit.add(parts[-1])
    return errors, explicit


def _unknown(path, where: str, kind: str, name: str, known) -> RecipeError:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.4)
    return RecipeError(f"{where}: unknown {kind} '{name}'", path=path,
                       hint=f"did you mean '{close[0]}'?" if close else
                       (f"known: {', '.join(sorted(known))}" if known else None))


def parse(doc: dict, path: Path | None, text: str = "", sets: list[str] = ()) -> Recipe:
    errors, explicit = apply_sets(doc, list(sets), path)
    head = doc.get("recipe", {})
    name = str(head.get("name") or (path.stem if path else "recipe"))
    vars_ = {str(k): str(v) for k, v in doc.get("vars", {}).items()}
    vars_.setdefault("recipe", name)
    # settings that suit a built-in stand-in input (the demo model draws 64-pixel shapes) and
    # apply only while it is the input: a real model gets the recipe's own defaults
    for spec in doc.get("inputs", {}).values():
        if isinstance(spec, dict) and str(spec.get("path", "")).startswith(("demo:", "tiny:")):
            for k, v in spec.get("demo_vars", {}).items():
                if k not in explicit:
                    vars_[str(k)] = str(v)

    def expand(where: str, s: str) -> str:
        try:
            return s.format_map(vars_) if "{" in s else s
        except (KeyError, ValueError, IndexError) as e:
            errors.append(RecipeError(f"{where}: cannot fill in {e} in '{s}'", path=path,
                                      hint=f"variables: {', '.join(sorted(vars_))}"))
            return s

    inputs: dict[str, Input] = {}
    for n, spec in doc.get("inputs", {}).items():
        if isinstance(spec, str):
            spec = {"path": spec}
        if not NAME.match(n) or not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            errors.append(RecipeError(f"inputs.{n}: needs a name of letters, digits, - and _ "
                                      "and a path", path=path))
            continue
        for k in set(spec) - INPUT_FIELDS:
            errors.append(_unknown(path, f"inputs.{n}", "field", k, INPUT_FIELDS))
        inputs[n] = Input(n, expand(f"inputs.{n}.path", spec["path"]), str(spec.get("about", "")),
                          str(spec.get("hub", "")), str(spec.get("license", "")))

    artifacts: dict[str, Artifact] = {}
    raw_arts = doc.get("artifacts", {})
    if not raw_arts:
        errors.append(RecipeError("the recipe has no [artifacts.NAME] tables", path=path))
    seen_paths: dict[str, str] = {}
    for n, spec in raw_arts.items():
        a = _artifact(n, spec, path, expand, errors)
        if a is None:
            continue
        if n in inputs:
            errors.append(RecipeError(f"artifacts.{n}: the name is also an input's", path=path))
        norm = a.path.rstrip("/")
        if norm in seen_paths:
            errors.append(RecipeError(f"artifacts.{n}: path '{a.path}' is also "
                                      f"artifacts.{seen_paths[norm]}'s", path=path))
        seen_paths[norm] = n
        artifacts[n] = a

    _check_refs(artifacts, inputs, path, errors)
    raise_all(errors)
    order = _order(artifacts, path)
    return Recipe(name, path, text, str(head.get("description", "")),
                  expand("recipe.output", str(head.get("output") or name)), vars_, inputs,
                  {k: artifacts[k] for k in order}, dict(doc.get("publish", {})), list(sets))


def _artifact(n: str, spec, path, expand, errors: list) -> Artifact | None:
    where = f"artifacts.{n}"
    if not NAME.match(n) or not isinstance(spec, dict):
        errors.append(RecipeError(f"{where}: needs a name of letters, digits, - and _ and a "
                                  "table of options", path=path))
        return None
    if "op" not in spec:
        errors.append(RecipeError(f"{where}: no op (the operation that makes it)", path=path,
                                  hint=f"one of {', '.join(registry.canonical('operation'))}"))
        return None
    try:
        op: Operation = registry.get("operation", str(spec["op"]))
    except UnknownNameError as e:
        errors.append(RecipeError(f"{where}.op: {e.detail}", path=path, hint=e.hint))
        return None
    rel = spec.get("path")
    if not isinstance(rel, str) or not rel.strip():
        errors.append(RecipeError(f"{where}: no path (where the artifact goes, inside the "
                                  "output folder)", path=path))
        return None
    rel = expand(f"{where}.path", rel)
    pp = PurePosixPath(rel)
    if pp.is_absolute() or ".." in pp.parts or rel.startswith("~") or "\\" in rel:
        errors.append(RecipeError(f"{where}.path: '{rel}' is outside the output folder", path=path,
                                  hint="artifact paths are relative, without '..'"))
        return None
    options: dict[str, Any] = {}
    for k, v in spec.items():
        if k in ARTIFACT_FIELDS:
            continue
        key = k.replace("-", "_")
        if key not in op.options:
            errors.append(_unknown(path, where, f"option of {op.name}", k, op.options))
            continue
        options[key] = _check_value(op.options[key], v, f"{where}.{k}", path, expand, errors)
    for k, o in op.options.items():
        if k not in options:
            if o.required:
                errors.append(RecipeError(f"{where}: {op.name} needs '{k}'", path=path,
                                          hint=o.help or None))
            options[k] = o.default
    needs = spec.get("needs", [])
    return Artifact(n, op, str(pp), options, str(spec.get("about", "")),
                    bool(spec.get("publish", op.name != "verify")),
                    tuple(needs) if isinstance(needs, list) else (str(needs),))


def _check_value(o: Opt, v, where: str, path, expand, errors: list):
    def bad(msg, hint=None):
        errors.append(RecipeError(f"{where}: {msg}", path=path, hint=hint))
        return o.default

    if isinstance(v, str) and o.type in ("int", "float", "bool") and "{" in v:
        v = _value(expand(where, v))        # a variable in a number: "{rank}"
    if o.type == "path":
        return _path_value(v, where, path, expand, errors) if isinstance(v, str) else \
            bad("must be a path or @name")
    if o.type in ("paths", "strs"):
        vs = v if isinstance(v, list) else [v]
        if not all(isinstance(x, str) for x in vs):
            return bad("must be a list of strings")
        return tuple(_path_value(x, where, path, expand, errors) if o.type == "paths"
                     else expand(where, x) for x in vs)
    if o.type == "bool":
        return v if isinstance(v, bool) else bad("must be true or false")
    if o.type == "int":
        return v if isinstance(v, int) and not isinstance(v, bool) else bad("must be an integer")
    if o.type == "float":
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else \
            bad("must be a number")
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        return bad("must be text")
    v = expand(where, str(v))
    if o.type == "choice" and v not in o.choices:
        close = difflib.get_close_matches(v, o.choices, n=1, cutoff=0.4)
        return bad(f"'{v}' is not one of {', '.join(o.choices)}",
                   f"did you mean '{close[0]}'?" if close else None)
    if o.type.startswith("registry:"):
        kind = o.type.split(":", 1)[1]
        try:
            registry.get(kind, o.normalise(v) if o.normalise else v)
        except UnknownNameError as e:
            return bad(e.detail, e.hint)
    return v


def _path_value(v: str, where, path, expand, errors):
    v = expand(where, v)
    if v.startswith("@"):
        m = REF.match(v)
        if not m:
            errors.append(RecipeError(f"{where}: '{v}' is not @name, @name/sub/path or "
                                      "@name:WEIGHT", path=path))
            return v
        return Ref(m["node"], m["sub"], m["weight"])
    return v


def _check_refs(artifacts: dict[str, Artifact], inputs: dict[str, Input], path, errors) -> None:
    known = [*inputs, *artifacts]
    for a in artifacts.values():
        for r in a.refs():
            if r.node not in inputs and r.node not in artifacts:
                errors.append(_unknown(path, f"artifacts.{a.name}", "input or artifact",
                                       r.node, known))
            elif r.sub and (r.node in inputs or artifacts[r.node].op.output != "folder"):
                errors.append(RecipeError(f"artifacts.{a.name}: '{r.text()}' names a file "
                                          f"inside {r.node}, which is not a folder artifact",
                                          path=path))
        for n in a.needs:
            if n not in artifacts:
                errors.append(_unknown(path, f"artifacts.{a.name}.needs", "artifact", n,
                                       artifacts))


def _order(artifacts: dict[str, Artifact], path) -> list[str]:
    """Artifacts in dependency order (file order among independent ones); a cycle is named."""
    state: dict[str, int] = {}
    order: list[str] = []

    def visit(n: str, stack: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cyc = stack[stack.index(n):] + [n]
            raise RecipeError(f"the artifacts form a cycle: {' -> '.join(cyc)}", path=path)
        state[n] = 1
        for d in artifacts[n].deps(artifacts):
            visit(d, stack + [n])
        state[n] = 2
        order.append(n)

    for n in artifacts:
        visit(n, [])
    return order
