"""The worker the Slicer module runs as a subprocess (and anyone can run by hand).

Usage::

    python ScoreFusionLib/worker.py run --job DIR [--device auto|cpu|cuda|cuda:N]
    python ScoreFusionLib/worker.py fetch --id ID[@VERSION] --job DIR
    python ScoreFusionLib/worker.py import --path BUNDLE_DIR_OR_ZIP --job DIR
    python ScoreFusionLib/worker.py models
    python ScoreFusionLib/worker.py probe
    python -m ScoreFusionLib.worker ...

``run`` reads the job folder (:mod:`ScoreFusionLib.jobio`) and does what its ``kind`` says.
``translate`` (the default): its ``bundle`` is a bundle folder, a bundle .zip or a registry model
id, resolved by :func:`ScoreFusionLib.registry.resolve_model`, so an embedded model installs itself
on first use; it translates and writes ``output.npz`` (with the ``uncertainty`` map when the job
draws several samples). ``segment``: its ``segmenter`` is ``default`` (the shipped bundle) or a
segmenter bundle folder; it segments the tumour
(:func:`ScoreFusionLib.segmentation.inference.segment`) and writes the uint8 label map on the input
grid (+ the TC/WT/ET probabilities when asked for). Both write atomically and end with ``result``
``output.npz``. The stages are the same for both kinds; for a segmentation ``sampling`` is the
sliding-window pass and ``progress`` counts its windows.

``fetch`` installs a registry model (a download for a remote one, a copy for an embedded one; the
job folder only holds the cancel file and is created if missing): stage ``downloading``, byte
``progress`` (at most about ten events a second, always the last one), then ``result`` with the
installed folder's absolute path. ``import`` validates a bundle folder or .zip and copies it into
the cache, ending the same way. All three report on stdout with the line protocol of
:mod:`ScoreFusionLib.protocol`; stdout carries protocol lines only: Python warnings become
``warning`` events, and anything else written to file descriptor 1 (C libraries, stray prints) goes
to stderr.

Cancel: the driver creates ``<job>/cancel``; ``run`` checks it after every diffusion step (or
sliding window), ``fetch`` after every chunk; the worker stops, emits ``error kind=cancelled`` and
exits 130 without writing any output (an interrupted download keeps its ``.part`` file, so the next
fetch resumes it, but nothing appears under the cache's models folder).

Exit codes: 0 ok; 2 input or weights problem (a bad job, an unknown or not downloaded model, a wrong
checksum, an invalid bundle); 3 out of memory; 130 cancelled; 1 internal error.
Test hook: ``SCOREFUSION_FAKE_OOM=1`` raises an out-of-memory error at the first step.

``models`` prints one JSON object ``{"models": [...]}``, the registry's models and the imported ones
(:func:`ScoreFusionLib.registry.listing.list_models`); ``probe`` prints one JSON object describing
torch and the devices (or the import error). Both exit 0, except ``models`` on a
registry file it cannot read (exit 2, with ``error`` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import traceback
import warnings
from pathlib import Path
from typing import IO, Any

if __package__ in (None, ""):  # run as a script: import the package from the folder above
    _here = os.path.dirname(os.path.abspath(__file__))
    # drop the script's own folder, whose modules (errors, data, ...) would shadow top-level names
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

FAKE_OOM_ENV = "SCOREFUSION_FAKE_OOM"
OOM_HINT = ("Use fewer slices per batch (slice_batch), fewer or smaller inputs (crop an ROI), "
            "or run on the CPU.")
SEGMENT_OOM_HINT = "Use fewer windows per call (sw_batch_size 1), crop an ROI, or run on the CPU."


class JobCancelled(Exception):
    """Raised from the progress callback when the job's cancel file appears."""


class FakeOutOfMemoryError(RuntimeError):
    """What ``SCOREFUSION_FAKE_OOM=1`` raises: an out-of-memory error without a GPU."""


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (FakeOutOfMemoryError, MemoryError)):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch missing
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


class Reporter:
    """Writes protocol events to one stream, flushing each line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict) -> None:
        from ScoreFusionLib import protocol

        protocol.emit(event, self.stream)


def _route_warnings(report: Reporter) -> Any:
    from ScoreFusionLib import protocol

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        report(protocol.warning(f"{category.__name__}: {message}"))

    previous = warnings.showwarning
    warnings.showwarning = show
    return previous


def _settings_device(job_dir: Path, override: str | None) -> str:
    if override:
        return override
    try:
        return str(json.loads((job_dir / "job.json").read_text(encoding="utf-8")).get("device", "auto"))
    except (OSError, ValueError, AttributeError):
        return "auto"


def run_job(job_dir: str | os.PathLike, device: str | None, report: Reporter) -> int:
    """Run one job; returns the exit code. Every outcome is reported as protocol events."""
    from ScoreFusionLib import protocol
    from ScoreFusionLib.jobio import CANCEL_FILE, OUTPUT_FILE, SEGMENT_KIND, read_job

    job_dir = Path(job_dir)
    cancel_file = job_dir / CANCEL_FILE
    try:
        import torch

        torch_version = torch.__version__
    except ImportError as exc:
        report(protocol.hello(None, device or "unknown"))
        report(protocol.error("internal", f"PyTorch is not installed in this Python: {exc}",
                              "Install torch (the module offers to do this on Apply)."))
        return protocol.EXIT_INTERNAL

    requested = _settings_device(job_dir, device)
    try:
        from ScoreFusionLib.translate import resolve_device

        shown_device = resolve_device(requested)
    except Exception:  # reported properly when the run resolves the device
        shown_device = requested
    report(protocol.hello(torch_version, shown_device))

    previous_showwarning = _route_warnings(report)
    eta = protocol.EtaEstimator()
    fake_oom = os.environ.get(FAKE_OOM_ENV, "") not in ("", "0")
    state: dict[str, Any] = {"sampling": False, "kind": None}

    def on_progress(done: int, total: int) -> None:
        if not state["sampling"]:
            state["sampling"] = True
            report(protocol.stage("sampling"))
        if fake_oom:
            raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 7.38 GiB (fake, for tests)")
        eta.step_done()
        report(protocol.progress(done, total, 1, 1, eta.elapsed, eta.eta(total - done)))
        if cancel_file.exists():
            raise JobCancelled(f"cancelled after step {done}/{total}")

    try:
        report(protocol.stage("loading_weights"))
        job = read_job(job_dir)
        state["kind"] = job.settings.kind
        run_kind = _run_segmentation if job.settings.kind == SEGMENT_KIND else _run_translation
        run_kind(job, device, cancel_file, on_progress, eta, report)
        report(protocol.result(OUTPUT_FILE))
        return protocol.EXIT_OK
    except JobCancelled as exc:
        _free_device_memory()
        report(protocol.error("cancelled", str(exc), ""))
        return protocol.EXIT_CANCELLED
    except Exception as exc:
        if _is_oom(exc):
            _free_device_memory()
            hint = SEGMENT_OOM_HINT if state["kind"] == SEGMENT_KIND else OOM_HINT
            report(protocol.error("oom", f"out of memory: {exc}", hint))
            return protocol.EXIT_OOM
        return _report_failure(exc, report)
    finally:
        warnings.showwarning = previous_showwarning


def _run_translation(job: Any, device: str | None, cancel_file: Path, on_progress: Any, eta: Any,
                     report: Reporter) -> None:
    """A ``translate`` job: resolve and check the bundle, translate, write ``output.npz``."""
    from ScoreFusionLib import protocol
    from ScoreFusionLib.bundle import read_manifest, sha256_file
    from ScoreFusionLib.jobio import write_output
    from ScoreFusionLib.registry import resolve_model
    from ScoreFusionLib.translate import SamplingOptions, super_resolve, synthesize

    s = job.settings
    bundle = resolve_model(s.bundle)
    read_manifest(bundle)
    if s.bundle_sha256:
        actual = sha256_file(bundle / "manifest.json")
        if actual != s.bundle_sha256.lower():
            from ScoreFusionLib.bundle import BundleError

            raise BundleError(f"the bundle's manifest.json has sha256 {actual}, but the job expects "
                              f"{s.bundle_sha256}; the model on disk is not the one that was chosen")
    if cancel_file.exists():
        raise JobCancelled("cancelled before sampling")
    report(protocol.stage("preprocessing"))
    options = SamplingOptions(method=s.method, sampler=s.sampler, steps=s.steps, time_grid=s.time_grid,
                              seed=s.seed, device=device or s.device, slice_batch=s.slice_batch,
                              samples=s.samples, tile_size=s.tile_size, max_memory_gb=s.max_memory_gb)
    options.validate()
    eta.reset()
    if s.task == "super_resolve":
        out = super_resolve(job.volumes[s.contrasts[0]], bundle, options, progress=on_progress)
    else:
        out = synthesize(job.volumes, bundle, options, progress=on_progress)
    report(protocol.stage("postprocessing"))
    if cancel_file.exists():
        raise JobCancelled("cancelled after sampling")
    provenance = dict(out.provenance)
    provenance["job"] = s.to_dict()
    provenance["device"] = options.device
    report(protocol.stage("writing"))
    write_output(job.folder, out.volume, provenance, uncertainty=out.uncertainty)


def _run_segmentation(job: Any, device: str | None, cancel_file: Path, on_progress: Any, eta: Any,
                      report: Reporter) -> None:
    """A ``segment`` job: load the segmenter, run the sliding windows, write the label map on the input grid."""
    from ScoreFusionLib import __version__, protocol
    from ScoreFusionLib.jobio import write_segmentation
    from ScoreFusionLib.segmentation.defaults import resolve_segmenter
    from ScoreFusionLib.segmentation.inference import segment
    from ScoreFusionLib.segmentation.model_bundle import load_segmenter
    from ScoreFusionLib.translate import resolve_device

    s = job.settings
    chosen = resolve_device(device or s.device)
    segmenter = load_segmenter(resolve_segmenter(s.segmenter), chosen)
    if cancel_file.exists():
        raise JobCancelled("cancelled before segmenting")
    report(protocol.stage("preprocessing"))
    eta.reset()
    volumes = dict(job.volumes)
    if s.synthesized:  # generated images: zero background where the real inputs are zero
        from ScoreFusionLib.segmentation.preprocess import zero_outside_head

        real = [v for name, v in volumes.items() if name not in s.synthesized]
        volumes.update({name: zero_outside_head(volumes[name], real) for name in s.synthesized})
    result = segment(volumes, segmenter, device=chosen, label_convention=s.label_convention, overlap=s.overlap,
                     sw_batch_size=s.sw_batch_size, progress=on_progress)
    report(protocol.stage("postprocessing"))
    if cancel_file.exists():
        raise JobCancelled("cancelled after segmenting")
    provenance = result.provenance()
    manifest_model = segmenter.manifest.model or {}
    provenance.update(job=s.to_dict(), device=chosen, software=__version__, segmenter_path=str(segmenter.path),
                      segmenter_id=str(manifest_model.get("id") or segmenter.path.name))
    report(protocol.stage("writing"))
    write_segmentation(job.folder, result.labels, result.probabilities if s.probabilities else None, provenance)


def _report_failure(exc: Exception, report: Reporter) -> int:
    """Report an exception as a protocol error; the exit code (2 for our own errors, 1 for crashes)."""
    from ScoreFusionLib import protocol
    from ScoreFusionLib.archive import ArchiveError
    from ScoreFusionLib.bundle import BundleError
    from ScoreFusionLib.errors import ScoreFusionError
    from ScoreFusionLib.registry import DownloadError, RegistryError

    if isinstance(exc, (BundleError, ArchiveError, RegistryError, DownloadError)):
        report(protocol.error("weights", str(exc), "Check the model: download it again or choose another."))
        return protocol.EXIT_INPUT
    if isinstance(exc, ScoreFusionError):
        report(protocol.error("input", str(exc), ""))
        return protocol.EXIT_INPUT
    for line in traceback.format_exc().rstrip().splitlines():
        report(protocol.log(line))
    report(protocol.error("internal", f"{type(exc).__name__}: {exc}", ""))
    return protocol.EXIT_INTERNAL


class _ByteProgress:
    """The ``on_progress`` of a fetch: throttled byte events, cancel between chunks, and always a last event.

    A driver redraws on every event, so at most one per ``min_interval_s`` is sent (plus the final
    one); the ETA comes from the average rate of this run (a resumed download starts from its offset).
    """

    def __init__(self, cancel_file: Path, report: Reporter, min_interval_s: float = 0.1) -> None:
        import time

        self.cancel_file, self.report, self.min_interval_s = cancel_file, report, min_interval_s
        self.clock = time.monotonic
        self.start = self.clock()
        self.first: int | None = None  # bytes done at the first call (what a resume started from)
        self.last_time = float("-inf")
        self.last_sent: tuple[int, int] | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if self.cancel_file.exists():
            raise JobCancelled(f"cancelled after {done} bytes")
        now = self.clock()
        if self.first is None:
            self.first = done
        last = total is not None and done >= total
        if done > 0 and (last or now - self.last_time >= self.min_interval_s):
            self.last_time = now
            self._send(done, max(done, total or done), now)  # an unknown total: the bytes so far

    def finish(self, size: int) -> None:
        """Send the final ``size/size`` event unless it went out already (nothing left to copy, say)."""
        if size > 0 and self.last_sent != (size, size):
            self._send(size, size, self.clock())

    def _send(self, done: int, total: int, now: float) -> None:
        from ScoreFusionLib import protocol

        elapsed = now - self.start
        moved = done - (self.first or 0)
        eta = (total - done) * elapsed / moved if moved > 0 and elapsed > 0 else None
        self.report(protocol.progress(done, total, elapsed_s=elapsed, eta_s=eta))
        self.last_sent = (done, total)


def fetch_model(spec: str, job_dir: str | os.PathLike, report: Reporter) -> int:
    """Install registry model ``spec`` (``id`` or ``id@version``) into the cache, with byte progress."""
    from ScoreFusionLib import protocol
    from ScoreFusionLib.jobio import CANCEL_FILE

    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    report(protocol.hello(None, "cpu"))
    try:
        from ScoreFusionLib.registry import RegistryError, install_model, load_registry

        model_id, _, version = spec.partition("@")
        entry = load_registry().get(model_id)
        if version and version != entry.version:
            raise RegistryError(f"the registry has version {entry.version} of {model_id!r}, not {version}")
        report(protocol.stage("downloading"))
        progress = _ByteProgress(job_dir / CANCEL_FILE, report)
        path = install_model(entry, progress=False, on_progress=progress)
        progress.finish(entry.size)
        report(protocol.result(os.path.abspath(path)))
        return protocol.EXIT_OK
    except JobCancelled as exc:
        report(protocol.error("cancelled", str(exc), "The partial download is kept; fetching again resumes it."))
        return protocol.EXIT_CANCELLED
    except Exception as exc:
        return _report_failure(exc, report)


def import_model(path: str, job_dir: str | os.PathLike, report: Reporter) -> int:
    """Validate a bundle folder or .zip and copy it into the cache."""
    from ScoreFusionLib import protocol

    Path(job_dir).mkdir(parents=True, exist_ok=True)
    report(protocol.hello(None, "cpu"))
    try:
        from ScoreFusionLib.registry import import_bundle

        report(protocol.stage("loading_weights"))
        installed = import_bundle(path)
        report(protocol.result(os.path.abspath(installed)))
        return protocol.EXIT_OK
    except Exception as exc:
        return _report_failure(exc, report)


def probe() -> dict:
    """torch version, CUDA build and devices (name, total and free memory), or the import error."""
    info: dict[str, Any] = {"ok": True, "python": platform.python_version(), "protocol": 1}
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install raising OSError
        info.update(ok=False, torch=None, error=f"{type(exc).__name__}: {exc}", devices=[])
        return info
    info["torch"] = torch.__version__
    info["cuda_build"] = torch.version.cuda
    devices = []
    try:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    except Exception as exc:  # pragma: no cover - driver problems
        available, count = False, 0
        info["cuda_error"] = str(exc)
    info["cuda_available"] = bool(available)
    for i in range(count):
        entry: dict[str, Any] = {"id": f"cuda:{i}", "index": i}
        try:
            props = torch.cuda.get_device_properties(i)
            entry["name"] = props.name
            entry["total_bytes"] = int(props.total_memory)
        except Exception as exc:  # pragma: no cover
            entry["error"] = str(exc)
        try:
            free, total = torch.cuda.mem_get_info(i)
            entry["free_bytes"], entry["total_bytes"] = int(free), int(total)
        except Exception:  # pragma: no cover
            entry["free_bytes"] = None
        devices.append(entry)
    info["devices"] = devices
    mps = getattr(torch.backends, "mps", None)
    info["mps_available"] = bool(mps is not None and mps.is_available())
    return info


def _protocol_stream() -> IO[str]:
    """A private copy of stdout for protocol lines; fd 1 itself then points at stderr."""
    try:
        sys.stdout.flush()
        fd = os.dup(1)
        os.dup2(2, 1)
        stream = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
        sys.stdout = sys.stderr
        return stream
    except (OSError, ValueError, AttributeError):  # pragma: no cover - unusual stdio
        return sys.stdout


def main(argv: list[str] | None = None, stream: IO[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="worker.py", description="ScoreFusion inference worker")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job folder")
    run.add_argument("--job", required=True, help="the job folder (job.json + input.npz)")
    run.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: job.json's)")
    fetch = sub.add_parser("fetch", help="install a registry model (download or embedded copy)")
    fetch.add_argument("--id", required=True, help="model id, optionally id@version")
    fetch.add_argument("--job", required=True, help="a folder for the cancel file (created if missing)")
    imp = sub.add_parser("import", help="validate a bundle folder or .zip and copy it into the cache")
    imp.add_argument("--path", required=True, help="the bundle folder or .zip")
    imp.add_argument("--job", required=True, help="a working folder (created if missing)")
    sub.add_parser("models", help="print the registry's and the imported models as JSON")
    sub.add_parser("probe", help="print torch and device information as JSON")
    args = parser.parse_args(argv)
    out = stream if stream is not None else sys.stdout
    if args.command in ("probe", "models"):
        code = 0
        if args.command == "probe":
            payload = probe()
        else:
            from ScoreFusionLib.errors import ScoreFusionError
            from ScoreFusionLib.registry.listing import list_models

            try:
                payload = {"models": list_models()}
            except ScoreFusionError as exc:  # a broken registry file: say why, as JSON like everything else
                payload, code = {"models": [], "error": str(exc)}, 2
        out.write(json.dumps(payload) + "\n")
        out.flush()
        return code
    if args.command == "fetch":
        return fetch_model(args.id, args.job, Reporter(out))
    if args.command == "import":
        return import_model(args.path, args.job, Reporter(out))
    return run_job(args.job, args.device, Reporter(out))


def _cli() -> int:
    stream = _protocol_stream()
    try:
        return main(stream=stream)
    finally:
        stream.flush()
        if stream is not sys.stdout and stream is not sys.__stdout__:
            stream.close()


if __name__ == "__main__":
    sys.exit(_cli())
