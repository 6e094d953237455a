"""The Ray executor (``convkit run --executor ray``): each artifact is one Ray task that declares
its CPUs and its peak memory, so Ray places it on a node with room for it; a task is submitted
once everything it reads is built. Ray is optional (``pip install 'convkit[ray]'``) and is
imported only when this executor runs.

On a cluster, every node needs the same convkit (and its dependencies) installed, and the
recipe's inputs and output folder on storage that every node sees at the same path: a task
gets paths, not data. No ``runtime_env`` is set, so the nodes' own Python environment is used.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

from ..errors import UsageError
from .tasks import DependencyFailed, Task, TaskFailed, call_guarded, topo_order

NEEDS_RAY = "--executor ray needs Ray: pip install 'convkit[ray]'"


def execute_ray(tasks: list[Task], on_start, on_done, *, address: str | None = None,
                max_parallel: int | None = None) -> None:
    """Run ``tasks`` on Ray; ``on_start(name)`` when a task is submitted, ``on_done(name,
    result, error)`` once per task, both in this thread.

    ``address``: a Ray cluster's address; None connects to ``RAY_ADDRESS`` when set, else
    starts a Ray on this machine. A Ray that the caller had already initialised is used as it
    is (``address`` is then ignored) and left running; a connection made here is closed here
    (which also stops a Ray started here).
    ``max_parallel``: at most this many tasks submitted at once (Ray still places each by its
    declared resources).
    """
    ray = _import_ray()
    if not tasks:
        return
    connected_here = _connect(ray, address)
    try:
        _run(ray, tasks, on_start, on_done, max_parallel)
    finally:
        if connected_here:
            ray.shutdown()


def require_ray() -> None:
    """Fail now, before a run writes anything, if Ray is not installed."""
    _import_ray()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(NEEDS_RAY) from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Initialise Ray unless the caller already did; True when this call did."""
    if ray.is_initialized():
        return False
    in_main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if in_main else None
    # quiet: Ray's info lines and workers' output would interleave with the run's own lines
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False, logging_level=logging.WARNING)
    # ray.init makes SIGTERM a sys.exit(); a handler the caller set stays in force instead (the
    # CLI's: SIGTERM as Ctrl-C, so tasks are cancelled and the run reports "interrupted")
    if callable(on_term):
        signal.signal(signal.SIGTERM, on_term)
    return True


def _run(ray, tasks: list[Task], on_start, on_done, max_parallel: int | None) -> None:
    order = topo_order(tasks)
    in_run = {t.name for t in order}
    too_big = _infeasible(order, _node_capacities(ray))
    # max_retries=0: an artifact that failed (or whose worker was killed, e.g. out of memory)
    # fails the run; re-running it blindly would only fail again, later
    remote = ray.remote(max_retries=0)(call_guarded)
    limit = max_parallel or len(order)
    waiting = list(order)
    built: set[str] = set()
    failed: set[str] = set()
    running: dict = {}                  # ObjectRef -> Task
    try:
        while waiting or running:
            for t in list(waiting):    # topological order: a failure reaches all dependents
                error = _not_runnable(t, failed, too_big)
                if error is not None:
                    waiting.remove(t)
                    failed.add(t.name)
                    on_done(t.name, None, error)
                elif _ready(t, built, in_run) and len(running) < limit:
                    waiting.remove(t)
                    on_start(t.name)
                    running[_submit(remote, t)] = t
            if not running:
                continue
            # a timeout, so that Python signal handlers get to run: a blocking ray.wait only
            # lets a KeyboardInterrupt through
            finished, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in finished:
                t = running.pop(ref)
                ok, value = _outcome(ray, ref)
                (built if ok else failed).add(t.name)
                on_done(t.name, value if ok else None, None if ok else value)
    except BaseException:
        # Ctrl-C (or a failing callback): stop the tasks already on the cluster, which would
        # otherwise go on writing into the output folder
        for ref in running:
            with contextlib.suppress(Exception):    # the interrupt is what must come through
                ray.cancel(ref, force=True)
        raise


def _submit(remote, t: Task):
    return remote.options(num_cpus=t.cpus, memory=t.memory, name=t.name).remote(t.fn, t.payload)


def _ready(t: Task, built: set[str], in_run: set[str]) -> bool:
    # a dependency outside this run was built before it (the runner leaves those out)
    return all(d in built or d not in in_run for d in t.deps)


def _not_runnable(t: Task, failed: set[str], too_big: dict[str, TaskFailed]):
    dep = next((d for d in t.deps if d in failed), None)
    if dep is not None:
        return DependencyFailed(t.name, dep)
    return too_big.get(t.name)


def _outcome(ray, ref) -> tuple[bool, dict | TaskFailed]:
    try:
        return ray.get(ref)
    except Exception as e:              # the worker died (killed, out of memory) or was cancelled
        return False, TaskFailed.from_exception(e)


def _node_capacities(ray) -> list[tuple[float, float]]:
    """(CPUs, memory bytes) of each live node: a task runs on one node, so it must fit one."""
    return [(n["Resources"].get("CPU", 0.0), n["Resources"].get("memory", 0.0))
            for n in ray.nodes() if n.get("Alive")]


def _infeasible(tasks: list[Task], nodes: list[tuple[float, float]]) -> dict[str, TaskFailed]:
    """The tasks no node can take. Ray queues such a task forever (it only logs, in the
    autoscaler's log, that no node type fits), so the run would hang: fail them up front.
    The nodes are those alive now: an autoscaling cluster's future nodes are not counted."""
    out = {}
    for t in tasks:
        if not any(cpus >= t.cpus and mem >= t.memory for cpus, mem in nodes):
            biggest = max(nodes, key=lambda n: n[1], default=(0.0, 0.0))
            out[t.name] = TaskFailed(
                "InfeasibleTask",
                f"needs {t.cpus:g} CPU and {t.memory / 1e9:.1f} GB of memory; no Ray node has "
                f"that (the largest: {biggest[0]:g} CPU, {biggest[1] / 1e9:.1f} GB)",
                UsageError.exit_code)
    return out
