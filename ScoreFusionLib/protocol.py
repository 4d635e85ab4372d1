"""The worker's progress protocol: one JSON object per stdout line.

The Slicer module (and any other driver) starts ``worker.py run --job DIR`` and reads its
stdout line by line. Every line the worker writes is one JSON object with an ``event`` key:

========== ==============================================================
event      fields
========== ==============================================================
hello      ``protocol`` (int), ``pid``, ``torch`` (version), ``device``
stage      ``name``: one of :data:`STAGES`
progress   ``step``, ``total``, ``patch``, ``patches``, ``elapsed_s``, ``eta_s`` (``fetch``:
           step and total are bytes)
log        ``msg``
warning    ``msg``
error      ``kind`` (one of :data:`ERROR_KINDS`), ``msg``, ``hint``
result     ``path``: ``run``'s output, relative to the job folder; ``fetch`` and ``import``:
           the installed model folder, absolute
========== ==============================================================

stderr is usually merged into the same pipe, so :func:`parse_line` is tolerant: anything
that is not a JSON object with a string ``event`` (a torch warning, a traceback line)
becomes a ``log`` event carrying the line. Exit codes are :data:`EXIT_OK`,
:data:`EXIT_INPUT` (input or weights problem), :data:`EXIT_OOM`, :data:`EXIT_CANCELLED`;
anything else is a crash.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from typing import IO, Any

PROTOCOL_VERSION = 1

#: The stages of a ``run`` job, in order; ``fetch`` has the one stage ``downloading``.
RUN_STAGES = ("loading_weights", "preprocessing", "sampling", "postprocessing", "writing")
STAGES = ("downloading", *RUN_STAGES)
ERROR_KINDS = ("input", "weights", "oom", "cancelled", "internal")
EVENTS = ("hello", "stage", "progress", "log", "warning", "error", "result")

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_OOM = 3
EXIT_CANCELLED = 130

#: The exit code that goes with each error kind.
EXIT_FOR_KIND = {"input": EXIT_INPUT, "weights": EXIT_INPUT, "oom": EXIT_OOM, "cancelled": EXIT_CANCELLED,
                 "internal": EXIT_INTERNAL}


class ProtocolError(ValueError):
    """An event that cannot be built (unknown stage or error kind, bad numbers)."""


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return round(v, 3) if math.isfinite(v) else None


# -- event constructors -----------------------------------------------------------------------
def hello(torch_version: str | None, device: str, pid: int | None = None,
          protocol: int = PROTOCOL_VERSION) -> dict:
    return {"event": "hello", "protocol": int(protocol), "pid": int(os.getpid() if pid is None else pid),
            "torch": torch_version, "device": str(device)}


def stage(name: str) -> dict:
    if name not in STAGES:
        raise ProtocolError(f"unknown stage {name!r}; use one of {', '.join(STAGES)}")
    return {"event": "stage", "name": name}


def progress(step: int, total: int, patch: int = 1, patches: int = 1, elapsed_s: float = 0.0,
             eta_s: float | None = None) -> dict:
    step, total, patch, patches = int(step), int(total), int(patch), int(patches)
    if total < 1 or not 1 <= step <= total:
        raise ProtocolError(f"progress step must lie in 1..total, got {step}/{total}")
    if patches < 1 or not 1 <= patch <= patches:
        raise ProtocolError(f"progress patch must lie in 1..patches, got {patch}/{patches}")
    return {"event": "progress", "step": step, "total": total, "patch": patch, "patches": patches,
            "elapsed_s": _finite_or_none(elapsed_s) or 0.0, "eta_s": _finite_or_none(eta_s)}


def log(msg: str) -> dict:
    return {"event": "log", "msg": str(msg)}


def warning(msg: str) -> dict:
    return {"event": "warning", "msg": str(msg)}


def error(kind: str, msg: str, hint: str = "") -> dict:
    if kind not in ERROR_KINDS:
        raise ProtocolError(f"unknown error kind {kind!r}; use one of {', '.join(ERROR_KINDS)}")
    return {"event": "error", "kind": kind, "msg": str(msg), "hint": str(hint or "")}


def result(path: str) -> dict:
    return {"event": "result", "path": str(path)}


# -- serialising and parsing ------------------------------------------------------------------
def dumps(event: dict) -> str:
    """One line of JSON (no newline inside, no NaN) for ``event``."""
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise ProtocolError(f"an event must be a dict with a string 'event' key, got {event!r}")
    return json.dumps(event, separators=(",", ":"), allow_nan=False, default=str)


def emit(event: dict, stream: IO[str] | None = None) -> None:
    """Write ``event`` as one line to ``stream`` (default ``sys.stdout``) and flush it."""
    out = sys.stdout if stream is None else stream
    out.write(dumps(event) + "\n")
    out.flush()


def parse_line(line: str | bytes) -> dict:
    """The event on ``line``; anything that is not a protocol object becomes a ``log`` event."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("event"), str) and obj["event"] in EVENTS:
            return obj
    return {"event": "log", "msg": text}


# -- ETA ------------------------------------------------------------------------------------
class EtaEstimator:
    """Remaining time from a moving average of step durations.

    The first step (model warm-up, CUDA kernel selection, first allocations) is usually much
    slower than the rest, so its duration is never averaged; until a second step has finished
    there is no estimate (``None``).
    """

    def __init__(self, window: int = 10, clock: Any = time.perf_counter) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.clock = clock
        self.start_time = clock()
        self.last_time = self.start_time
        self.steps_seen = 0
        self.durations: deque[float] = deque(maxlen=int(window))

    def reset(self) -> None:
        self.start_time = self.last_time = self.clock()
        self.steps_seen = 0
        self.durations.clear()

    def step_done(self, now: float | None = None) -> None:
        """Record that one more step has finished (at ``now``, default the clock)."""
        now = self.clock() if now is None else float(now)
        duration = now - self.last_time
        self.last_time = now
        self.steps_seen += 1
        if self.steps_seen > 1:  # the first (warm-up) step is skipped
            self.durations.append(max(0.0, duration))

    @property
    def elapsed(self) -> float:
        return self.last_time - self.start_time

    def mean_step(self) -> float | None:
        return sum(self.durations) / len(self.durations) if self.durations else None

    def eta(self, steps_left: int) -> float | None:
        """Seconds for ``steps_left`` more steps, or ``None`` while there is no estimate."""
        mean = self.mean_step()
        if mean is None:
            return None
        return max(0, int(steps_left)) * mean
