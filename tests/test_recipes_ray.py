"""The Ray executor (convkit run --executor ray) on a one-node Ray cluster on loopback: tasks run
in dependency order on shared storage and by their declared memory, a failure reaches its
dependents and no further, a task no node can take fails up front instead of waiting
forever, Ctrl-C cancels what runs; without Ray the user is told what to install, and convkit
loads without it."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from convkit.errors import UsageError
from convkit.recipes.ray_executor import execute_ray
from convkit.recipes.tasks import DependencyFailed, Task, TaskFailed

pytestmark = pytest.mark.xdist_group("ray")

ROOT = Path(__file__).resolve().parent.parent
GB = 10**9
NODE_MEMORY = 2 * GB        # the node's logical memory: what tasks' declared memory is matched to

# This machine may talk to 127.0.0.1 and nothing else. By default Ray replaces 127.0.0.1, in
# the address it is given and in --node-ip-address, with the host's outward IP; this switch
# (meant for one-node Ray on Windows and macOS) keeps 127.0.0.1, so the cluster listens on
# loopback only. Ray reads it when imported, in every process: `ray start`, its workers, and
# this one (the executor connects from here).
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(temp_dir: str, port: int) -> int:
    """`ray start --head` in a session of its own; returns that session's id (the group of
    every process it leaves running)."""
    env = {**os.environ, **LOOPBACK_ONLY,
           # workers inherit it: they import tests.ray_tasks from the repository
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
           "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
           f"--memory={NODE_MEMORY}", "--object-store-memory=100000000",
           "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        out = "still starting after 120 s"
    if p.returncode != 0:
        _stop_head(p.pid)
        pytest.fail(f"ray start failed:\n{out}")
    return p.pid


def _stop_head(session: int) -> None:
    """Kill this cluster's processes only (`ray stop` would stop every Ray of this user): the
    session's, and the workers that the raylet started in sessions of their own."""
    procs = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == session:
                procs += [p, *p.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray (2 CPUs, 2 GB of logical memory, 100 MB object store) on 127.0.0.1; yields
    its address. Unix socket paths are limited to 107 bytes: hence a short temp dir in /tmp."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in LOOPBACK_ONLY.items():
            mp.setenv(k, v)
        pytest.importorskip("ray")
        from ray._private import ray_constants
        if ray_constants.ENABLE_RAY_CLUSTER:      # ray was imported before the switch was set
            pytest.fail("ray was imported in this process before RAY_ENABLE_WINDOWS_OR_OSX_"
                        "CLUSTER=0: connecting to 127.0.0.1 would hang")
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        port = _free_port()
        session = _start_head(temp_dir, port)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            _stop_head(session)
            shutil.rmtree(temp_dir, ignore_errors=True)


class Calls:
    """on_start / on_done, recorded."""

    def __init__(self):
        self.started: list[str] = []
        self.done: dict[str, tuple] = {}

    def on_start(self, name: str) -> None:
        self.started.append(name)

    def on_done(self, name: str, result, error) -> None:
        assert name not in self.done, f"on_done twice for {name}"
        self.done[name] = (result, error)


def write_task(tmp_path: Path, name: str, deps=(), memory=GB // 10, sleep=0.0) -> Task:
    payload = {"name": name, "path": str(tmp_path / name), "sleep": sleep,
               "reads": [str(tmp_path / d) for d in deps]}
    return Task(name, tuple(deps), "tests.ray_tasks:write", payload, memory)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM raises in the driver, which cancels what runs."""
    def expire(signum, frame):
        raise TimeoutError(f"execute_ray still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_diamond_runs_in_dependency_order(ray_cluster, tmp_path):
    # b and c could run side by side on 2 CPUs, but each declares 1.5 GB of the node's 2 GB
    big = 3 * GB // 2
    tasks = [write_task(tmp_path, "d", ("b", "c")), write_task(tmp_path, "b", ("a",), big, 1.0),
             write_task(tmp_path, "c", ("a",), big, 1.0), write_task(tmp_path, "a")]
    calls = Calls()
    old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)    # as the CLI does
    try:
        with deadline(60):
            execute_ray(tasks, calls.on_start, calls.on_done, address=ray_cluster)
        # ray.init sets its own SIGTERM handler; the caller's is back
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, old_term)
    assert sorted(calls.started) == ["a", "b", "c", "d"]
    assert calls.started[0] == "a" and calls.started[-1] == "d"
    assert all(err is None for _, err in calls.done.values()), calls.done
    # d read b's and c's files, which had read a's: each ran after what it depends on
    assert calls.done["d"][0]["text"] == "d(b(a()),c(a()))"
    assert (tmp_path / "d").read_text() == "d(b(a()),c(a()))"
    # Ray scheduled by the declared resources: reserved them, and ran b and c one after the
    # other (a weak check alone: a worker starting late would also keep them apart)
    assert calls.done["b"][0]["resources"] == {"CPU": 1.0, "memory": big}
    first, second = sorted([calls.done["b"][0], calls.done["c"][0]], key=lambda r: r["start"])
    assert first["end"] <= second["start"]
    # ran in Ray's workers, not here
    assert os.getpid() not in {r["pid"] for r, _ in calls.done.values()}


def test_failure_reaches_dependents_only(ray_cluster, tmp_path, monkeypatch):
    bad = Task("bad", (), "tests.ray_tasks:fail", {"message": "NaN in the weights"}, GB // 10)
    tasks = [bad, write_task(tmp_path, "child", ("bad",)),
             write_task(tmp_path, "grandchild", ("child",)), write_task(tmp_path, "other")]
    calls = Calls()
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)      # no address: Ray's own variable
    with deadline(60):
        execute_ray(tasks, calls.on_start, calls.on_done, max_parallel=1)
    assert set(calls.done) == {"bad", "child", "grandchild", "other"}
    _, err = calls.done["bad"]
    assert isinstance(err, TaskFailed)
    assert (err.type_name, err.exit_code) == ("TensorValueError", 7)
    assert err.message == "tensor 'w': NaN in the weights"
    assert "ray_tasks.py" in err.tb and "TensorValueError" in err.tb
    for name, dep in [("child", "bad"), ("grandchild", "child")]:
        _, err = calls.done[name]
        assert isinstance(err, DependencyFailed) and err.dep == dep
        assert not (tmp_path / name).exists() and name not in calls.started
    assert calls.done["other"][1] is None and (tmp_path / "other").read_text() == "other()"


def test_task_no_node_can_take_fails_up_front(ray_cluster, tmp_path):
    # Ray itself would queue it forever (it only logs that no node type fits)
    tasks = [write_task(tmp_path, "huge", memory=3 * GB), write_task(tmp_path, "after", ("huge",)),
             write_task(tmp_path, "small")]
    calls = Calls()
    t0 = time.monotonic()
    with deadline(60):
        execute_ray(tasks, calls.on_start, calls.on_done, address=ray_cluster)
    assert time.monotonic() - t0 < 30
    _, err = calls.done["huge"]
    assert isinstance(err, TaskFailed) and err.type_name == "InfeasibleTask"
    assert "3.0 GB" in str(err) and "2.0 GB" in str(err)
    assert "huge" not in calls.started and not (tmp_path / "huge").exists()
    assert isinstance(calls.done["after"][1], DependencyFailed)
    assert calls.done["small"][1] is None


def test_ctrl_c_cancels_running_tasks(ray_cluster, tmp_path):
    # the caller's own connection: execute_ray must use it and leave it open, so what stops
    # `slow` is the cancel, not the end of the job (which would stop it as well)
    import ray

    slow = write_task(tmp_path, "slow", sleep=60.0)
    pid_file = tmp_path / "slow.pid"
    slow.payload["pid_file"] = str(pid_file)
    tasks = [write_task(tmp_path, "quick"), slow]

    def on_done(name, result, error):
        _wait_for(pid_file.exists, 30)
        raise KeyboardInterrupt     # as Ctrl-C would, while `slow` runs

    ray.init(address=ray_cluster, log_to_driver=False)
    try:
        with deadline(60), pytest.raises(KeyboardInterrupt):
            execute_ray(tasks, lambda name: None, on_done, address=ray_cluster)
        assert ray.is_initialized()
        # force-cancelled: the worker running `slow` is killed
        worker = int(pid_file.read_text())
        assert _wait_for(lambda: not psutil.pid_exists(worker), 10)
        assert (tmp_path / "quick").exists() and not (tmp_path / "slow").exists()
    finally:
        ray.shutdown()


def _wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def test_without_ray_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)       # `import ray` raises ImportError
    with pytest.raises(UsageError) as e:
        execute_ray([write_task(tmp_path, "a")], lambda n: None, lambda *a: None)
    assert str(e.value) == "--executor ray needs Ray: pip install 'convkit[ray]'"
    assert e.value.exit_code == 2


def test_convkit_does_not_import_ray():
    # Ray is optional: the CLI and the executor's module load without it
    code = ("import sys, convkit.cli, convkit.recipes.ray_executor; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_convkit_run_on_ray_makes_the_same_artifacts(ray_cluster, recipe_env, tmp_path):
    """`convkit run --executor ray` against the loopback cluster: every artifact a Ray task,
    files byte-identical to the local run's (the record's sha256)."""
    import json

    from tests.test_recipes import SMALL, _shas, run

    r = tmp_path / "small.toml"
    r.write_text(SMALL)
    code, text = run("run", r, "-o", tmp_path / "local", "--quiet")
    assert code == 0, text
    code, text = run("run", r, "-o", tmp_path / "ray", "--executor", "ray", "--ray-address",
                     ray_cluster, "--json")
    assert code == 0, text
    d = json.loads(text)
    assert d["executor"] == "ray" and all(x["status"] == "built" for x in d["artifacts"])
    assert _shas(tmp_path / "ray") == _shas(tmp_path / "local")
