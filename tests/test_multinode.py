"""Multi-node for real: a two-node Ray cluster on this machine (issue #19).

A *simulated* cluster, and honestly so: two real raylets (each with its own object store and
worker processes) started with ``ray start`` on this one machine, 1 CPU each, so one training worker
runs on each node. The run folder is a local folder, which every node reaches because they share
the machine: on real machines it must be shared storage (NFS, s3://, gs://). Ray itself registers
both nodes under the machine's own IP (it rewrites 127.0.0.1 to a reachable address); nothing
leaves this machine.

The tests drive ``lipdet`` as a user would, in subprocesses against the running cluster:

* ``lipdet train --address HEAD --workers 1..2``: node 2 is killed (its whole process group,
  SIGKILL: a preempted machine) during epoch 2; the run goes on from the epoch-1 checkpoint with
  the one worker left, the node is started again and the run grows back to two workers; every
  epoch is finished, at most one is redone, and ``model.pt`` exports and evaluates;
* ``lipdet eval --workers 2 --address HEAD`` shards over both nodes (1 CPU each, an actor needs 1)
  with the numbers of one worker.

The trained model's three commands (export then eval, the sharded eval, the one-worker eval) run at
once, in ``model_commands``.

The cluster uses its own ports and ``--temp-dir``, and the module's finalizer kills every process
group it started (with their descendants and any process naming that temp dir) and checks with
``pgrep`` that none is left. lipdet's own local sessions (the other
tests) ask for ``address="local"``, so they never join this cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 90
RUN_TIMEOUT_S = 240
EPOCHS = 24
"""Enough for node 2 to come back before the end (a `ray start`, a resize check and a restart: 15-25 s,
while the one worker left takes 1-2 s an epoch on an idle 2-core machine, 5-10 s on a loaded one)."""
CLUSTER_ENV = {
    # Fast node-death detection (defaults: 3 s x 5 misses), so the run shrinks in seconds.
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train's controller registers a reported checkpoint when it next polls the workers (every
    # 2 s by default): poll often, so the epoch-1 checkpoint is registered before node 2 goes.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Right after the loss Ray Train still sees node 2's CPU and first asks for 2 workers again;
    # that start waits this long (default 60 s) before it retries with the workers that fit.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
}


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes() -> dict[int, tuple[int, int]]:
    """``{pid: (parent pid, process group)}`` of every process, from ``/proc/PID/stat``."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
        except OSError:
            continue
        out[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
    return out


def _group_processes(pgid: int) -> set[int]:
    """The pids of process group ``pgid`` and of all their descendants."""
    table = _processes()
    found = {pid for pid, (_, group) in table.items() if group == pgid}
    grew = True
    while grew:
        more = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def _kill_all(pids: set[int]) -> int:
    """SIGKILL ``pids`` (those still there); returns how many were signalled."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _alive(pids: set[int], timeout: float) -> set[int]:
    """The ``pids`` still running (not zombies) after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {p for p in pids if not _gone(p)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _naming(path: Path) -> set[int]:
    """The pids of the processes whose command line contains ``path`` (``pgrep -f``)."""
    out = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in out} - {os.getpid()}


def _gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie waiting for its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class TwoNodeCluster:
    """A head node and a second node, each its own ``ray start`` in its own process group."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        token = temp_dir / "auth_token"  # the cluster's own token: nothing read from or written to ~/.ray
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {**os.environ, **CLUSTER_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self.env.pop("RAY_ADDRESS", None)
        self.port = _free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.groups: dict[str, int] = {}  # node name -> process group id
        self.all_groups: list[int] = []

    def _start(self, name: str, args: list[str]) -> None:
        ports = _free_ports(7)
        cmd = [RAY, "start", *args, "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(self.temp_dir),
               "--disable-usage-stats", "--node-manager-port", str(ports[0]), "--object-manager-port",
               str(ports[1]), "--metrics-export-port", str(ports[2]), "--dashboard-agent-listen-port",
               str(ports[3]), "--dashboard-agent-grpc-port", str(ports[4]), "--runtime-env-agent-port",
               str(ports[5]), "--resources", json.dumps({name: 1})]
        if "--head" in args:
            cmd += ["--ray-client-server-port", str(ports[6]), "--include-dashboard", "false"]
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.groups[name] = proc.pid
        self.all_groups.append(proc.pid)
        out, _ = proc.communicate(timeout=START_TIMEOUT_S)
        assert proc.returncode == 0, out

    def start_head(self) -> None:
        self._start("head", ["--head", "--port", str(self.port)])

    def start_node(self, name: str = "node2") -> None:
        self._start(name, ["--address", self.address])

    def nodes_alive(self) -> int:
        """Live nodes as ``ray status`` sees them (a subprocess: this process never joins the cluster)."""
        code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))") % self.address
        r = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        return int(r.stdout.strip().splitlines()[-1])

    def kill_node(self, name: str = "node2") -> int:
        """SIGKILL every process of node ``name`` at once (a lost machine); returns how many.

        Its ``ray start`` process group (GCS or raylet, object store, agents) and their descendants:
        Ray's worker processes put themselves in process groups of their own.
        """
        return _kill_all(_group_processes(self.groups.pop(name)))

    def shutdown(self) -> list[int]:
        """Kill every process this cluster started; returns the pids still alive 10 s later.

        Its process groups with their descendants, and any process naming the cluster's own temp dir,
        in rounds until a round finds none: a raylet killed while it forks a worker leaves that worker
        orphaned (no longer its descendant, in a group of its own), so one round can miss it.
        """
        killed: set[int] = set()
        for _ in range(10):
            found = {p for g in self.all_groups for p in _group_processes(g)} | _naming(self.temp_dir)
            fresh = {p for p in found - killed if not _gone(p)}
            if not fresh:
                break
            _kill_all(fresh)
            killed |= fresh
            time.sleep(0.3)
        return sorted(_alive(killed, timeout=10))


class Command:
    """``lipdet ...`` in a subprocess whose stderr lines are collected as they come (bounded waits)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "lipdet.cli", *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line came (time.monotonic)
        self.stdout = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self.times.append(time.monotonic())

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first stderr line matching ``pattern``; fails after ``timeout`` seconds or on exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n" + "\n".join(self.lines))

    def finish(self, timeout: float) -> int:
        """Wait for the exit (the reader thread alone reads stderr); returns the exit code."""
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()  # a few lines: they fit the pipe's buffer
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster for this module; its finalizer leaves no Ray process behind."""
    temp_dir = Path(tempfile.mkdtemp(prefix="lipdet-mn-", dir="/tmp"))  # short: Ray's socket paths are limited
    nodes = TwoNodeCluster(temp_dir)
    try:
        nodes.start_head()
        nodes.start_node("node2")
        yield nodes
    finally:
        left = nodes.shutdown()
        stray = sorted(p for p in _naming(temp_dir) if not _gone(p))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left and not stray, f"Ray processes left behind: pids {left}, {stray}"


def _lipdet_env(cluster: TwoNodeCluster) -> dict[str, str]:
    return {**cluster.env, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def svhn(tmp_path_factory) -> Path:
    """360 train images (+40 held out for validation), 16 test: epochs of seconds, so node 2 can be
    stopped in the middle of one."""
    from lipdet.data.synth import synthesize

    root = tmp_path_factory.mktemp("mn-svhn")
    synthesize(root, 400, 16, 0, progress=False)
    return root


@pytest.fixture(scope="module")
def elastic_run(cluster, svhn, tmp_path_factory):
    """``lipdet train --address HEAD --workers 1..2``; node 2 killed in epoch 2, then started again."""
    out = tmp_path_factory.mktemp("mn-runs")  # shared by both nodes: they are on this one machine
    args = ["train", "--address", cluster.address, "--workers", "1..2", "--resize-check", "2", "--cpu",
            "--precision", "fp32", "--data", str(svhn), "--width", "0.25", "--batch-size", "4",
            "--epochs", str(EPOCHS), "--seed", "3", "--out", str(out), "--name", "elastic", "--no-progress"]
    run = Command(args, _lipdet_env(cluster))
    events: dict[str, float] = {"started": time.monotonic()}
    try:
        run.wait_for(r"^2 worker\(s\) on cpu", START_TIMEOUT_S)
        run.wait_for(rf"^epoch 1/{EPOCHS}  2 workers", 60)
        time.sleep(0.6)  # one Ray Train poll (0.5 s here) to register the epoch-1 checkpoint
        cluster.kill_node("node2")
        events["killed"] = time.monotonic()
        run.wait_for(r"resized 2 -> 1", 90)
        events["shrunk"] = time.monotonic()
        cluster.start_node("node2")
        run.wait_for(r"resized 1 -> 2", 90)
        events["grown"] = time.monotonic()
        code = run.finish(RUN_TIMEOUT_S)
    finally:
        run.kill()
        for t, line in zip(run.times, run.lines):
            print(f"{t - events['started']:6.1f} s  {line!r}", file=sys.stderr)
        print({k: round(v - events["started"], 1) for k, v in events.items()}, file=sys.stderr)
    return {"code": code, "stderr": run.lines, "stdout": run.stdout, "run": out / "elastic", "events": events}


def test_lost_node_run_shrinks_then_grows_and_finishes(elastic_run):
    r = elastic_run
    log = "\n".join(r["stderr"])
    assert r["code"] == 0, log
    epoch_lines = [line for line in r["stderr"] if re.match(rf"^epoch \d+/{EPOCHS} ", line)]
    done = [int(re.match(r"^epoch (\d+)/", line).group(1)) for line in epoch_lines]
    assert sorted(set(done)) == list(range(1, EPOCHS + 1)), log
    assert len(done) - EPOCHS <= 1, f"more than one epoch redone: {done}"
    history = [json.loads(x) for x in (r["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    # the final history: epochs on both nodes, then on the one left (from the last checkpoint before
    # the loss), then on both again (from the last checkpoint before the resize)
    workers = [h["workers"] for h in history]
    shrink = workers.index(1)
    grow = shrink + workers[shrink:].index(2)
    assert set(workers[:shrink]) <= {2} and set(workers[shrink:grow]) == {1} and set(workers[grow:]) == {2}, workers
    assert history[grow]["resumed_from"] == grow
    assert history[shrink]["resumed_from"] == (shrink or None)
    assert "worker group resized 2 -> 1" in log and "worker group resized 1 -> 2" in log
    card = json.loads((r["run"] / "train.json").read_text())
    assert card["workers"] == 2 and card["min_workers"] == 1 and card["finished_epochs"] == EPOCHS
    ev = r["events"]
    print(f"nodes stopped 1, restarted 1; epochs redone {len(done) - EPOCHS}; runs completed 1; workers per epoch "
          f"{workers}; shrunk {ev['shrunk'] - ev['killed']:.1f} s after the kill, grew {ev['grown'] - ev['shrunk']:.1f} s "
          "after the restart began", file=sys.stderr)


def _lipdet(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lipdet.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _export_then_eval(model: Path, folder: Path) -> tuple[subprocess.CompletedProcess, ...]:
    """``lipdet export MODEL`` then ``lipdet eval`` of the ONNX (no cluster: ``RAY_ADDRESS`` unset)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    exp = _lipdet(["export", str(model), "--out", str(folder / "m.onnx")], env, timeout=120)
    if exp.returncode != 0:
        return (exp,)
    return exp, _lipdet(["eval", str(folder / "m.onnx"), "--json", str(folder / "e.json"), "--no-progress"], env,
                        timeout=120)


@pytest.fixture(scope="module")
def model_commands(cluster, elastic_run, tmp_path_factory) -> dict[str, Future]:
    """The trained model's commands, all at once (independent processes; most of each is its start-up):
    export then eval; eval --pgd sharded over both nodes; the same eval on one worker (starts no Ray).
    Yields each one's finished future (its own error raises only in the test that reads it)."""
    folder = tmp_path_factory.mktemp("mn-model")
    model = elastic_run["run"] / "model.pt"
    common = ["eval", str(model), "--pgd", "--steps", "2", "--attack-loss", "cls", "--limit", "8", "--batch-size",
              "3", "--no-progress"]
    env = _lipdet_env(cluster)
    with ThreadPoolExecutor(3) as pool:
        futures = {
            "export_eval": pool.submit(_export_then_eval, model, folder),
            "two": pool.submit(_lipdet, [*common, "--workers", "2", "--address", cluster.address, "--json",
                                         str(folder / "two.json")], env),
            "one": pool.submit(_lipdet, [*common, "--json", str(folder / "one.json")], env),
        }
    return {**futures, "folder": folder}


def test_elastic_model_exports_and_evaluates(model_commands):
    runs = model_commands["export_eval"].result()
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert len(runs) == 2
    clean = json.loads((model_commands["folder"] / "e.json").read_text())["clean"]
    assert 0.0 <= clean["map_50"] <= 1.0


def test_eval_sharded_over_both_nodes_matches_one_worker(cluster, model_commands):
    two, one = model_commands["two"].result(), model_commands["one"].result()
    assert two.returncode == 0, two.stderr
    assert one.returncode == 0, one.stderr
    a, b = (json.loads((model_commands["folder"] / f).read_text()) for f in ("one.json", "two.json"))
    assert b["settings"]["workers"] == 2 and b["settings"]["address"] == cluster.address
    for key in ("clean", "pgd"):
        assert a[key] == b[key], key
    assert cluster.nodes_alive() == 2
