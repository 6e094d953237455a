"""Tasks as every executor sees them (local pool, Ray): plain data, plus a function by name."""
from __future__ import annotations

import importlib
import traceback
from dataclasses import dataclass


@dataclass
class Task:
    name: str                 # artifact name, unique in the run
    deps: tuple[str, ...]     # tasks of this run that must succeed first
    fn: str                   # "module:function", called as fn(payload) -> dict
    payload: dict             # plain data
    memory: int               # bytes it may need at peak
    cpus: float = 1.0


class DependencyFailed(Exception):
    def __init__(self, task: str, dep: str):
        super().__init__(f"not run: {dep} failed")
        self.task, self.dep = task, dep
        self.exit_code = 1

    def __reduce__(self):
        return (DependencyFailed, (self.task, self.dep))


class TaskFailed(Exception):
    """A worker's exception as data: type name, message, exit code, traceback text."""

    def __init__(self, type_name: str, message: str, exit_code: int = 1, tb: str = ""):
        super().__init__(message)
        self.type_name, self.message, self.exit_code, self.tb = type_name, message, exit_code, tb

    def __reduce__(self):
        return (TaskFailed, (self.type_name, self.message, self.exit_code, self.tb))

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_exception(cls, e: BaseException) -> TaskFailed:
        if isinstance(e, TaskFailed):
            return e
        return cls(type(e).__name__, str(e) or type(e).__name__,
                   int(getattr(e, "exit_code", 1) or 1),
                   "".join(traceback.format_exception(type(e), e, e.__traceback__)))


def call(fn: str, payload: dict) -> dict:
    mod, _, name = fn.partition(":")
    return getattr(importlib.import_module(mod), name)(payload)


def call_guarded(fn: str, payload: dict) -> tuple[bool, dict | TaskFailed]:
    """:func:`call` in a worker, with an exception turned into a :class:`TaskFailed` there:
    convkit errors take keyword arguments and so do not survive pickling as themselves."""
    try:
        return True, call(fn, payload)
    except Exception as e:
        return False, TaskFailed.from_exception(e)


def topo_order(tasks: list[Task]) -> list[Task]:
    by = {t.name: t for t in tasks}
    out, state = [], {}

    def visit(t: Task, stack: tuple) -> None:
        if state.get(t.name) == 2:
            return
        if state.get(t.name) == 1:
            raise ValueError("tasks form a cycle: " + " -> ".join((*stack, t.name)))
        state[t.name] = 1
        for d in t.deps:
            if d in by:
                visit(by[d], (*stack, t.name))
        state[t.name] = 2
        out.append(t)

    for t in tasks:
        visit(t, ())
    return out
