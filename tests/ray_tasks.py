"""Toy task functions for tests/test_recipes_ray.py, called in Ray workers as
``tests.ray_tasks:NAME``. The test's Ray cluster is started with the repository root on
PYTHONPATH, which every worker inherits, so this module imports there whatever the driver's
working directory (Ray also adds the driver's working directory to its workers' sys.path, but a
test run need not start in the repository)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def write(payload: dict) -> dict:
    """Read the files of the tasks this one depends on (shared storage), then write its own:
    its name around what it read, e.g. ``d(b(a()),c(a()))``."""
    start = time.time()
    if payload.get("pid_file"):     # lets a test find the worker that runs this task
        Path(payload["pid_file"]).write_text(str(os.getpid()))
    time.sleep(payload.get("sleep", 0))
    read = [Path(p).read_text() for p in payload.get("reads", [])]
    text = f"{payload['name']}({','.join(read)})"
    Path(payload["path"]).write_text(text)
    return {"text": text, "pid": os.getpid(), "start": start, "end": time.time(),
            "resources": _assigned_resources()}


def _assigned_resources() -> dict:
    """What Ray reserved for this task (its CPUs and memory), as it scheduled it."""
    import ray

    return ray.get_runtime_context().get_assigned_resources()


def fail(payload: dict) -> dict:
    """Fail as a convkit operation does: with a convkit error, which carries an exit code and
    takes keyword arguments (so it does not pickle as itself)."""
    from convkit.errors import TensorValueError

    raise TensorValueError(payload["message"], key="w")
