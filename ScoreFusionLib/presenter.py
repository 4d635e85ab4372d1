"""A Qt-free state machine for the module's Apply/Cancel workflow (slicer.md section 4).

::

    IDLE --apply--> PREPARING --prepared--> STARTING --hello--> RUNNING --result--> IMPORTING
    IMPORTING --import_done--> DONE --reset--> IDLE
    STARTING/RUNNING --cancel--> CANCELLING --exit 130 / killed--> CANCELLED --reset--> IDLE
    any active state --error event / exit != 0--> FAILED --reset--> IDLE

The widget feeds it user actions (:meth:`apply`, :meth:`cancel`, ...), worker events
(:meth:`on_event`, :meth:`on_line`) and the exit code (:meth:`on_exit`), and renders
:meth:`view_state`. ``apply`` is also accepted from DONE, CANCELLED and FAILED (it passes
through IDLE), so the user never has to acknowledge a finished run first.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .protocol import EXIT_CANCELLED, parse_line

IDLE = "IDLE"
PREPARING = "PREPARING"
STARTING = "STARTING"
RUNNING = "RUNNING"
IMPORTING = "IMPORTING"
DONE = "DONE"
CANCELLING = "CANCELLING"
CANCELLED = "CANCELLED"
FAILED = "FAILED"
STATES = (IDLE, PREPARING, STARTING, RUNNING, IMPORTING, DONE, CANCELLING, CANCELLED, FAILED)

ACTIVE = (PREPARING, STARTING, RUNNING, IMPORTING, CANCELLING)
FINISHED = (DONE, CANCELLED, FAILED)
WORKER_ALIVE = (STARTING, RUNNING, CANCELLING)

STAGE_LABELS = {
    "downloading": "Downloading model",
    "loading_weights": "Loading weights",
    "preprocessing": "Preprocessing",
    "sampling": "Sampling",
    "postprocessing": "Postprocessing",
    "writing": "Writing result",
}
CRASH_LOG_LINES = 50


class InvalidTransition(RuntimeError):
    """A user action or worker event that makes no sense in the current state."""


def format_duration(seconds: float) -> str:
    """``41 s``, ``3 min``, ``1 h 05 min``."""
    s = max(0, int(round(float(seconds))))
    if s < 90:
        return f"{s} s"
    minutes = int(round(s / 60.0))
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class Presenter:
    """The GUI's state; pure Python so every transition can be unit-tested."""

    def __init__(self, log_limit_kib: int = 256) -> None:
        self.log_limit = int(log_limit_kib) * 1024
        self.state = IDLE
        self._log: deque[str] = deque()
        self._log_bytes = 0
        self._reset_run()

    # -- bookkeeping ---------------------------------------------------------------------
    def _reset_run(self) -> None:
        self.stage: str | None = None
        self.progress: dict | None = None
        self.error_kind: str | None = None
        self.error_message = ""
        self.error_hint = ""
        self.result_path: str | None = None
        self.exit_code: int | None = None
        self.pid: int | None = None
        self.device: str | None = None
        self.status_note = ""

    def _go(self, new: str, allowed_from: tuple[str, ...], action: str) -> None:
        if self.state not in allowed_from:
            raise InvalidTransition(
                f"cannot {action} in state {self.state} (only from {', '.join(allowed_from)})"
            )
        self.state = new

    def _fail(self, message: str, hint: str = "", kind: str | None = None) -> None:
        self.state = FAILED
        self.error_kind = kind
        self.error_message = message
        self.error_hint = hint

    def append_log(self, line: str) -> None:
        """Add a line to the log, dropping the oldest lines beyond the size limit."""
        text = str(line).rstrip("\n")
        self._log.append(text)
        self._log_bytes += len(text.encode("utf-8", errors="replace")) + 1
        while self._log_bytes > self.log_limit and len(self._log) > 1:
            self._log_bytes -= len(self._log.popleft().encode("utf-8", errors="replace")) + 1

    @property
    def log_text(self) -> str:
        return "\n".join(self._log)

    def last_log_lines(self, n: int = CRASH_LOG_LINES) -> list[str]:
        return list(self._log)[-n:]

    # -- user actions --------------------------------------------------------------------
    def apply(self) -> None:
        """Apply pressed: start preparing (dependencies, weights, memory check)."""
        if self.state in FINISHED:
            self.reset()
        self._go(PREPARING, (IDLE,), "apply")
        self._log.clear()
        self._log_bytes = 0
        self._reset_run()

    def prepared(self) -> None:
        """Preparation succeeded; the worker process is being started."""
        self._go(STARTING, (PREPARING,), "start the worker")

    def prepare_failed(self, message: str, hint: str = "") -> None:
        if self.state != PREPARING:
            raise InvalidTransition(f"cannot fail preparation in state {self.state} (only from PREPARING)")
        self._fail(message, hint, kind="input")

    def prepare_aborted(self) -> None:
        """The user declined a dialog during preparation: back to IDLE with nothing started."""
        self._go(IDLE, (PREPARING,), "abort preparation")

    def cancel(self) -> None:
        """Cancel pressed (the button reads Cancel in STARTING and RUNNING)."""
        self._go(CANCELLING, (STARTING, RUNNING), "cancel")

    def import_done(self) -> None:
        self._go(DONE, (IMPORTING,), "finish importing")

    def import_failed(self, message: str, hint: str = "") -> None:
        if self.state != IMPORTING:
            raise InvalidTransition(f"cannot fail importing in state {self.state} (only from IMPORTING)")
        self._fail(message, hint, kind="internal")

    def killed(self) -> None:
        """The forced cancel killed the process tree."""
        self._go(CANCELLED, (CANCELLING,), "mark the worker killed")

    def reset(self) -> None:
        """Back to IDLE after DONE, CANCELLED or FAILED."""
        self._go(IDLE, (IDLE, *FINISHED), "reset")

    # -- worker output -------------------------------------------------------------------
    def on_line(self, line: str) -> dict:
        """Parse one stdout line and handle it; returns the event."""
        event = parse_line(line)
        self.on_event(event)
        return event

    def on_event(self, event: dict) -> None:
        kind = event.get("event")
        if self.state not in WORKER_ALIVE and self.state not in FINISHED and self.state != IMPORTING:
            raise InvalidTransition(f"worker event {kind!r} arrived in state {self.state}; no worker is running")
        if kind in ("log", "warning"):
            prefix = "WARNING: " if kind == "warning" else ""
            self.append_log(prefix + str(event.get("msg", "")))
            return
        if self.state in FINISHED or self.state == IMPORTING:
            # late lines of a finished worker (e.g. after a kill): keep them in the log only
            if kind == "error":
                self.append_log(f"ERROR ({event.get('kind')}): {event.get('msg', '')}")
            return
        if kind == "hello":
            self.pid, self.device = event.get("pid"), event.get("device")
            self.append_log(f"worker {self.pid} started (torch {event.get('torch')}, device {self.device})")
            if self.state == STARTING:
                self.state = RUNNING
            elif self.state == RUNNING:
                raise InvalidTransition("a second hello arrived while RUNNING")
        elif kind == "stage":
            self._require_running(kind)
            self.stage = event.get("name")
            self.progress = None
            self.append_log(f"stage: {self.stage}")
        elif kind == "progress":
            self._require_running(kind)
            self.progress = dict(event)
        elif kind == "result":
            self._require_running(kind)
            self.result_path = event.get("path")
            if self.state == RUNNING:
                self.state = IMPORTING
        elif kind == "error":
            self.append_log(f"ERROR ({event.get('kind')}): {event.get('msg', '')}")
            if self.state == CANCELLING and event.get("kind") == "cancelled":
                return  # the exit code (130) completes the cancel
            self._fail(str(event.get("msg", "")), str(event.get("hint", "") or ""), kind=event.get("kind"))
        else:
            self.append_log(str(event))

    def _require_running(self, kind: str) -> None:
        if self.state == STARTING:
            raise InvalidTransition(f"worker event {kind!r} arrived before its hello")

    def on_exit(self, code: int) -> None:
        """The worker process ended with ``code`` (negative: killed by a signal)."""
        self.exit_code = int(code)
        if self.state == CANCELLING:
            if code in (EXIT_CANCELLED, 0) or code < 0:
                self.state = CANCELLED
            else:
                self._fail(f"the worker stopped with exit code {code} while cancelling",
                           "\n".join(self.last_log_lines()), kind="internal")
            return
        if self.state in (STARTING, RUNNING):
            if code == 0:
                self._fail("the worker exited without a result", "\n".join(self.last_log_lines()),
                           kind="internal")
            else:
                self._fail(f"the worker stopped unexpectedly (exit code {code})",
                           "\n".join(self.last_log_lines()), kind="internal")
            return
        if self.state == IMPORTING:
            if code != 0:
                self._fail(f"the worker exited with code {code} after writing its result",
                           "\n".join(self.last_log_lines()), kind="internal")
            return
        if self.state in FINISHED:
            return  # e.g. exit 2 after its error event already moved us to FAILED
        raise InvalidTransition(f"a worker exit arrived in state {self.state}; no worker is running")

    # -- rendering -----------------------------------------------------------------------
    def progress_value(self) -> int:
        """0..1000 for the progress bar: ``(step - 1 + patch/patches) / total``."""
        if self.state == DONE:
            return 1000
        p = self.progress
        if not p:
            return 0
        try:
            total = max(1, int(p["total"]))
            patches = max(1, int(p.get("patches") or 1))
            fraction = (int(p["step"]) - 1 + int(p.get("patch") or 1) / patches) / total
        except (KeyError, TypeError, ValueError):
            return 0
        return int(round(1000 * min(1.0, max(0.0, fraction))))

    def progress_text(self) -> str:
        if self.state in (IDLE, PREPARING):
            return ""
        if self.state == STARTING:
            return "Starting…"
        if self.state == IMPORTING:
            return "Importing result…"
        if self.state in FINISHED:
            return {DONE: "Done", CANCELLED: "Cancelled", FAILED: "Failed"}[self.state]
        label = STAGE_LABELS.get(self.stage or "", "Running")
        prefix = "Cancelling · " if self.state == CANCELLING else ""
        p = self.progress
        if not p or self.stage not in (None, "sampling"):
            return prefix + label + ("…" if not p else "")
        parts = [f"Sampling {p.get('step')}/{p.get('total')}"]
        if int(p.get("patches") or 1) > 1:
            parts.append(f"patch {p.get('patch')}/{p.get('patches')}")
        eta = p.get("eta_s")
        if eta is not None:
            parts.append(f"~{format_duration(eta)} left")
        return prefix + " · ".join(parts)

    def status_message(self) -> str:
        return {
            IDLE: "",
            PREPARING: "Preparing (dependencies, model, memory check)…",
            STARTING: "Starting the worker…",
            RUNNING: f"Running on {self.device}" if self.device else "Running…",
            IMPORTING: "Importing the result…",
            DONE: "Done.",
            CANCELLING: "Cancelling…",
            CANCELLED: "Cancelled.",
            FAILED: f"Failed: {self.error_message}" if self.error_message else "Failed.",
        }[self.state]

    def view_state(self) -> dict[str, Any]:
        cancel_mode = self.state in (STARTING, RUNNING, CANCELLING)
        return {
            "state": self.state,
            "apply_text": "Cancel" if cancel_mode else "Apply",
            "apply_enabled": self.state not in (PREPARING, IMPORTING, CANCELLING),
            "inputs_locked": self.state in ACTIVE,
            "progress_value": self.progress_value(),
            "progress_visible": self.state in (STARTING, RUNNING, IMPORTING, CANCELLING),
            "progress_text": self.progress_text(),
            "status": self.status_message(),
            "error": self.error_message if self.state == FAILED else "",
            "hint": self.error_hint if self.state == FAILED else "",
            "error_kind": self.error_kind if self.state == FAILED else None,
            "result_path": self.result_path,
            "log": self.log_text,
        }
