"""Peak memory of a block of code, for the cost columns of an evaluation (method.md section 8.1).

On a CUDA device the figure is torch's own bookkeeping: the peak of allocated tensor memory
above what was allocated on entry (``torch.cuda.max_memory_allocated``). It excludes the
allocator's cache and the CUDA context, so it is what the computation needed, not what
``nvidia-smi`` shows.

On the CPU there is no allocator to ask, so a background thread polls the process's resident
set size every few milliseconds and reports the largest increase over the value on entry.
That is a rough but honest figure: it includes whatever the block leaves cached (numpy, torch
and glibc keep freed memory for reuse), misses spikes shorter than the polling interval, and
counts other threads of the process. Where ``/proc`` is missing (macOS, Windows) only the
process-lifetime maximum RSS (``resource.getrusage``) is available; its increase over the
block is zero whenever the process peaked higher before the block.
"""

from __future__ import annotations

import os
import sys
import threading
from types import TracebackType

MIB = float(1 << 20)
_STATM = "/proc/self/statm"


def _rss_now() -> int:
    """Current resident set size in bytes (from ``/proc/self/statm``)."""
    with open(_STATM, encoding="ascii") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _rss_lifetime_max() -> int:
    """The process-lifetime maximum RSS in bytes (kilobytes on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakMemory:
    """Context manager measuring the peak memory a block uses.

    Parameters
    ----------
    device : ``cpu`` (resident-set polling) or ``cuda``/``cuda:N`` (torch's allocator peak).
    interval_s : polling period on the CPU.

    Attributes (valid after the block)
    ----------------------------------
    peak_bytes : the peak increase over the value on entry, in bytes (never negative).
    peak_mib : the same in MiB.
    kind : ``cuda-allocated`` or ``cpu-rss-increase``: what the number measures.
    """

    def __init__(self, device: str = "cpu", interval_s: float = 0.005) -> None:
        self.device = str(device)
        self.interval_s = float(interval_s)
        self.kind = "cuda-allocated" if self.device.startswith("cuda") else "cpu-rss-increase"
        self.peak_bytes = 0
        self._start = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = _rss_now if os.path.exists(_STATM) else _rss_lifetime_max

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda-allocated":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._peak = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="PeakMemory", daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._read())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.kind == "cuda-allocated":
            import torch

            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._peak, self._read())
        self.peak_bytes = max(0, int(peak) - int(self._start))
