"""The Slicer module's job runner, driving real worker subprocesses through an injected scheduler."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bundle_fixtures import blob, make_random_bundle
from ScoreFusionLib import protocol
from ScoreFusionLib.data.task import TaskSpec
from ScoreFusionLib.degradation import AveragePool
from ScoreFusionLib.jobio import CANCEL_FILE, OUTPUT_FILE, OUTPUT_JSON, read_output, write_job
from ScoreFusionLib.volume import Volume

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ScoreFusionSlicer"))

from ScoreFusionSlicerLib.runner import JobRunner, worker_command  # noqa: E402

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "-1"}
ENV.pop("SCOREFUSION_FAKE_OOM", None)

# A worker that ignores the cancel file and keeps a sleeping child process.
STUBBORN = """
import json, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(json.dumps({"event": "hello", "protocol": 1, "pid": 0, "torch": None, "device": "cpu"}), flush=True)
print(json.dumps({"event": "log", "msg": "child %d" % child.pid}), flush=True)
print("plain text, not JSON", flush=True)
print("{broken json", flush=True)
print("a line on stderr", file=sys.stderr, flush=True)
print(json.dumps({"event": "progress", "step": 1, "total": 100, "patch": 1, "patches": 1,
                  "elapsed_s": 0.0, "eta_s": None}), flush=True)
while True:
    time.sleep(0.1)
"""


class Loop:
    """A synchronous stand-in for ``qt.QTimer.singleShot``: pending callbacks, run by the test."""

    def __init__(self):
        self.pending = []
        self.delays = []

    def schedule(self, ms, fn):
        self.delays.append(ms)
        self.pending.append(fn)

    def run(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while self.pending:
            assert time.monotonic() < deadline, "the job did not finish in time"
            self.pending.pop(0)()
            time.sleep(0.01)


class Recorder:
    def __init__(self):
        self.events, self.done, self.threads = [], [], set()

    def on_event(self, event):
        self.threads.add(threading.get_ident())
        self.events.append(event)

    def on_done(self, code):
        self.threads.add(threading.get_ident())
        self.done.append(code)

    def names(self):
        return [e["event"] for e in self.events]


def alive(pid):
    """Whether ``pid`` runs (a zombie waiting for a reaper counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def gone_soon(pid, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def child_pid(rec):
    return int(next(e["msg"].split()[1] for e in rec.events if e["event"] == "log" and e["msg"].startswith("child ")))


@pytest.fixture(scope="module")
def sr_bundle(tmp_path_factory):
    spec = TaskSpec(kind="sr", inputs=[], target="t1n", degradation=AveragePool(2))
    return make_random_bundle(tmp_path_factory.mktemp("sr") / "bundle", spec)


def sr_job(folder, bundle, steps=3):
    lr = Volume(blob((8, 8, 8), np.random.default_rng(0)), AFFINE)
    write_job(folder, {"t1n": lr}, {"task": "super_resolve", "contrasts": ["t1n"], "bundle": str(bundle),
                                    "sampler": "ddim", "steps": steps, "device": "cpu"})
    return folder


def stubborn_cmd(tmp_path):
    script = tmp_path / "stubborn_worker.py"
    script.write_text(STUBBORN)
    return [sys.executable, str(script)]


def test_worker_command():
    cmd = worker_command("/opt/PythonSlicer", "/lib/root", "/tmp/job", device="cuda:1")
    assert cmd == ["/opt/PythonSlicer", os.path.join("/lib/root", "ScoreFusionLib", "worker.py"), "run", "--job",
                   "/tmp/job", "--device", "cuda:1"]
    assert worker_command("py", "/r", "/j")[-2:] == ["--job", "/j"]


def test_successful_job_through_the_scheduler(tmp_path, sr_bundle):
    job = sr_job(tmp_path / "job", sr_bundle)
    loop, rec = Loop(), Recorder()
    runner = JobRunner(loop.schedule, poll_ms=50)
    runner.start(worker_command(sys.executable, REPO, job, device="cpu"), job, rec.on_event, rec.on_done, env=ENV)
    assert runner.is_running and loop.pending and set(loop.delays) == {50}
    loop.run()
    assert rec.done == [protocol.EXIT_OK] and not runner.is_running
    assert rec.threads == {threading.get_ident()}  # every callback on the calling thread
    seq = rec.names()
    assert seq[0] == "hello" and seq[-1] == "result" and rec.events[-1]["path"] == OUTPUT_FILE
    assert [e["name"] for e in rec.events if e["event"] == "stage"] == list(protocol.RUN_STAGES)
    steps = [e["step"] for e in rec.events if e["event"] == "progress"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3
    assert seq.index("stage") < seq.index("progress") < seq.index("result")
    vol, prov = read_output(job)
    assert vol.array.shape == (16, 16, 16) and prov["steps"] == 3
    assert runner.last_log_lines(1)[0].startswith('{"event":"result"')
    assert runner.cancel() is False  # nothing left to cancel
    loop.run()  # no stale timer calls on_done again
    assert rec.done == [0]


def test_cooperative_cancel(tmp_path, sr_bundle):
    job = sr_job(tmp_path / "job", sr_bundle, steps=20)
    loop, rec = Loop(), Recorder()
    runner = JobRunner(loop.schedule, poll_ms=20)

    def on_event(event):
        rec.on_event(event)
        if event["event"] == "progress" and not runner.cancel_requested:
            assert runner.cancel() is True

    runner.start(worker_command(sys.executable, REPO, job), job, on_event, rec.on_done, env=ENV)
    loop.run()
    assert rec.done == [protocol.EXIT_CANCELLED] and not runner.killed
    assert rec.events[-1]["event"] == "error" and rec.events[-1]["kind"] == "cancelled"
    assert "result" not in rec.names() and (job / CANCEL_FILE).exists()
    assert not (job / OUTPUT_FILE).exists() and not (job / OUTPUT_JSON).exists()


@pytest.mark.skipif(os.name == "nt", reason="checks the child through POSIX signals")
def test_forced_kill_takes_the_whole_tree(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    loop, rec = Loop(), Recorder()
    runner = JobRunner(loop.schedule, poll_ms=20, kill_grace_s=0.5)

    def on_event(event):
        rec.on_event(event)
        if event["event"] == "progress":
            runner.cancel()

    runner.start(stubborn_cmd(tmp_path), job, on_event, rec.on_done, env=ENV)
    parent = runner.pid
    t0 = time.monotonic()
    loop.run(timeout=30)
    assert time.monotonic() - t0 < 15
    assert runner.killed and len(rec.done) == 1 and rec.done[0] != 0
    assert gone_soon(parent) and gone_soon(child_pid(rec))
    assert (job / CANCEL_FILE).exists()


def test_non_json_lines_arrive_as_log_events_and_starting_twice_raises(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    loop, rec = Loop(), Recorder()
    runner = JobRunner(loop.schedule, poll_ms=20, kill_grace_s=0.2)
    runner.start(stubborn_cmd(tmp_path), job, rec.on_event, rec.on_done, env=ENV)
    with pytest.raises(RuntimeError, match="already running"):
        runner.start(stubborn_cmd(tmp_path), job, rec.on_event, rec.on_done, env=ENV)
    deadline = time.monotonic() + 30
    while "progress" not in rec.names():
        assert time.monotonic() < deadline
        loop.pending.pop(0)()
        time.sleep(0.01)
    logs = [e["msg"] for e in rec.events if e["event"] == "log"]
    assert {"plain text, not JSON", "{broken json", "a line on stderr"} <= set(logs)
    assert rec.names()[0] == "hello"
    assert "plain text, not JSON" in runner.last_log_lines(10)
    runner.cancel()
    loop.run()
    assert len(rec.done) == 1 and rec.done[0] != 0 and not runner.is_running


def test_wait_for_completion_returns_the_exit_code(tmp_path):
    loop, rec = Loop(), Recorder()
    runner = JobRunner(loop.schedule, poll_ms=20)
    runner.start([sys.executable, "-c", "print('hi'); raise SystemExit(3)"], tmp_path, rec.on_event, rec.on_done)
    assert runner.wait_for_completion(timeout=30) == 3
    assert rec.done == [3] and rec.events == [{"event": "log", "msg": "hi"}]
    loop.run()  # the scheduled tick is stale now
    assert rec.done == [3]
    with pytest.raises(RuntimeError, match="no ScoreFusion job"):
        runner.wait_for_completion()


@pytest.mark.skipif(os.name == "nt", reason="checks the child through POSIX signals")
def test_wait_for_completion_timeout_cancels_and_kills(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    loop, rec = Loop(), Recorder()
    runner = JobRunner(loop.schedule, poll_ms=20, kill_grace_s=0.5)
    runner.start(stubborn_cmd(tmp_path), job, rec.on_event, rec.on_done, env=ENV)
    parent = runner.pid
    with pytest.raises(TimeoutError, match="cancelled"):
        runner.wait_for_completion(timeout=1.0)
    assert not runner.is_running and len(rec.done) == 1 and rec.done[0] != 0
    assert (job / CANCEL_FILE).exists()
    assert gone_soon(parent) and gone_soon(child_pid(rec))


def test_log_is_capped(tmp_path):
    runner = JobRunner(Loop().schedule, poll_ms=5, log_limit_kib=1)
    code = "import sys\nfor i in range(400): print('line %04d' % i + 'x' * 40)"
    rec = Recorder()
    runner.start([sys.executable, "-c", code], tmp_path, rec.on_event, rec.on_done)
    assert runner.wait_for_completion(timeout=30) == 0
    assert len(rec.events) == 400
    kept = runner.last_log_lines(1000)
    assert 0 < len(kept) < 400 and sum(len(s) + 1 for s in kept) <= 1024
    assert kept[-1].startswith("line 0399") and runner.last_log_lines(0) == []


def test_psutil_branch_kills_children_first(monkeypatch):
    """With psutil present, descendants are killed before the worker (a fake psutil records the order)."""
    import types

    order = []

    class Proc:
        def __init__(self, pid):
            self.pid = pid

        def children(self, recursive=False):
            assert recursive
            return [Proc(11), Proc(12)]

        def kill(self):
            order.append(self.pid)

    fake = types.ModuleType("psutil")
    fake.Process = Proc
    fake.Error = Exception
    monkeypatch.setitem(sys.modules, "psutil", fake)

    class Popen:
        pid = 10

        def kill(self):
            order.append(self.pid)

    runner = JobRunner(Loop().schedule)
    runner._proc, runner._pgid = Popen(), None
    runner._kill_tree()
    assert order == [12, 11, 10] and runner.killed
