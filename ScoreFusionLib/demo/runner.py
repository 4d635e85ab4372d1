"""Run the demo: each default model against its non-learned baseline, with metrics and provenance.

Two tasks, both on the 2 mm grid of the embedded models:

* ``sr4``: the real ICBM152 T1 is average-pooled x4 (8 mm voxels) and brought back by trilinear
  interpolation, the plane average and Score-Fusion;
* ``flair``: FLAIR is synthesised from the T1w of a simulated case (a cohort seed no model saw),
  next to the best linear intensity mapping of the T1w (an oracle least-squares fit);
* ``segment``: the default segmenter outlines that case's simulated tumour from its real T1w,
  T1ce and T2w plus each FLAIR: the real one, zeros (a missing contrast) and every synthesis.

Every volume is written with a JSON provenance sidecar; ``summary.json`` holds PSNR, SSIM and
seconds per task and method and the segmentation Dice per FLAIR source, and ``comparison.png``
shows the translations. The output folder is
built next to its final place and renamed into it at the end, so a failed or cancelled demo
leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import InputError
from ..volume import Volume
from .compare import LINEAR_MAP, MethodRun, ProgressFactory, compare_super_resolution, compare_synthesis
from .compare import registry_sampling as _registry_sampling
from .figure import FigureTask, Panel, save_comparison

NOT_FOR_DIAGNOSIS = "Demonstration output of research software; not for diagnosis."
SEGMENTATION_TITLE = ("Tumour segmentation (default segmenter) of the SIMULATED flair case: real T1w, T1ce, T2w "
                      "plus FLAIR from each source")


@dataclass(frozen=True)
class DemoTask:
    """One demo task: which registry model runs, and its title."""

    name: str
    title: str
    model_id: str


TASKS = (
    DemoTask("sr4", "T1w super-resolution x4 (real ICBM152 T1, 2 mm; input 8 mm)", "t1-sr4-iso"),
    DemoTask("flair", "T1w -> FLAIR synthesis (SIMULATED case, seed 2026)", "t1-to-flair"),
)


@dataclass
class DemoOptions:
    """Where to write, how to sample (``None``: each model's registry defaults) and on which device."""

    out: Path
    steps: int | None = None
    sampler: str | None = None
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    registry: str | os.PathLike | None = None


@dataclass
class DemoReport:
    """The summary written to ``summary.json``, the output folder and the volumes written."""

    summary: dict
    out: Path
    files: list[Path] = field(default_factory=list)


class _Demo:
    def __init__(self, options: DemoOptions, progress: ProgressFactory | None) -> None:
        from ..registry import load_registry

        self.options = options
        self.progress = progress
        self.registry = load_registry(options.registry)
        self.rows: dict[str, dict] = {}
        self.figures: list[FigureTask] = []
        self.written: list[str] = []
        self.summary: dict = {}
        self.synthesis_case: tuple | None = None
        self.segmentation: dict = {}

    def _model(self, task: DemoTask) -> tuple[Any, Path, Any, str]:
        from ..bundle import read_manifest, sha256_file
        from ..registry import resolve_model

        entry = self.registry.get(task.model_id)
        bundle = resolve_model(task.model_id, registry=self.registry)
        return entry, bundle, read_manifest(bundle), sha256_file(Path(bundle) / "manifest.json")

    def _options_for(self, entry: Any):
        o = self.options
        return lambda method: _registry_sampling(entry, method, steps=o.steps, sampler=o.sampler, seed=o.seed,
                                                 device=o.device)

    def _save(self, folder: Path, name: str, volume: Volume, provenance: dict) -> None:
        from ..atomic import write_text_atomic
        from ..volume_io import save_volume, sidecar_path

        path = folder / f"{name}.nii.gz"
        save_volume(volume, path, description=f"ScoreFusion demo: {name}; not for diagnosis")
        write_text_atomic(sidecar_path(path), json.dumps(provenance, indent=2) + "\n")
        self.written.append(f"{folder.name}/{path.name}")

    @staticmethod
    def _provenance(entry: Any, manifest_sha: str, method: str, run: MethodRun | None, source: dict) -> dict:
        options = run.options if run is not None else None
        return {
            "software": f"ScoreFusion {__version__}",
            "package_version": __version__,
            "method": method,
            "model": {"id": entry.id, "version": entry.version, "sha256": entry.sha256,
                      "manifest_sha256": manifest_sha},
            "sampler": options.sampler if options is not None else None,
            "steps": int(options.steps) if options is not None else None,
            "seed": int(options.seed) if options is not None else None,
            "seconds": round(run.seconds, 3) if run is not None else None,
            **source,
            **({"baseline": run.baseline_info} if run is not None and run.baseline_info else {}),
            **({"run": run.provenance} if run is not None and run.provenance else {}),
            "intended_use": NOT_FOR_DIAGNOSIS,
        }

    def _record(self, task: DemoTask, folder: Path, entry: Any, manifest_sha: str, runs: dict[str, MethodRun],
                source: dict, panels: list[Panel], truth: Volume) -> None:
        for method, run in runs.items():
            self._save(folder, method, run.volume, self._provenance(entry, manifest_sha, method, run, source))
            panels.append(Panel(method, run.scored))
        self.rows[task.name] = {
            "title": task.title, "model": entry.id,
            "methods": {m: {**r.metrics, "seconds": round(r.seconds, 3)} for m, r in runs.items()},
        }
        self.figures.append(FigureTask(task.title, panels, truth.array))

    def super_resolution(self, task: DemoTask, folder: Path) -> None:
        from ..interpolation import upsample_volume
        from .inputs import real_icbm_t1

        entry, bundle, manifest, manifest_sha = self._model(task)
        truth = real_icbm_t1(manifest.grid["shape_ijk"], float(manifest.grid["spacing"][0]))
        methods = ["trilinear", "average"] + (["score-fusion"] if manifest.fuser else [])
        low_res, runs = compare_super_resolution(truth, bundle, methods, self._options_for(entry), self.progress)
        factors = [round(float(a) / float(b)) for a, b in zip(low_res.spacing, truth.spacing)]
        source = {"input": f"real ICBM152 2009a T1 (nilearn wheel), 2 mm, centred crop, average-pooled x{factors}",
                  "ground_truth": "the same T1 before pooling"}
        self._save(folder, "input_lowres", low_res, self._provenance(entry, manifest_sha, "average-pool", None, source))
        self._save(folder, "ground_truth", truth, self._provenance(entry, manifest_sha, "none", None, source))
        panels = [Panel("input (nearest)", upsample_volume(low_res, factors, "nearest").array)]
        self._record(task, folder, entry, manifest_sha, runs, source, panels, truth)

    def synthesis(self, task: DemoTask, folder: Path) -> None:
        from ..data.task import TaskSpec
        from ..evaluation import synthesis_in_target_frame
        from .inputs import simulated_case_on_grid

        entry, bundle, manifest, manifest_sha = self._model(task)
        spec = TaskSpec.from_dict(manifest.task)
        images, labels, params = simulated_case_on_grid(manifest.grid["shape_ijk"], float(manifest.grid["spacing"][0]))
        methods = [LINEAR_MAP, "average"] + (["score-fusion"] if manifest.fuser else [])
        runs = compare_synthesis(images, bundle, methods, self._options_for(entry), self.progress)
        truth = images[spec.target]
        source = {"input": f"SIMULATED case (ScoreFusion simulator, seed {params['seed']}, with tumour): "
                  f"{', '.join(spec.inputs)}", "ground_truth": f"the simulated {spec.target}",
                  "units": "model outputs: synthetic intensities in the first input's range; the metrics and the "
                           "figure map them into the truth's normalised frame"}
        for name in spec.inputs:
            self._save(folder, f"input_{name}", images[name], self._provenance(entry, manifest_sha, "none", None,
                                                                              source))
        self._save(folder, "ground_truth", truth, self._provenance(entry, manifest_sha, "none", None, source))
        first = images[spec.inputs[0]].array
        panels = [Panel(f"input {spec.inputs[0]}", synthesis_in_target_frame(first, truth.array, first,
                                                                           spec.normalization), show_error=False)]
        self._record(task, folder, entry, manifest_sha, runs, source, panels, truth)
        if labels is not None:
            self.synthesis_case = (images, labels, params, spec.target, {m: r.volume for m, r in runs.items()
                                                                         if m != LINEAR_MAP})

    def segment(self, folder: Path) -> None:
        """Segment the synthesis case once per FLAIR source (real, zero-filled, each model method)."""
        from ..segmentation.defaults import resolve_segmenter
        from ..segmentation.model_bundle import read_segmenter_manifest
        from .segmentation_step import segment_sources

        images, labels, params, target, synthesized = self.synthesis_case
        convention = str(params["label_convention"])
        seg_manifest = read_segmenter_manifest(resolve_segmenter("default"))
        runs = segment_sources(images, labels, convention, target, synthesized, device=self.options.device)
        model = {"id": seg_manifest.model.get("id", "default"), "weights_sha256": seg_manifest.weights_sha256}
        for name, run in runs.items():
            provenance = {"software": f"ScoreFusion {__version__}", "segmenter": model, "flair_source": name,
                          "label_convention": convention, "dice": run.dice, "seconds": round(run.seconds, 3),
                          "input": f"SIMULATED case (seed {params['seed']}): real t1n, t1c, t2w; {target} = {name}",
                          "intended_use": NOT_FOR_DIAGNOSIS}
            self._save(folder, f"labels_{name}", run.labels, provenance)
        self._save(folder, "labels_ground_truth", labels, {"software": f"ScoreFusion {__version__}",
                                                           "source": "the simulator's tumour labels",
                                                           "label_convention": convention,
                                                           "intended_use": NOT_FOR_DIAGNOSIS})
        self.segmentation = {
            "title": SEGMENTATION_TITLE, "segmenter": model, "label_convention": convention,
            "sources": {name: {"dice": run.dice, "seconds": round(run.seconds, 3)} for name, run in runs.items()},
        }

    def build(self, tmp: Path) -> None:
        from ..atomic import write_text_atomic

        for task in TASKS:
            folder = tmp / task.name
            folder.mkdir()
            if task.name.startswith("sr"):
                self.super_resolution(task, folder)
            else:
                self.synthesis(task, folder)
        if self.synthesis_case is not None:
            folder = tmp / "segment"
            folder.mkdir()
            self.segment(folder)
        width, height = save_comparison(self.figures, tmp / "comparison.png")
        self.summary = {
            "software": f"ScoreFusion {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": self.options.device,
            "metrics": "PSNR (dB) and SSIM over the whole volume after mapping result and truth with the truth's "
                       "min/max (scikit-image SSIM defaults); synthesis results are first mapped into the truth's "
                       "normalised frame, and *_calibrated scores them after the best affine intensity map onto "
                       "the truth (least squares; the like-for-like comparison with the oracle linear map); "
                       "seconds per method call",
            "tasks": self.rows,
            **({"segmentation": self.segmentation} if self.segmentation else {}),
            "files": sorted(self.written),
            "comparison_png": {"file": "comparison.png", "width": width, "height": height},
            "intended_use": NOT_FOR_DIAGNOSIS,
        }
        write_text_atomic(tmp / "summary.json", json.dumps(self.summary, indent=2) + "\n")


def run_demo(options: DemoOptions, progress: ProgressFactory | None = None) -> DemoReport:
    """Run every demo task into ``options.out`` (see the module docstring)."""
    from ..atomic import publish_directory

    out = Path(options.out)
    if out.exists() and not options.overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    demo = _Demo(options, progress)
    try:
        publish_directory(out, demo.build, overwrite=options.overwrite)
    except NotADirectoryError as exc:
        raise InputError(str(exc)) from exc
    return DemoReport(demo.summary, out, [out / f for f in demo.summary["files"]])


def summary_table(summary: dict) -> str:
    """The printed table: one line per task and method (calibrated columns: synthesis only)."""
    lines = [f"{'task':<7} {'method':<14} {'PSNR dB':>8} {'SSIM':>7} {'PSNR cal':>9} {'SSIM cal':>9} {'seconds':>8}"]
    for name, task in summary["tasks"].items():
        for method, row in task["methods"].items():
            cal = (f"{row['psnr_calibrated']:>9.2f} {row['ssim_calibrated']:>9.4f}" if "psnr_calibrated" in row
                   else f"{'-':>9} {'-':>9}")
            lines.append(f"{name:<7} {method:<14} {row['psnr']:>8.2f} {row['ssim']:>7.4f} {cal} {row['seconds']:>8.1f}")
    legend = ("PSNR/SSIM: whole volume, result and truth mapped with the truth's min/max (synthesis: in the truth's "
              "normalised frame, as `scorefusion evaluate`); cal: after the best affine intensity map onto the truth, "
              "the like-for-like comparison with the oracle linear map")
    lines += ["", legend]
    segmentation = summary.get("segmentation")
    if segmentation:
        lines += ["", f"{'segment':<7} {'FLAIR':<14} {'Dice WT':>8} {'Dice TC':>8} {'Dice ET':>8} {'seconds':>8}"]
        for name, row in segmentation["sources"].items():
            dice = row["dice"]
            lines.append(f"{'':<7} {name:<14} {dice['WT']:>8.3f} {dice['TC']:>8.3f} {dice['ET']:>8.3f} "
                         f"{row['seconds']:>8.1f}")
    return "\n".join(lines)


def print_report(report: DemoReport, stream: Any = None) -> None:
    """The table and where the files are."""
    stream = stream or sys.stdout
    print(summary_table(report.summary), file=stream)
    print(f"\nwrote {len(report.files)} volumes (each with a .json provenance sidecar), summary.json and "
          f"comparison.png to {report.out}/", file=stream)
