"""``convkit run``: plan a recipe (content keys, what is up to date), then build what is not.

Each artifact's content key hashes its operation, its options (defaults filled in), the keys of
the artifacts it reads and the identities of the input files it reads, and the convkit version.
An artifact whose key and files match the run record (:mod:`.state`) is skipped; everything else
is built by one executor (this process, ``--jobs N`` local processes, or Ray) and recorded as
soon as it is complete. Verify artifacts gate the run: a failed gate makes the run fail (exit 10).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import ConvkitError, UsageError, raise_all
from . import inputs as inputs_mod
from . import state
from .ops import planned_bytes
from .recipe import Artifact, Recipe, RecipeError, Ref, _unknown
from .tasks import DependencyFailed, Task

KEY_FORMAT = 1
RESERVED = {state.MANIFEST, state.LOCK, "recipe.toml", "README.md"}


@dataclass
class Row:
    """One artifact's line in the summary."""

    name: str
    op: str
    path: str
    status: str             # up to date | built | failed | not run | would build | up to date
    key: str = ""
    bytes: int | None = None
    seconds: float | None = None
    gate: str | None = None  # ok | FAIL (verify artifacts)
    error: str | None = None
    exit_code: int = 0
    summary: dict = field(default_factory=dict)
    after: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class RunResult:
    recipe: Recipe
    out: Path
    rows: list[Row]
    dry_run: bool
    seconds: float = 0.0
    executor: str = "local"

    @property
    def ok(self) -> bool:
        return all(r.status not in ("failed", "not run") and r.gate != "FAIL" for r in self.rows)

    @property
    def exit_code(self) -> int:
        codes = [r.exit_code for r in self.rows if r.status == "failed"]
        if codes:
            return max(codes)
        return 10 if any(r.gate == "FAIL" for r in self.rows) else 0

    def failure_message(self) -> str:
        bad = [r for r in self.rows if r.status == "failed"]
        gates = [r for r in self.rows if r.gate == "FAIL"]
        parts = [f"{r.name}: {r.error}" for r in bad]
        parts += [f"{r.name}: {r.summary.get('failure') or 'gate failed'}" for r in gates]
        skipped = [r.name for r in self.rows if r.status == "not run"]
        return (f"{len(bad) + len(gates)} of {len(self.rows)} artifacts failed: "
                + "; ".join(parts) + (f" (not run: {', '.join(skipped)})" if skipped else ""))

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.name, "output": str(self.out), "dry_run": self.dry_run,
                "ok": self.ok, "exit_code": self.exit_code, "seconds": round(self.seconds, 2),
                "executor": self.executor, "convkit_version": __version__,
                "artifacts": [r.to_dict() for r in self.rows]}

    def format(self) -> str:
        head = ("artifact", "op", "path", "status", "size", "time", "gate")
        lines = []
        for r in self.rows:
            size = _mb(r.bytes) if r.bytes is not None else ("?" if r.status.startswith("would")
                                                               else "")
            status = r.status + (f" (after {', '.join(r.after)})" if r.after else "")
            lines.append((r.name, r.op, r.path, status, size,
                          f"{r.seconds:.1f} s" if r.seconds is not None else "",
                          r.gate or ""))
        widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
        fmt = "  ".join(f"{{:{w}}}" for w in widths)
        out = [fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*x).rstrip() for x in lines]
        for r in self.rows:
            if r.error:
                out.append(f"{r.name}: {r.error}")
            elif r.gate == "FAIL":
                out.append(f"{r.name}: {r.summary.get('failure')}")
        return "\n".join(out)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


# --- planning -------------------------------------------------------------------------------

def select(recipe: Recipe, only: list[str], path) -> list[str]:
    """The artifacts to consider: all, or those asked for and everything they read."""
    if not only:
        return recipe.order()
    errors = [_unknown(path, "--only", "artifact", n, recipe.artifacts)
              for n in only if n not in recipe.artifacts]
    raise_all(errors)
    want: set[str] = set()

    def add(n: str) -> None:
        if n not in want:
            want.add(n)
            for d in recipe.artifacts[n].deps(recipe.artifacts):
                add(d)

    for n in only:
        add(n)
    return [n for n in recipe.order() if n in want]


def resolve_inputs(recipe: Recipe, names: list[str]) -> dict[str, Path]:
    """Every input the chosen artifacts read, checked together before anything runs."""
    used: set[str] = set()
    for n in names:
        used |= {r.node for r in recipe.artifacts[n].refs() if r.node in recipe.inputs}
    out, errors = {}, []
    for n in sorted(used):
        try:
            out[n] = inputs_mod.resolve(recipe.inputs[n].path, f"inputs.{n}")
        except ConvkitError as e:
            errors.append(e)
    raise_all(errors)
    return out


def _check_paths(recipe: Recipe, out: Path, names: list[str], ins: dict[str, Path]) -> None:
    errors = []
    root = out.resolve()
    for n in names:
        a = recipe.artifacts[n]
        target = (out / a.path).resolve()
        if a.path in RESERVED:
            errors.append(RecipeError(f"artifacts.{n}.path: '{a.path}' is the run's own file",
                                      path=recipe.source))
        elif root != target and root not in target.parents:   # a symlink pointing out
            errors.append(RecipeError(f"artifacts.{n}.path: '{a.path}' is outside the output "
                                      f"folder {out}", path=recipe.source))
        for i, p in ins.items():
            p = p.resolve()
            if target == p or p in target.parents or target in p.parents:
                errors.append(RecipeError(f"artifacts.{n}.path: '{a.path}' would overwrite "
                                          f"input {i} ({p})", path=recipe.source))
    raise_all(errors)


def content_keys(recipe: Recipe, names: list[str], ins: dict[str, Path]) -> dict[str, str]:
    idents = {n: inputs_mod.identity(p) for n, p in ins.items()}
    keys: dict[str, str] = {}
    for n in names:
        a = recipe.artifacts[n]
        opts = {}
        for k, v in sorted(a.options.items()):
            opts[k] = _key_value(v, keys, idents) if a.op.options[k].is_input else _plain(v)
        keys[n] = inputs_mod.digest({"format": KEY_FORMAT, "convkit": __version__,
                                     "op": a.op.name, "options": opts})
    return keys


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _key_value(v, keys, idents):
    if isinstance(v, tuple):
        return [_key_value(x, keys, idents) for x in v]
    if isinstance(v, Ref):
        src = keys.get(v.node) if v.node in keys else idents.get(v.node)
        return {"ref": src, "sub": v.sub, "weight": v.weight}
    if isinstance(v, str):      # a literal path: its identity when it exists
        p = Path(v).expanduser()
        return inputs_mod.identity(p) if p.exists() else v
    return v


def resolved_options(recipe: Recipe, a: Artifact, out: Path, ins: dict[str, Path]) -> dict:
    """The options as the operation takes them: references become paths."""
    def one(v):
        if isinstance(v, Ref):
            base = ins[v.node] if v.node in ins else out / recipe.artifacts[v.node].path
            p = str(base) + (v.sub or "")
            return p + (f":{v.weight}" if v.weight else "")
        return v

    opts = {}
    for k, v in a.options.items():
        if a.op.options[k].is_input and v is not None:
            v = tuple(one(x) for x in v) if isinstance(v, tuple) else one(v)
        opts[k] = v
    return opts


# --- running --------------------------------------------------------------------------------

def run(recipe: Recipe, out_dir=None, *, only=(), jobs: int = 1, executor: str = "local",
        ray_address: str | None = None, dry_run: bool = False, show_progress: bool = False,
        memory_budget: int | None = None, echo=None) -> RunResult:
    t0 = time.perf_counter()
    out = Path(out_dir or recipe.output)
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if executor not in ("local", "ray"):
        raise _unknown(None, "--executor", "executor", executor, ["local", "ray"])
    if executor == "ray" and not dry_run:       # before anything is written
        from .ray_executor import require_ray

        require_ray()
    names = select(recipe, list(only), recipe.source)
    ins = resolve_inputs(recipe, names)
    _check_paths(recipe, out, names, ins)
    keys = content_keys(recipe, names, ins)
    record = state.load(out) if out.is_dir() else {}
    built = record.get("artifacts", {})
    todo = [n for n in names if not state.up_to_date(built.get(n), keys[n], out)]
    rows = {n: _row(recipe.artifacts[n], keys[n], built.get(n), n in todo, dry_run)
            for n in names}
    if dry_run:
        _dry_sizes(recipe, out, todo, ins, rows)
        return RunResult(recipe, out, list(rows.values()), True,
                         time.perf_counter() - t0, executor)
    if not out.is_dir():
        try:
            out.mkdir(parents=True)
        except OSError as e:
            raise UsageError(f"cannot create the output folder: {e.strerror}", path=str(out))
    with state.RunLock(out):
        _cleanup(out, recipe, names)
        record = state.load(out)
        record.setdefault("artifacts", {})
        record.update(_header(recipe, ins))
        _save_recipe(recipe, out)
        state.save(out, record)
        tasks = [_task(recipe, n, keys, out, ins, todo, show_progress) for n in todo]
        _execute(tasks, rows, record, out, recipe, jobs=jobs, executor=executor,
                 ray_address=ray_address, show_progress=show_progress,
                 memory_budget=memory_budget, echo=echo)
    return RunResult(recipe, out, list(rows.values()), False, time.perf_counter() - t0, executor)


def _row(a: Artifact, key: str, entry: dict | None, todo: bool, dry_run: bool) -> Row:
    r = Row(a.name, a.op.name, a.path, ("would build" if dry_run else "not run") if todo
            else "up to date", key=key)
    if not todo and entry:
        r.bytes = sum(f["bytes"] for f in entry["files"])
        r.summary = entry.get("summary", {})
        r.gate = _gate(a, r.summary)
    return r


def _gate(a: Artifact, summary: dict) -> str | None:
    if a.op.name != "verify" or "ok" not in summary:
        return None
    return "ok" if summary["ok"] else "FAIL"


def _dry_sizes(recipe, out, todo, ins, rows) -> None:
    """Sizes from each operation's own dry run where its inputs exist already; the others wait
    for an artifact of this run (shown as 'after X')."""
    import shutil
    import tempfile

    errors = []
    for n in todo:
        a = recipe.artifacts[n]
        waits = [d for d in a.deps(recipe.artifacts) if d in todo]
        if waits:
            rows[n].after = waits
            continue
        target = out / a.path
        scratch = None
        if not target.parent.is_dir():     # plan against an empty folder on the same disk
            near = next(p for p in target.parents if p.is_dir())
            scratch = Path(tempfile.mkdtemp(prefix=".convkit-dry-", dir=near))
            target = scratch / target.name
        try:
            r = a.op.run(resolved_options(recipe, a, out, ins), target, dry_run=True)
        except ConvkitError as e:
            errors.append(RecipeError(f"artifacts.{n}: {e}", path=recipe.source))
            continue
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        rows[n].bytes = planned_bytes(r)
    raise_all(errors)


def _header(recipe: Recipe, ins: dict[str, Path]) -> dict:
    """What the record (and so the model card) says about the recipe and its inputs: names,
    never local paths."""
    return {"convkit": __version__,
            "recipe": {"name": recipe.name, "description": recipe.description,
                       "file": "recipe.toml" if recipe.text else None,
                       "overrides": [s.split("=", 1)[0] for s in recipe.overrides],
                       "publish": recipe.publish},
            "inputs": {n: {"name": (i.path if inputs_mod.is_builtin(i.path)
                                    else Path(i.path).name),
                           "about": i.about, "hub": i.hub, "license": i.license}
                       for n, i in recipe.inputs.items()},
            "artifact_info": {n: {"op": a.op.name, "path": a.path, "about": a.about,
                                  "publish": a.publish,
                                  # what the card needs to say (e.g. a GGUF's layout); paths
                                  # (inputs) are left out: they are local
                                  "options": {k: _plain(v) for k, v in a.options.items()
                                              if not a.op.options[k].is_input},
                                  "reads": [r.text() for r in a.refs()]}
                              for n, a in recipe.artifacts.items()}}


def _save_recipe(recipe: Recipe, out: Path) -> None:
    if not recipe.text:
        return
    p = out / "recipe.toml"
    if p.is_file() and p.read_text(encoding="utf-8") == recipe.text:
        return
    tmp = out / f".recipe.toml.{os.getpid()}.tmp"
    tmp.write_text(recipe.text, encoding="utf-8")
    os.replace(tmp, p)


def _cleanup(out: Path, recipe: Recipe, names: list[str]) -> None:
    """Temp files of runs killed hard (kill -9): convkit's temp names whose process is gone."""
    from ..writer import cleanup_stale

    folders = {out} | {(out / recipe.artifacts[n].path).parent for n in names}
    for f in sorted(folders):
        cleanup_stale(f)
    for p in out.glob(f".{state.MANIFEST}.*.tmp"):
        p.unlink(missing_ok=True)


def _task(recipe, n, keys, out, ins, todo, show_progress) -> Task:
    from .ops import input_bytes

    a = recipe.artifacts[n]
    opts = resolved_options(recipe, a, out, ins)
    sizes = []
    for k, v in opts.items():
        if a.op.options[k].is_input and v:
            sizes += [input_bytes(x) for x in (v if isinstance(v, tuple) else (v,))]
    biggest = max([input_bytes(str(p)) for p in ins.values()], default=0)
    if any(d in todo for d in a.deps(recipe.artifacts)):
        sizes.append(biggest)       # not built yet: as big as the biggest input, at most
    payload = {"op": a.op.name, "options": opts, "root": str(out), "path": a.path,
               "key": keys[n], "recipe": recipe.name, "artifact": n, "progress": show_progress}
    return Task(n, tuple(d for d in a.deps(recipe.artifacts) if d in todo),
                "convkit.recipes.worker:run_task", payload, a.op.memory(sizes), a.op.cpus)


def _execute(tasks, rows, record, out, recipe, *, jobs, executor, ray_address, show_progress,
             memory_budget, echo) -> None:
    from .executors import execute_local, overall_bar

    bar = overall_bar(len(tasks), recipe.name, show_progress)

    def on_start(name: str) -> None:
        rows[name].status = "running"
        if echo:
            echo(f"{name}: {rows[name].op} -> {rows[name].path}")

    def on_done(name: str, result: dict | None, error: BaseException | None) -> None:
        r = rows[name]
        bar.update(1)
        if error is not None:
            r.status = "not run" if isinstance(error, DependencyFailed) else "failed"
            r.error = str(error)
            r.exit_code = getattr(error, "exit_code", 1) or 1
            return
        r.status, r.seconds, r.summary = "built", result["seconds"], result["summary"]
        r.bytes = sum(f["bytes"] for f in result["files"])
        r.gate = _gate(recipe.artifacts[name], r.summary)
        record["artifacts"][name] = {"key": r.key, "op": r.op, "path": r.path,
                                     "files": result["files"], "summary": result["summary"],
                                     "seconds": result["seconds"], "built_at": time.time()}
        state.save(out, record)

    try:
        if executor == "ray":
            from .ray_executor import execute_ray

            execute_ray(tasks, on_start, on_done, address=ray_address,
                        max_parallel=jobs if jobs > 1 else None)
        else:
            execute_local(tasks, on_start, on_done, jobs=jobs, memory_budget=memory_budget)
    finally:
        bar.close()


__all__ = ["run", "RunResult", "Row", "content_keys"]
