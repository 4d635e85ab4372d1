"""The Qt-free presenter behind the module's Apply/Cancel button (slicer.md section 4)."""

from __future__ import annotations

import pytest

from ScoreFusionLib import presenter as P
from ScoreFusionLib import protocol


def started():
    p = P.Presenter()
    p.apply()
    p.prepared()
    p.on_line(protocol.dumps(protocol.hello("2.13.0", "cpu", pid=7)))
    return p


def test_happy_path():
    p = P.Presenter()
    seen = [p.state]
    p.apply()
    seen.append(p.state)
    p.prepared()
    seen.append(p.state)
    p.on_line(protocol.dumps(protocol.hello("2.13.0", "cuda:0", pid=7)) + "\n")
    seen.append(p.state)
    for name in protocol.RUN_STAGES[:3]:
        p.on_event(protocol.stage(name))
    for step in range(1, 4):
        p.on_event(protocol.progress(step, 3, eta_s=None if step == 1 else 10.0 * (3 - step)))
    assert p.view_state()["progress_value"] == 1000
    p.on_line("UserWarning: some torch noise")
    p.on_event(protocol.stage("writing"))
    p.on_event(protocol.result("output.npz"))
    seen.append(p.state)
    p.on_exit(0)
    assert p.state == P.IMPORTING
    p.import_done()
    seen.append(p.state)
    assert p.view_state()["progress_value"] == 1000
    p.reset()
    seen.append(p.state)
    assert seen == [P.IDLE, P.PREPARING, P.STARTING, P.RUNNING, P.IMPORTING, P.DONE, P.IDLE]
    assert p.result_path == "output.npz" and p.pid == 7 and p.device == "cuda:0"
    assert "some torch noise" in p.log_text


def test_cancel_path_with_exit_130():
    p = started()
    p.on_event(protocol.stage("sampling"))
    p.on_event(protocol.progress(2, 10, eta_s=40))
    p.cancel()
    view = p.view_state()
    assert (view["state"], view["apply_text"], view["apply_enabled"], view["inputs_locked"]) == (
        P.CANCELLING, "Cancel", False, True)
    assert view["progress_text"].startswith("Cancelling · Sampling 2/10")
    p.on_event(protocol.progress(3, 10))  # a step that finished meanwhile
    p.on_event(protocol.error("cancelled", "cancelled after step 3/10"))
    assert p.state == P.CANCELLING
    p.on_exit(protocol.EXIT_CANCELLED)
    assert p.state == P.CANCELLED and p.view_state()["error"] == ""
    p.reset()
    assert p.state == P.IDLE


def test_cancel_while_starting_and_forced_kill():
    p = P.Presenter()
    p.apply()
    p.prepared()
    p.cancel()
    p.on_event(protocol.hello("2.13.0", "cpu"))  # late hello changes nothing
    assert p.state == P.CANCELLING
    p.killed()
    assert p.state == P.CANCELLED
    q = started()
    q.cancel()
    q.on_exit(-9)  # killed by a signal
    assert q.state == P.CANCELLED


def test_failure_paths():
    p = started()
    p.on_event(protocol.error("oom", "out of memory", "use the CPU"))
    view = p.view_state()
    assert view["state"] == P.FAILED and view["error"] == "out of memory" and view["hint"] == "use the CPU"
    assert view["error_kind"] == "oom" and view["apply_text"] == "Apply" and view["apply_enabled"]
    assert not view["inputs_locked"]
    p.on_exit(protocol.EXIT_OOM)  # the exit after the error event keeps FAILED
    assert p.state == P.FAILED and p.exit_code == 3
    # a crash without an error event: the message names the code, the hint carries the last log lines
    q = started()
    for i in range(80):
        q.on_line(f"traceback line {i}")
    q.on_exit(1)
    assert q.state == P.FAILED and "exit code 1" in q.error_message
    assert q.error_hint.splitlines() == [f"traceback line {i}" for i in range(30, 80)]
    # exit 0 without a result is a failure too
    r = started()
    r.on_exit(0)
    assert r.state == P.FAILED and "without a result" in r.error_message
    # preparation and import can fail
    s = P.Presenter()
    s.apply()
    s.prepare_failed("no model selected", "choose a model")
    assert s.state == P.FAILED and s.view_state()["hint"] == "choose a model"
    t = started()
    t.on_event(protocol.result("output.npz"))
    t.import_failed("could not read output.npz")
    assert t.state == P.FAILED


def test_apply_again_from_finished_states_and_abort_preparation():
    p = started()
    p.on_event(protocol.error("input", "bad"))
    p.on_line("old log line")
    p.apply()  # straight from FAILED: a fresh run
    assert p.state == P.PREPARING and p.error_message == "" and p.log_text == ""
    p.prepare_aborted()
    assert p.state == P.IDLE


BUTTONS = {
    P.IDLE: ("Apply", True, False),
    P.PREPARING: ("Apply", False, True),
    P.STARTING: ("Cancel", True, True),
    P.RUNNING: ("Cancel", True, True),
    P.IMPORTING: ("Apply", False, True),
    P.DONE: ("Apply", True, False),
    P.CANCELLING: ("Cancel", False, True),
    P.CANCELLED: ("Apply", True, False),
    P.FAILED: ("Apply", True, False),
}


@pytest.mark.parametrize("state", P.STATES)
def test_button_text_enabled_and_lock_per_state(state):
    p = P.Presenter()
    p.state = state
    view = p.view_state()
    assert (view["apply_text"], view["apply_enabled"], view["inputs_locked"]) == BUTTONS[state]
    assert view["state"] == state and isinstance(view["status"], str)


def test_progress_value_and_text():
    p = started()
    assert p.view_state()["progress_text"] == "Running…"
    p.on_event(protocol.stage("loading_weights"))
    assert p.view_state()["progress_text"] == "Loading weights…"
    p.on_event(protocol.stage("sampling"))
    p.on_event(protocol.progress(12, 50, eta_s=None))
    assert p.view_state()["progress_text"] == "Sampling 12/50"
    assert p.view_state()["progress_value"] == 240
    p.on_event(protocol.progress(12, 50, eta_s=41.2))
    assert p.view_state()["progress_text"] == "Sampling 12/50 · ~41 s left"
    p.on_event(protocol.progress(12, 50, patch=3, patches=8, eta_s=600))
    view = p.view_state()
    assert view["progress_text"] == "Sampling 12/50 · patch 3/8 · ~10 min left"
    assert view["progress_value"] == round(1000 * (11 + 3 / 8) / 50)
    p.on_event(protocol.stage("postprocessing"))
    assert p.view_state()["progress_text"] == "Postprocessing…"
    assert P.format_duration(3 * 3600 + 5 * 60) == "3 h 05 min"


def test_log_is_capped():
    p = P.Presenter(log_limit_kib=1)
    p.apply()
    p.prepared()
    for i in range(200):
        p.on_line(f"line {i:04d} " + "x" * 40)
    text = p.log_text
    assert len(text.encode()) <= 1024 and text.endswith("line 0199 " + "x" * 40)
    assert "line 0000" not in text


@pytest.mark.parametrize("setup, action", [
    ([], "prepared"),
    ([], "cancel"),
    ([], "import_done"),
    ([], "killed"),
    (["apply"], "apply"),
    (["apply"], "cancel"),
    (["apply", "prepared"], "apply"),
    (["apply", "prepared"], "import_done"),
    (["apply", "prepared", "cancel"], "cancel"),
    (["apply", "prepared", "cancel"], "reset"),
])
def test_invalid_user_transitions_raise(setup, action):
    p = P.Presenter()
    for name in setup:
        getattr(p, name)()
    before = p.state
    with pytest.raises(P.InvalidTransition, match=f"in state {before}"):
        getattr(p, action)()
    assert p.state == before


def test_invalid_worker_events_raise():
    p = P.Presenter()
    with pytest.raises(P.InvalidTransition, match="no worker is running"):
        p.on_event(protocol.hello("2.13.0", "cpu"))
    with pytest.raises(P.InvalidTransition, match="no worker is running"):
        p.on_exit(0)
    p.apply()
    p.prepared()
    with pytest.raises(P.InvalidTransition, match="before its hello"):
        p.on_event(protocol.progress(1, 3))
    p.on_event(protocol.hello("2.13.0", "cpu"))
    with pytest.raises(P.InvalidTransition, match="second hello"):
        p.on_event(protocol.hello("2.13.0", "cpu"))
    with pytest.raises(P.InvalidTransition, match="only from PREPARING"):
        p.prepare_failed("x")
    with pytest.raises(P.InvalidTransition, match="only from IMPORTING"):
        p.import_failed("x")


def test_late_events_after_the_end_are_only_logged():
    p = started()
    p.cancel()
    p.killed()
    p.on_event(protocol.progress(5, 10))
    p.on_event(protocol.error("cancelled", "too late"))
    p.on_exit(130)
    assert p.state == P.CANCELLED and "too late" in p.log_text
