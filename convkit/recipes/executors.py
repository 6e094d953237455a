"""The local executor: artifacts one after another in this process (``--jobs 1``), or in a pool
of worker processes (``--jobs N``), started as soon as what they read is built and while their
declared memory fits the budget. (Ray: :mod:`.ray_executor`.)"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from .tasks import DependencyFailed, Task, TaskFailed, call, call_guarded, topo_order


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def overall_bar(total: int, name: str, enabled: bool):
    """The run's own bar (artifacts done of those to build), on the top line."""
    if not enabled or total == 0:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=f"recipe {name}", unit="artifact", position=0, leave=True,
                file=sys.stderr, dynamic_ncols=True)


def memory_budget_default() -> int:
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


def execute_local(tasks: list[Task], on_start, on_done, *, jobs: int = 1,
                  memory_budget: int | None = None) -> None:
    if jobs <= 1 or len(tasks) <= 1:
        _sequential(tasks, on_start, on_done)
    else:
        _pool(tasks, on_start, on_done, jobs, memory_budget or memory_budget_default())


def _failed_dep(t: Task, failed: set[str]) -> str | None:
    return next((d for d in t.deps if d in failed), None)


def _sequential(tasks, on_start, on_done) -> None:
    failed: set[str] = set()
    for t in topo_order(tasks):
        dep = _failed_dep(t, failed)
        if dep:
            failed.add(t.name)
            on_done(t.name, None, DependencyFailed(t.name, dep))
            continue
        on_start(t.name)
        try:
            result = call(t.fn, t.payload)
        except Exception as e:
            if isinstance(e, KeyboardInterrupt):    # convkit's Interrupted is both: stop
                raise
            failed.add(t.name)
            on_done(t.name, None, e)
            continue
        on_done(t.name, result, None)


# --- the process pool -----------------------------------------------------------------------

def _init_worker(counter) -> None:
    """Each worker: its own line for progress bars, its share of the cores, and it dies with the
    run (a run killed with -9 must not leave workers writing into the folder)."""
    from ..runtime import quiet_third_party_logs
    from . import worker

    quiet_third_party_logs()        # as the CLI does in the run's own process
    with counter.get_lock():
        counter.value += 1
        worker.POSITION = counter.value
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pool(tasks: list[Task], on_start, on_done, jobs: int, budget: int) -> None:
    ctx = mp.get_context("spawn")       # no forked copies of torch's thread pools
    counter = ctx.Value("i", 0)
    pending = list(topo_order(tasks))
    done: set[str] = set()
    failed: set[str] = set()
    running: dict = {}                  # future -> task
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(counter,)) as ex:
        try:
            while pending or running:
                used = sum(t.memory for t in running.values())
                for t in list(pending):
                    dep = _failed_dep(t, failed)
                    if dep:
                        pending.remove(t)
                        failed.add(t.name)
                        on_done(t.name, None, DependencyFailed(t.name, dep))
                        continue
                    if not all(d in done for d in t.deps) or len(running) >= jobs:
                        continue
                    # one task always runs, however big: the budget orders, never deadlocks
                    if running and used + t.memory > budget:
                        continue
                    pending.remove(t)
                    used += t.memory
                    on_start(t.name)
                    running[ex.submit(call_guarded, t.fn, t.payload)] = t
                if not running:
                    continue
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for f in finished:
                    t = running.pop(f)
                    try:
                        ok, value = f.result()
                    except Exception as e:     # the worker process died (killed, OOM)
                        ok, value = False, TaskFailed.from_exception(e)
                    if ok:
                        done.add(t.name)
                        on_done(t.name, value, None)
                    else:
                        failed.add(t.name)
                        on_done(t.name, None, value)
        except BaseException:
            for f in running:
                f.cancel()
            ex.shutdown(wait=False, cancel_futures=True)
            raise
