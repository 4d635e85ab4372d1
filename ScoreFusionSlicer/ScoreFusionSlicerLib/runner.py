"""Run the ScoreFusion worker as a subprocess without freezing the caller's event loop.

:class:`JobRunner` starts ``worker.py run --job DIR`` with stderr merged into stdout. A daemon
reader thread pushes raw lines into a :class:`queue.Queue`; a poll function, scheduled with the
injected ``schedule(ms, fn)`` (``qt.QTimer.singleShot`` in Slicer, a plain loop in tests), drains
that queue on the caller's thread, parses each line with
:func:`ScoreFusionLib.protocol.parse_line`, calls ``on_event(event)`` and re-arms itself until the
process has exited and every line has been delivered; then it calls ``on_done(exit_code)`` once.

Cancel has two stages: :meth:`JobRunner.cancel` writes ``<job>/cancel`` (the worker stops within one
step and exits 130); if the process is still alive ``kill_grace_s`` later, the poll loop kills the
whole process tree, children first (psutil when installed; otherwise ``os.killpg`` on POSIX, where
the worker runs in its own session, or ``taskkill /T /F`` on Windows). ``on_done`` then receives
a non-zero code (negative on POSIX), which callers treat as cancelled.

Only the standard library is imported at file scope: ScoreFusionLib (for the protocol and the
job folder) and psutil are imported inside functions.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from typing import Any, Callable

_EOF = object()
#: How long to wait for the end of the output after the process has exited (a surviving
#: grandchild may hold the pipe open).
EOF_WAIT_S = 2.0

logger = logging.getLogger(__name__)


def worker_command(python_executable: str, lib_root: str | os.PathLike, job_dir: str | os.PathLike,
                   device: str | None = None) -> list[str]:
    """``[python, <lib_root>/ScoreFusionLib/worker.py, "run", "--job", job_dir (, "--device", device)]``.

    ``lib_root`` is the folder that holds the ``ScoreFusionLib`` package; in Slicer the
    interpreter is ``shutil.which("PythonSlicer")``.
    """
    cmd = [str(python_executable), os.path.join(os.fspath(lib_root), "ScoreFusionLib", "worker.py"),
           "run", "--job", os.fspath(job_dir)]
    if device:
        cmd += ["--device", str(device)]
    return cmd


def _read_lines(stream: Any, q: queue.Queue) -> None:
    """Reader thread: every raw line of ``stream`` into ``q``, then the end marker."""
    try:
        while True:
            line = stream.readline()
            if not line:
                break
            q.put(line)
    except (OSError, ValueError):  # the pipe was closed under us
        pass
    finally:
        q.put(_EOF)


class JobRunner:
    """One worker subprocess at a time, polled through ``schedule(ms, fn)`` on the caller's thread."""

    def __init__(self, schedule: Callable[[int, Callable[[], None]], Any], popen: Callable[..., Any] = subprocess.Popen,
                 kill_grace_s: float = 10.0, poll_ms: int = 200, log_limit_kib: int = 256) -> None:
        if kill_grace_s < 0:
            raise ValueError("kill_grace_s must not be negative")
        if poll_ms < 1:
            raise ValueError("poll_ms must be at least 1")
        self._schedule = schedule
        self._popen = popen
        self.kill_grace_s = float(kill_grace_s)
        self.poll_ms = int(poll_ms)
        self._log_limit = max(1, int(log_limit_kib)) * 1024
        self._log: collections.deque[str] = collections.deque()
        self._log_size = 0
        self._generation = 0
        self._proc: Any = None
        self._reset_job()

    # -- state ---------------------------------------------------------------------------------
    def _reset_job(self) -> None:
        self._proc = None
        self._job_dir: str | None = None
        self._on_event: Callable[[dict], Any] | None = None
        self._on_done: Callable[[int], Any] | None = None
        self._queue: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._eof = False
        self._exited_at: float | None = None
        self._cancel_at: float | None = None
        self._killed = False
        self._pgid: int | None = None
        self._active = False

    @property
    def is_running(self) -> bool:
        """True from :meth:`start` until just before ``on_done`` is called."""
        return self._active

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_at is not None

    @property
    def killed(self) -> bool:
        """Whether the current (or last) job had to be killed after the grace period."""
        return self._killed

    def last_log_lines(self, n: int = 50) -> list[str]:
        """The last ``n`` raw output lines (the log keeps at most ``log_limit_kib``)."""
        if n <= 0:
            return []
        return list(self._log)[-int(n):]

    def _append_log(self, line: str) -> None:
        self._log.append(line)
        self._log_size += len(line) + 1
        while self._log_size > self._log_limit and len(self._log) > 1:
            self._log_size -= len(self._log.popleft()) + 1

    # -- start ---------------------------------------------------------------------------------
    def start(self, cmd: list[str], job_dir: str | os.PathLike, on_event: Callable[[dict], Any],
              on_done: Callable[[int], Any], env: dict[str, str] | None = None) -> None:
        """Start ``cmd`` for the job folder ``job_dir``; events and the exit code arrive through the callbacks."""
        if self._active:
            raise RuntimeError("a ScoreFusion job is already running; cancel it or wait for it to finish "
                               "before starting another")
        if not cmd:
            raise ValueError("the worker command is empty")
        self._reset_job()
        self._log.clear()
        self._log_size = 0
        run_env = dict(os.environ if env is None else env)
        run_env.setdefault("PYTHONUNBUFFERED", "1")
        run_env.setdefault("PYTHONIOENCODING", "utf-8")
        kwargs: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
                                  "stderr": subprocess.STDOUT, "env": run_env, "bufsize": 0}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)
        else:
            kwargs["start_new_session"] = True
        proc = self._popen([str(c) for c in cmd], **kwargs)
        self._proc = proc
        self._job_dir = os.fspath(job_dir)
        self._on_event, self._on_done = on_event, on_done
        if os.name != "nt":
            try:
                pgid = os.getpgid(proc.pid)
                self._pgid = pgid if pgid != os.getpgrp() else None  # never our own group
            except (OSError, TypeError, AttributeError):
                self._pgid = None
        self._reader = threading.Thread(target=_read_lines, args=(proc.stdout, self._queue),
                                        name="ScoreFusionWorkerReader", daemon=True)
        self._reader.start()
        self._active = True
        self._generation += 1
        self._arm(self._generation)

    def _arm(self, generation: int) -> None:
        self._schedule(self.poll_ms, lambda: self._tick(generation))

    def _tick(self, generation: int) -> None:
        if generation != self._generation or not self._active:
            return  # a stale timer of a finished job
        if not self._poll_once():
            self._arm(generation)

    # -- polling -------------------------------------------------------------------------------
    def _deliver(self, raw: Any) -> None:
        from ScoreFusionLib.protocol import parse_line

        event = parse_line(raw)
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        self._append_log(text.rstrip("\r\n"))
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken callback must not stop the polling (on_done must still come)
                logger.exception("ScoreFusion: the event callback failed on %r", event)

    def _poll_once(self) -> bool:
        """Drain the queue, handle cancel and exit; True once ``on_done`` has been called."""
        if not self._active:
            return True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _EOF:
                self._eof = True
            else:
                self._deliver(item)
        proc = self._proc
        code = proc.poll()
        now = time.monotonic()
        if code is None:
            if self._cancel_at is not None and not self._killed and now - self._cancel_at >= self.kill_grace_s:
                self._kill_tree()
            return False
        if self._exited_at is None:
            self._exited_at = now
        if not self._eof and now - self._exited_at < EOF_WAIT_S:
            return False  # lines may still be in the pipe
        self._finish(int(code))
        return True

    def _finish(self, code: int) -> None:
        if self._killed and code == 0:
            code = -int(getattr(signal, "SIGKILL", 9))
        if self._reader is not None:
            self._reader.join(timeout=0.5)
        stream = getattr(self._proc, "stdout", None)
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
        on_done = self._on_done
        self._active = False
        self._on_done = self._on_event = None
        if on_done is not None:
            on_done(code)

    # -- cancel --------------------------------------------------------------------------------
    def cancel(self) -> bool:
        """Ask the worker to stop (stage 1); the poll loop kills it ``kill_grace_s`` later (stage 2).

        Returns False when no job is running. Calling it again does not restart the grace period.
        """
        if not self._active:
            return False
        if self._cancel_at is None:
            self._cancel_at = time.monotonic()
            try:
                from ScoreFusionLib.jobio import request_cancel

                request_cancel(self._job_dir)
            except Exception:  # the folder vanished, or the library cannot be imported: kill at the deadline
                logger.exception("ScoreFusion: could not write the cancel file in %s", self._job_dir)
        return True

    def _kill_tree(self) -> None:
        """Kill the worker and all its descendants, children first."""
        self._killed = True
        proc = self._proc
        pid = proc.pid
        try:
            import psutil  # optional; not bundled with Slicer
        except ImportError:
            psutil = None
        if psutil is not None:
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                children = []
            for child in reversed(children):  # deepest last in the list: kill those first
                try:
                    child.kill()
                except psutil.Error:
                    pass
        elif os.name == "nt":
            try:
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=10, check=False)
            except (OSError, subprocess.SubprocessError):
                pass
        if os.name != "nt" and self._pgid is not None:
            try:  # the worker runs in its own session: this also catches anything psutil missed
                os.killpg(self._pgid, signal.SIGKILL)
            except OSError:
                pass
        try:
            proc.kill()
        except OSError:
            pass

    # -- blocking use --------------------------------------------------------------------------
    def wait_for_completion(self, timeout: float | None = None) -> int:
        """Drive the poll loop until the job ends, without an event loop; the exit code.

        On ``timeout`` (seconds) the job is cancelled (and killed after the grace period), the
        loop runs until the process is gone, and :class:`TimeoutError` is raised.
        """
        if not self._active:
            raise RuntimeError("no ScoreFusion job is running")
        result: list[int] = []
        on_done = self._on_done

        def capture(code: int) -> None:
            result.append(code)
            if on_done is not None:
                on_done(code)

        self._on_done = capture
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        timed_out = False
        pause = min(self.poll_ms / 1000.0, 0.05)
        while not self._poll_once():
            if deadline is not None and not timed_out and time.monotonic() >= deadline:
                timed_out = True
                self.cancel()
            time.sleep(pause)
        if timed_out:
            raise TimeoutError(f"the ScoreFusion job did not finish within {timeout} s; it was cancelled "
                               f"(exit code {result[0] if result else None})")
        return result[0]


__all__ = ["JobRunner", "worker_command", "EOF_WAIT_S"]
