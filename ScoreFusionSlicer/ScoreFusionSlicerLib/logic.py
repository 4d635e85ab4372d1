"""Run ScoreFusion on scene volumes: job folder, worker subprocess, import of the result.

This is the whole of the module's logic, free of Qt so that it runs (and is tested) against the
MRML scene of PyPI ``slicer-core``; ``ScoreFusion.py`` only injects Slicer's timer, interpreter
and layout. The order of work is what keeps the scene safe:

1. read every input node into ``(array, IJK->RAS)`` copies and check they share one grid (the
   nodes themselves are never modified);
2. write the job folder and start ``worker.py run`` through :class:`~.runner.JobRunner`;
3. only when the worker succeeded, create (or update) the output node, add the uncertainty map
   and show the result; if anything in this step fails, every node it created is removed again.

A cancelled or failed run therefore adds nothing to the scene. The job folder is deleted at the
end unless ``keep_job_files`` is set.

Tumour segmentation (:meth:`ProcessingLogic.segment_tumour`) uses the MONAIAuto3DSeg extension when
it is installed, and otherwise a ``segment`` job of the same worker (ScoreFusion's own segmenter),
whose label map is imported as a segmentation node by :func:`.segmentation.import_labelmap`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import slicer

from . import scene_io
from .runner import JobRunner, worker_command

logger = logging.getLogger(__name__)

RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"

#: ``kind`` of a segmentation job (``ScoreFusionLib.jobio.SEGMENT_KIND``).
SEGMENT_KIND = "segment"


@dataclass
class RunRequest:
    """One run: its inputs (contrast -> volume node, in the model's order), the job settings and where the result goes.

    ``settings`` are the ``job.json`` fields of :class:`ScoreFusionLib.jobio.JobSettings` except
    ``contrasts`` (the keys of ``inputs``): at least ``task`` and ``bundle`` (a registry id ``id`` or
    ``id@version``, a bundle folder or a bundle ``.zip``), plus any sampling settings. They are
    validated there, before anything starts. ``output_node`` None creates a new node. A segmentation
    request has ``kind`` ``segment`` and the fields of :class:`ScoreFusionLib.jobio.SegmentJobSettings`
    instead (see :meth:`ProcessingLogic.segment`); its result is always a new segmentation node.
    """

    inputs: Mapping[str, Any]
    settings: Mapping[str, Any]
    output_node: Any = None
    output_name: str | None = None
    keep_job_files: bool = False
    show_uncertainty: bool = True
    show_side_by_side: bool = True

    def job_settings(self) -> dict:
        """The whole ``job.json`` settings."""
        return {**self.settings, "contrasts": list(self.inputs)}

    @property
    def kind(self) -> str:
        """``translate`` (the default) or ``segment``."""
        return str(self.settings.get("kind", "translate"))

    @property
    def task(self) -> str:
        return str(self.settings["task"]) if self.kind != SEGMENT_KIND else SEGMENT_KIND

    @property
    def device(self) -> str:
        return str(self.settings.get("device", "auto"))


@dataclass
class JobHandle:
    """A started run: its state, result nodes or error, and a way to cancel it."""

    request: RunRequest
    job_dir: str
    runner: JobRunner
    state: str = RUNNING
    exit_code: int | None = None
    error: str = ""
    hint: str = ""
    error_kind: str | None = None
    output_node: Any = None
    uncertainty_node: Any = None
    provenance: dict = field(default_factory=dict)
    #: Which back-end made the result (segmentations: ``ScoreFusion segmenter`` or ``MONAIAuto3DSeg``).
    backend: str = ""

    def cancel(self) -> bool:
        """Ask the worker to stop; it is killed (with its children) if it has not stopped after the grace period."""
        return self.state == RUNNING and self.runner.cancel()

    def wait(self, timeout: float | None = None) -> str:
        """Block until the run has ended (and its result is imported); the final state."""
        if self.state == RUNNING:
            self.runner.wait_for_completion(timeout)
        return self.state


def _provenance_attributes(provenance: Mapping[str, Any], request: RunRequest) -> dict[str, str]:
    """Node attributes saved with the scene, so a result can always be traced to its model and settings."""
    attrs = {
        "ScoreFusion.modelId": request.settings.get("bundle"),
        "ScoreFusion.modelSha256": provenance.get("manifest_sha256"),
        "ScoreFusion.method": provenance.get("method"),
        "ScoreFusion.sampler": provenance.get("sampler"),
        "ScoreFusion.steps": provenance.get("steps"),
        "ScoreFusion.seed": provenance.get("seed"),
        "ScoreFusion.samples": provenance.get("samples"),
        "ScoreFusion.version": provenance.get("software"),
        "ScoreFusion.task": request.task,
        "ScoreFusion.inputs": ",".join(request.inputs),
    }
    return {k: str(v) for k, v in attrs.items() if v is not None and v != ""}


class ProcessingLogic:
    """Starts runs and imports their results into the MRML scene.

    Parameters
    ----------
    python_executable : interpreter for the worker (``PythonSlicer`` inside Slicer).
    lib_root : the folder that holds the ``ScoreFusionLib`` package.
    schedule : ``schedule(ms, fn)`` used to poll the worker (``qt.QTimer.singleShot`` in Slicer);
        the default never fires, which suits ``wait_for_completion=True``.
    job_root : where job folders are created (a fresh temporary folder by default).
    show_results : ``show_results(input_node, output_node, overlay_node_or_None)``, called after a
        successful import when the request asks for side-by-side display (Slicer's layout code).
    env : environment of the worker (``None``: this process's).
    """

    def __init__(self, python_executable: str, lib_root: str, schedule: Callable | None = None,
                 job_root: str | None = None, show_results: Callable | None = None,
                 env: Mapping[str, str] | None = None, kill_grace_s: float = 10.0) -> None:
        self.python_executable = python_executable
        self.lib_root = lib_root
        self.runner = JobRunner(schedule or (lambda ms, fn: None), kill_grace_s=kill_grace_s)
        self.job_root = job_root
        self.show_results = show_results
        self.env = dict(env) if env is not None else None
        self.current: JobHandle | None = None

    @property
    def is_running(self) -> bool:
        return self.current is not None and self.current.state == RUNNING

    def cancel(self) -> bool:
        """Cancel the running job, if any."""
        return self.current is not None and self.current.cancel()

    def _read_inputs(self, request: RunRequest) -> dict:
        from ScoreFusionLib.volume import Volume

        if not request.inputs:
            raise ValueError("choose the input volume(s) first")
        missing = [name for name, node in request.inputs.items() if node is None]
        if missing:
            raise ValueError(f"choose a volume for every input the model needs (missing: {', '.join(missing)})")
        nodes = list(request.inputs.values())
        if len({id(n) for n in nodes}) != len(nodes):
            raise ValueError("the same volume is selected for two different contrasts")
        if request.output_node is not None and any(request.output_node is n for n in nodes):
            raise ValueError("the output volume cannot be one of the inputs: inputs are never modified")
        scene_io.check_same_grid(nodes)
        volumes = {}
        for name, node in request.inputs.items():
            array, matrix = scene_io.node_to_array(node)
            volumes[name] = Volume(array, matrix)
        return volumes

    def process(self, request: RunRequest, wait_for_completion: bool = True,
                event_callback: Callable[[dict], Any] | None = None,
                finished_callback: Callable[[JobHandle], Any] | None = None,
                timeout: float | None = None) -> JobHandle:
        """Start a run; with ``wait_for_completion`` return only after it ended and its result was imported.

        Problems with the request (missing or mismatched inputs, bad settings) raise before anything
        starts. Worker events go to ``event_callback``; ``finished_callback(handle)`` is called once,
        after the import (or the failure / cancel).
        """
        from ScoreFusionLib.jobio import write_job

        if self.is_running:
            raise RuntimeError("a ScoreFusion run is already in progress; cancel it or wait for it to finish")
        volumes = self._read_inputs(request)
        job_dir = tempfile.mkdtemp(prefix="sf-", dir=self.job_root)
        try:
            write_job(job_dir, volumes, request.job_settings())
        except Exception:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        backend = ""
        if request.kind == SEGMENT_KIND:
            from .segmentation import SCOREFUSION_BACKEND

            backend = SCOREFUSION_BACKEND
        handle = JobHandle(request=request, job_dir=job_dir, runner=self.runner, backend=backend)

        def on_event(event: dict) -> None:
            if event.get("event") == "error" and not handle.error:
                handle.error_kind = event.get("kind")
                handle.error = str(event.get("msg", ""))
                handle.hint = str(event.get("hint", "") or "")
            if event_callback is not None:
                event_callback(event)

        def on_done(code: int) -> None:
            self._finish(handle, code)
            if finished_callback is not None:
                finished_callback(handle)

        cmd = worker_command(self.python_executable, self.lib_root, job_dir, request.device)
        env = dict(self.env if self.env is not None else os.environ)
        if request.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"  # no CUDA context at all on a CPU run
        try:
            self.runner.start(cmd, job_dir, on_event, on_done, env=env)
        except Exception:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        self.current = handle
        if wait_for_completion:
            handle.wait(timeout)
        return handle

    def _finish(self, handle: JobHandle, code: int) -> None:
        handle.exit_code = code
        try:
            if self.runner.cancel_requested or code == 130:
                handle.state = CANCELLED
            elif code != 0:
                handle.state = FAILED
                if not handle.error:
                    tail = "\n".join(self.runner.last_log_lines(50))
                    handle.error = f"the worker stopped with exit code {code}"
                    handle.hint = tail
            else:
                self._import_result(handle)
                handle.state = DONE
        except Exception as exc:  # the import failed: nothing of it stays in the scene
            logger.exception("ScoreFusion: importing the result failed")
            handle.state = FAILED
            handle.error_kind = "internal"
            handle.error = f"importing the result failed: {exc}"
        finally:
            if not handle.request.keep_job_files:
                shutil.rmtree(handle.job_dir, ignore_errors=True)

    def _import_result(self, handle: JobHandle) -> None:
        from ScoreFusionLib.jobio import read_output, read_uncertainty

        if handle.request.kind == SEGMENT_KIND:
            self._import_segmentation(handle)
            return
        request = handle.request
        output, provenance = read_output(handle.job_dir)
        uncertainty = read_uncertainty(handle.job_dir)
        handle.provenance = provenance
        reference = next(iter(request.inputs.values()))
        attributes = _provenance_attributes(provenance, request)
        created = []
        try:
            if request.output_node is None:
                name = request.output_name or f"{reference.GetName()} ScoreFusion"
                node = scene_io.add_output_volume(output.array, output.affine, name, reference, attributes)
                created.append(node)
            else:
                node = scene_io.update_output_volume(request.output_node, output.array, output.affine, reference,
                                                     attributes)
            overlay = None
            if uncertainty is not None:
                overlay = scene_io.add_uncertainty_volume(uncertainty.array, uncertainty.affine,
                                                          f"{node.GetName()} uncertainty", reference)
                created.append(overlay)
            if request.show_side_by_side and self.show_results is not None:
                self.show_results(reference, node, overlay if request.show_uncertainty else None)
        except Exception:
            scene_io.remove_nodes(created)
            raise
        handle.output_node, handle.uncertainty_node = node, overlay

    # -- tumour segmentation ---------------------------------------------------------------------
    def segment(self, input_nodes: Mapping[str, Any], segmenter: str | os.PathLike = "default", device: str = "auto",
                label_convention: str | None = None, probabilities: bool = False, name: str | None = None,
                keep_job_files: bool = False, wait_for_completion: bool = True,
                event_callback: Callable[[dict], Any] | None = None,
                finished_callback: Callable[[JobHandle], Any] | None = None,
                timeout: float | None = None) -> JobHandle:
        """Segment the tumour with ScoreFusion's own segmenter in the worker; the result is ``handle.output_node``.

        ``input_nodes`` maps contrast names (``t1n``, ``t1c``, ``t2w``, ``t2f`` or aliases) to volume
        nodes on one grid. ``segmenter`` is ``default`` (the shipped bundle), a segmenter bundle
        folder or .zip; ``label_convention`` None keeps the segmenter's own (``brats2023`` for the shipped
        one), ``brats2021`` codes enhancing tumour as 4. Inputs that ScoreFusion generated get the
        real inputs' zero background in the worker. Progress events count sliding windows.
        Like :meth:`process`: bad requests raise before anything starts, and a failed or cancelled
        job adds nothing to the scene.
        """
        from .segmentation import synthesized_inputs

        synthesized = synthesized_inputs(input_nodes)
        if len(synthesized) == len(input_nodes):  # nothing real to take the head's background from
            synthesized = []
        settings = {"kind": SEGMENT_KIND, "segmenter": os.fspath(segmenter), "device": device,
                    "label_convention": label_convention, "probabilities": bool(probabilities),
                    "synthesized": synthesized}
        request = RunRequest(inputs=dict(input_nodes), settings=settings, output_name=name,
                             keep_job_files=keep_job_files, show_uncertainty=False, show_side_by_side=False)
        return self.process(request, wait_for_completion, event_callback, finished_callback, timeout)

    def segment_tumour(self, input_nodes: Mapping[str, Any], segmenter: str | os.PathLike = "default",
                       device: str = "auto", label_convention: str | None = None, name: str | None = None,
                       keep_job_files: bool = False, wait_for_completion: bool = True,
                       event_callback: Callable[[dict], Any] | None = None,
                       finished_callback: Callable[[JobHandle], Any] | None = None,
                       timeout: float | None = None) -> JobHandle:
        """Segment with MONAIAuto3DSeg's BraTS model when that extension is installed, else with :meth:`segment`.

        Either way the result is a handle whose ``backend`` names what ran and whose ``output_node``
        is the segmentation once ``state`` is ``done``. MONAIAuto3DSeg runs to completion inside the
        call (``segmenter`` and ``label_convention`` apply to ScoreFusion's segmenter only); its
        ``finished_callback`` is called before this returns.
        """
        from . import segmentation

        missing = [contrast for contrast, node in input_nodes.items() if node is None]
        if missing:
            raise ValueError(f"choose all four contrasts (missing: {', '.join(missing)})")
        if not segmentation.monai_auto3dseg_available():
            return self.segment(input_nodes, segmenter, device, label_convention, name=name,
                                keep_job_files=keep_job_files, wait_for_completion=wait_for_completion,
                                event_callback=event_callback, finished_callback=finished_callback, timeout=timeout)
        if self.is_running:
            raise RuntimeError("a ScoreFusion run is already in progress; cancel it or wait for it to finish")
        request = RunRequest(inputs=dict(input_nodes), settings={"kind": SEGMENT_KIND, "device": device},
                             output_name=name, show_uncertainty=False, show_side_by_side=False)
        reference = segmentation.reference_input(input_nodes)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{reference.GetName()} tumour")
        attributes = segmentation.monai_attributes(input_nodes)
        try:
            for key, value in attributes.items():
                node.SetAttribute(key, value)
            segmentation.run_monai_auto3dseg(input_nodes, node, cpu=device == "cpu", wait=True)
        except Exception:
            scene_io.remove_nodes([node])
            raise
        handle = JobHandle(request=request, job_dir="", runner=self.runner, state=DONE, exit_code=0,
                           output_node=node, backend=segmentation.MONAI_BACKEND)
        if finished_callback is not None:
            finished_callback(handle)
        return handle

    def _import_segmentation(self, handle: JobHandle) -> None:
        """The worker's label map as a new segmentation node, named and coloured for its label convention."""
        from ScoreFusionLib.jobio import read_segmentation

        from . import segmentation

        request = handle.request
        result = read_segmentation(handle.job_dir)
        handle.provenance = result.provenance
        reference = segmentation.reference_input(request.inputs)
        convention = result.label_convention
        if not convention:
            raise ValueError("the segmentation job's output does not name its label convention")
        name = request.output_name or f"{reference.GetName()} tumour"
        attributes = segmentation.scorefusion_attributes(result.provenance, request.inputs,
                                                         request.settings.get("segmenter", "default"))
        handle.output_node = segmentation.import_labelmap(result.labels.array, result.labels.affine, reference, name,
                                                          label_names=segmentation.brats_label_names(convention),
                                                          attributes=attributes)
