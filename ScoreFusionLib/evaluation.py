"""Side-by-side evaluation of methods on a held-out split (method.md sections 8.1 and 11).

Every method sees exactly the same inputs: each case's ground truth is loaded the way plane
training loaded it (the bundle's grid by centred crop/pad, reoriented to RAS), so the held-out
split and the arrays match training; the SR input is that ground truth degraded by the task's
operator, the MT inputs are the case's other contrasts. Model methods share one seed, sampler,
step count and time grid, so differences come from the fusion mode alone.

Metrics follow the paper protocol: result and ground truth are mapped with the ground truth's
min and max, PSNR is whole-volume (background included) with peak 1, SSIM is scikit-image's
3D default, linear MMD is taken over all evaluated volumes of a method (so it only compares at
one grid), and foreground-masked PSNR/SSIM (``gt > min``) are added because a large exact
background flatters whole-volume PSNR. Synthesis outputs carry the reference input's range (they
have no unit of their own), so they are compared in the normalised frame the networks work in,
mapped into the ground truth's range with its own normalisation. Wall-clock seconds and peak memory
(:class:`~ScoreFusionLib.peak_memory.PeakMemory`) are measured around each method call, which
for model methods includes loading the plane weights, as a user's single run would.

Methods run one after another over all cases, so MMD streams through
:func:`~ScoreFusionLib.metrics.mmd_linear` with two volumes in memory instead of the whole test
set; a case is therefore loaded once per method.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import write_text_atomic
from .bundle import Manifest, read_manifest, sha256_file
from .data.loading import load_case
from .data.records import CaseRecord
from .data.sources import load_cases
from .data.split import split_cases
from .data.task import TaskSpec
from .errors import DatasetError, GeometryError, InputError
from .interpolation import INTERPOLATION_ORDERS, upsample_volume
from .peak_memory import PeakMemory
from .volume import Volume

INTERPOLATION_METHODS = tuple(INTERPOLATION_ORDERS)
#: Fusion modes of one bundle (method.md section 11); passed to ``SamplingOptions(method=...)``.
MODEL_METHODS = ("single", "tpdm", "average", "score-fusion")
METHODS = INTERPOLATION_METHODS + MODEL_METHODS
SPLITS = ("test", "train", "all")

CSV_COLUMNS = ("case_id", "method", "psnr", "ssim", "psnr_fg", "ssim_fg", "seconds", "peak_mib", "steps")
#: Per-row numbers summarised as mean and std, and how the markdown table shows them.
SUMMARY_COLUMNS = {"psnr": ("PSNR", ".2f"), "ssim": ("SSIM", ".4f"), "psnr_fg": ("PSNR fg", ".2f"),
                   "ssim_fg": ("SSIM fg", ".4f")}
COST_COLUMNS = {"seconds": ("s/case", ".2f"), "peak_mib": ("peak MiB", ".0f")}
OUTPUT_FILES = ("per_case.csv", "summary.json", "summary.md")
VOLUMES_DIR = "volumes"
PROTOCOL = (
    "per volume on the model grid: synthesis results first taken back to the network's normalised frame and "
    "into the ground truth's own range (outputs of synthesis have no unit); result and ground truth mapped "
    "with the ground truth's min/max "
    "(result not clipped); PSNR = 10 log10(1/MSE) over the whole volume; SSIM = scikit-image 3D defaults "
    "(7^3 uniform window, data range 1); *_fg: the same over the foreground gt > min; MMD: squared distance "
    "of the voxel-wise mean volumes over all evaluated volumes (compare only at one grid); std: population "
    "std over rows; seconds and peak memory per method call"
)
SIMULATED_NOTE = "simulated data (ScoreFusion simulator): these numbers say nothing about real MRI"

#: ``progress(done, total, label)``: ``done`` runs finished of ``total``; ``label`` names the next one.
ProgressCallback = Callable[[int, int, str], Any]


@dataclass
class EvaluationOptions:
    """What to evaluate, on which cases, and where to write the results.

    Parameters
    ----------
    data : dataset folder or ``.csv``/``.json`` manifest (as for training).
    methods : names from :data:`METHODS` (a list or a comma-separated string). Interpolation
        baselines need a task with a degraded target (``sr``/``both``); model methods a bundle.
    bundle : trained bundle folder; its task and recorded grid define the evaluation.
    task : the task when there is no bundle (an SR :class:`TaskSpec`); with a bundle it must
        equal the bundle's.
    grid : model grid (i, j, k) reached by centred crop/pad. ``None``: the bundle's recorded
        grid, else each file's native grid. With a bundle that records a grid it must agree.
    split, val_fraction : ``test`` is the paper's held-out part (last ``val_fraction`` of the
        cases sorted by id, as in training), ``train`` the rest, ``all`` both.
    steps, sampler, time_grid, seed, device, consistency : sampling of every model method.
    samples : samples per case for model methods (seeds ``seed .. seed+samples-1``); the evaluated
        volume is their mean, exactly what ``super-resolve --samples K`` writes.
    limit : evaluate only the first ``limit`` cases of the split.
    out : folder for ``per_case.csv``, ``summary.json`` and ``summary.md`` (``None``: write nothing).
    save_volumes : also write each result as ``out/volumes/{case}_{method}.nii.gz``.
    overwrite : allow a non-empty ``out``; previous evaluation outputs in it are removed first.
    tile_size, max_memory_gb : score-fusion's tile side and memory bound.
    samples, tile_size, max_memory_gb are passed to ``SamplingOptions`` unchanged when it has
    such fields; a non-default value is refused when it has not.
    """

    data: str | Path
    methods: Sequence[str] | str = ("trilinear",)
    bundle: str | Path | None = None
    task: TaskSpec | None = None
    grid: Sequence[int] | None = None
    split: str = "test"
    val_fraction: float = 0.2
    steps: int = 50
    sampler: str = "ddpm"
    time_grid: str = "default"
    seed: int = 0
    device: str = "auto"
    consistency: bool = True
    samples: int = 1
    limit: int | None = None
    out: str | Path | None = None
    save_volumes: bool = False
    overwrite: bool = False
    tile_size: int | None = None
    max_memory_gb: float | None = None

    def validate(self) -> EvaluationOptions:
        """Check everything that needs no data; normalises ``methods`` to a tuple."""
        from .train.options import split_list

        self.methods = split_list(self.methods)
        if not self.methods:
            raise InputError(f"no method to evaluate; choose from {', '.join(METHODS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InputError(f"unknown method(s) {', '.join(unknown)}; use {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise InputError(f"methods {', '.join(self.methods)} name a method twice")
        if self.split not in SPLITS:
            raise InputError(f"unknown split {self.split!r}; use one of {', '.join(SPLITS)}")
        if isinstance(self.val_fraction, bool) or not 0.0 <= float(self.val_fraction) < 1.0:
            raise InputError(f"val_fraction must lie in [0, 1), got {self.val_fraction!r}")
        limit = self.limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InputError(f"limit must be a positive integer, got {self.limit!r}")
        if self.save_volumes and self.out is None:
            raise InputError("save_volumes needs an output folder")
        if self.grid is not None:
            self.grid = tuple(int(n) for n in self.grid)
        return self

    def configuration(self) -> dict:
        """A JSON-friendly record of the options (paths as strings, the task as its dict)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, TaskSpec):
                value = value.to_dict()
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass
class EvaluationReport:
    """Per-row results, the per-method summary and its markdown table."""

    rows: list[dict]
    summary: dict
    markdown: str
    out: Path | None = None


def synthesis_in_target_frame(result: np.ndarray, truth: np.ndarray, reference_input: np.ndarray,
                              normalization: str) -> np.ndarray:
    """A synthesis result in the ground truth's intensity frame, as the networks compared them.

    Synthesis outputs have no unit of their own: translation maps the network's [-1, 1]
    output through the reference input's range. The paper compares normalised volumes, so
    undo that map and apply the ground truth's own normalisation (fitted as in training)
    instead. (Super-resolution outputs already are in the target's units.)
    """
    from .intensity import fit_normalization

    reference = fit_normalization(reference_input, normalization)
    target = fit_normalization(truth, normalization)
    return target.invert(reference.apply(result)).astype(np.float32)


def _finite_or_none(value: float) -> float | None:
    """JSON has no infinity (identical volumes give PSNR = inf): store it as null."""
    return float(value) if math.isfinite(value) else None


def summarize_rows(rows: Sequence[dict], methods: Sequence[str]) -> dict[str, dict]:
    """Per method: mean and population std of each per-row number, and the counts."""
    out = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"n_cases": len({r["case_id"] for r in mine}), "n_rows": len(mine)}
        for key in (*SUMMARY_COLUMNS, *COST_COLUMNS):
            values = np.array([r[key] for r in mine], dtype=np.float64)
            entry[key] = {"mean": _finite_or_none(float(values.mean())), "std": _finite_or_none(float(values.std()))}
        out[method] = entry
    return out


def _cell(stats: dict, fmt: str) -> str:
    if stats["mean"] is None:
        return "inf"
    return f"{stats['mean']:{fmt}} ± {stats['std']:{fmt}}" if stats["std"] is not None else f"{stats['mean']:{fmt}}"


def markdown_table(summary: dict) -> str:
    """The ``summary.md`` text: a note on the data and protocol, then one row per method."""
    columns = {**SUMMARY_COLUMNS, "mmd": ("MMD", ".4g"), **COST_COLUMNS}
    lines = [f"# ScoreFusion evaluation: {summary['task']['kind']} ({summary['split']['name']} split, "
             f"{len(summary['split']['case_ids'])} cases)", ""]
    if summary["simulated_data"]:
        lines += [f"**Note:** {SIMULATED_NOTE}.", ""]
    lines += ["| method | " + " | ".join(name for name, _ in columns.values()) + " |",
              "|---" * (len(columns) + 1) + "|"]
    for method, entry in summary["methods"].items():
        cells = []
        for key, (_, fmt) in columns.items():
            if key == "mmd":
                cells.append("n/a" if entry["mmd"] is None else f"{entry['mmd']:{fmt}}")
            else:
                cells.append(_cell(entry[key], fmt))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    kinds = sorted({entry["memory"] for entry in summary["methods"].values()})
    lines += ["", f"Values: mean ± std over volumes. Peak memory: {', '.join(kinds)}. Protocol: {PROTOCOL}."]
    return "\n".join(lines) + "\n"


def _rows_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def prepare_output_folder(out: Path, overwrite: bool, files: Sequence[str] = OUTPUT_FILES,
                          volume_dirs: Sequence[str] = (VOLUMES_DIR,)) -> None:
    """Refuse a file or a non-empty folder unless ``overwrite``; then drop a previous run's outputs.

    Removing them first means a folder never mixes the results of two runs. ``files`` are the
    run's output files and ``volume_dirs`` its sub-folders of ``*.nii.gz`` volumes (shared by
    ``evaluate`` and ``evaluate-downstream``, which write different sets).
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise InputError(f"output folder {out} is not empty; pass --overwrite (overwrite=True) or choose another")
    for name in files:
        (out / name).unlink(missing_ok=True)
    for folder in volume_dirs:
        if (out / folder).is_dir():
            for path in (out / folder).glob("*.nii.gz"):
                path.unlink()


class _Evaluation:
    """One evaluation run: the task, grid and cases are fixed before any method runs."""

    def __init__(self, options: EvaluationOptions, progress: ProgressCallback | None) -> None:
        self.options = options.validate()
        self.progress = progress
        self.manifest: Manifest | None = read_manifest(options.bundle) if options.bundle is not None else None
        self.spec = self._task()
        self.grid, self.grid_source = self._grid()
        self._check_methods()
        self.records, self.simulated = self._cases()
        model = any(m in MODEL_METHODS for m in options.methods)
        self.model_device = self._model_device() if model else "cpu"
        self.out = Path(options.out) if options.out is not None else None
        self.rows: list[dict] = []
        self.memory_kinds: dict[str, str] = {}
        self.runs_total = len(self.records) * len(options.methods)
        self.runs_done = 0

    # -- set-up --------------------------------------------------------------------------
    def _task(self) -> TaskSpec:
        given = self.options.task
        if self.manifest is None:
            if given is None:
                raise InputError("without a bundle, give the task to evaluate (an SR task: target and factor)")
            return given
        spec = TaskSpec.from_dict(self.manifest.task)
        if given is not None and given.to_dict() != spec.to_dict():
            raise InputError(f"the given task {given.to_dict()} differs from the bundle's {spec.to_dict()}")
        return spec

    def _grid(self) -> tuple[tuple[int, int, int] | None, str]:
        wanted = self.options.grid
        recorded = self.manifest.grid.get("shape_ijk") if self.manifest is not None else None
        if recorded:
            recorded = tuple(int(n) for n in recorded)
            if wanted is not None and tuple(wanted) != recorded:
                raise InputError(
                    f"the bundle was trained on the grid {recorded} (i, j, k); evaluating on {tuple(wanted)} "
                    "would not match training (leave the grid out)"
                )
            return recorded, "bundle"
        if wanted is not None:
            return tuple(wanted), "given"
        return None, "native"

    def _check_methods(self) -> None:
        for method in self.options.methods:
            if method in INTERPOLATION_METHODS and not self.spec.degraded_target:
                raise InputError(
                    f"{method} is an interpolation baseline for super-resolution; the {self.spec.kind} task "
                    f"has no low-resolution input (use {', '.join(MODEL_METHODS)})"
                )
            if method in MODEL_METHODS:
                if self.manifest is None:
                    raise InputError(f"method {method} samples a trained model; give a bundle (--model)")
                from .translate import resolve_method

                self._sampling_options(method).validate()
                resolve_method(self.options.bundle, method)

    def _cases(self) -> tuple[list[CaseRecord], bool]:
        opts = self.options
        records = load_cases(opts.data)
        split = split_cases(records, mode="paper", train_fraction=1.0 - float(opts.val_fraction))
        chosen = {"test": split.test, "train": split.train, "all": split.train + split.test}[opts.split]
        if not chosen:
            raise DatasetError(
                f"the {opts.split} split of the {len(records)} cases in {opts.data} is empty with "
                f"val_fraction {opts.val_fraction}"
            )
        chosen = chosen[: opts.limit] if opts.limit else chosen
        trained_on = set(self.manifest.training.get("train_case_ids", [])) if self.manifest is not None else set()
        leaked = sorted(trained_on & {r.case_id for r in chosen})
        if opts.split == "test" and leaked:
            raise DatasetError(
                f"{len(leaked)} test case(s) were used to train the bundle ({', '.join(leaked[:3])}"
                f"{' ...' if len(leaked) > 3 else ''}); use the val_fraction the bundle was trained with"
            )
        return chosen, any(r.simulated for r in records)

    def _model_device(self) -> str:
        """The resolved device, initialised now so the first method timed does not pay for it."""
        from .translate import resolve_device

        device = resolve_device(self.options.device)  # imports torch
        if device.startswith("cuda"):
            import torch

            torch.zeros(1, device=device)  # creates the CUDA context
        return device

    def _sampling_options(self, method: str):  # -> SamplingOptions
        from .translate import SamplingOptions

        opts = self.options
        return SamplingOptions(method=method, sampler=opts.sampler, steps=int(opts.steps), time_grid=opts.time_grid,
                               seed=int(opts.seed), device=opts.device, consistency=bool(opts.consistency),
                               samples=int(opts.samples), tile_size=opts.tile_size,
                               max_memory_gb=opts.max_memory_gb)

    # -- one case --------------------------------------------------------------------------
    def _case(self, record: CaseRecord) -> tuple[Volume, dict[str, Volume]]:
        """Ground truth on the training grid and orientation, and the inputs the methods see."""
        loaded = load_case(record, self.spec.contrasts, grid_shape_ijk=self.grid, reorient=True)
        truth = loaded.volumes[self.spec.target]
        inputs = {c: loaded.volumes[c] for c in self.spec.inputs}
        if self.spec.degraded_target:
            inputs[self.spec.target] = self.spec.degradation.degrade_volume(truth)
        return truth, inputs

    def _run(self, method: str, inputs: dict[str, Volume]) -> Volume:
        spec = self.spec
        if method in INTERPOLATION_METHODS:
            return upsample_volume(inputs[spec.target], spec.degradation.factors, method)
        from .translate import super_resolve, synthesize

        options = self._sampling_options(method)
        if spec.degraded_target:
            extra = {c: v for c, v in inputs.items() if c != spec.target}
            return super_resolve(inputs[spec.target], self.options.bundle, options, extra_inputs=extra).volume
        return synthesize(inputs, self.options.bundle, options).volume

    def _in_target_units(self, result: Volume, truth: Volume, inputs: dict[str, Volume]) -> np.ndarray:
        if self.spec.degraded_target:  # SR results are in the target's units already
            return result.array
        return synthesis_in_target_frame(result.array, truth.array, inputs[self.spec.inputs[0]].array,
                                         self.spec.normalization)

    def _tick(self, label: str) -> None:
        if self.progress is not None:
            self.progress(self.runs_done, self.runs_total, label)

    def pairs(self, method: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Run ``method`` on every case; record a row per run and yield ``(result, ground truth)``."""
        from .metrics import volume_metrics  # scipy: imported on use, so `scorefusion --help` stays fast

        model = method in MODEL_METHODS
        device = self.model_device if model else "cpu"
        for record in self.records:
            truth, inputs = self._case(record)
            self._tick(f"{record.case_id} {method}")
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                result = self._run(method, inputs)
                seconds = time.perf_counter() - start
            if not result.same_grid(truth):
                raise GeometryError(
                    f"the {method} result of case {record.case_id} does not lie on the ground truth's grid "
                    f"({result.shape_ijk} vs {truth.shape_ijk} voxels); this is a bug in the method"
                )
            self.memory_kinds[method] = memory.kind
            scored = self._in_target_units(result, truth, inputs)
            metrics = volume_metrics(scored, truth.array)
            self.rows.append({
                "case_id": record.case_id, "method": method, "psnr": metrics["psnr"], "ssim": metrics["ssim"],
                "psnr_fg": metrics["psnr_foreground"], "ssim_fg": metrics["ssim_foreground"], "seconds": seconds,
                "peak_mib": memory.peak_mib, "steps": int(self.options.steps) if model else "",
            })
            self._save(result, record.case_id, method)
            self.runs_done += 1
            yield scored, truth.array

    def _save(self, result: Volume, case_id: str, method: str) -> None:
        if not self.options.save_volumes:
            return
        from .volume_io import save_volume

        path = self.out / VOLUMES_DIR / f"{case_id}_{method}.nii.gz"
        save_volume(result, path, description=f"ScoreFusion evaluation: {method}; not for diagnosis")

    # -- the whole run ---------------------------------------------------------------------
    def run(self) -> EvaluationReport:
        from .metrics import mmd_linear

        if self.out is not None:
            prepare_output_folder(self.out, self.options.overwrite)
        mmd = {}
        for method in self.options.methods:
            # tee buffers at most one pair: mmd_linear alternates between its two iterables
            results, truths = itertools.tee(self.pairs(method))
            mmd[method] = mmd_linear((r for r, _ in results), (t for _, t in truths))
        self._tick("")
        summary = self._summary(mmd)
        report = EvaluationReport(self.rows, summary, markdown_table(summary), self.out)
        if self.out is not None:
            self._write(report)
        return report

    def _summary(self, mmd: dict[str, float]) -> dict:
        methods = summarize_rows(self.rows, self.options.methods)
        for method, entry in methods.items():
            entry["mmd"] = _finite_or_none(mmd[method])
            entry["memory"] = self.memory_kinds[method]
            entry["steps"] = int(self.options.steps) if method in MODEL_METHODS else None
        bundle = None
        if self.manifest is not None:
            path = Path(self.options.bundle)
            bundle = {"path": str(path.resolve()), "manifest_sha256": sha256_file(path / "manifest.json")}
        return {
            "software": f"ScoreFusion {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "configuration": self.options.configuration(),
            "task": self.spec.to_dict(),
            "bundle": bundle,
            "grid": {"shape_ijk": list(self.grid) if self.grid else None, "source": self.grid_source,
                     "orientation": "RAS"},
            "split": {"name": self.options.split, "val_fraction": float(self.options.val_fraction),
                      "rule": "cases sorted by id; the last val_fraction are held out (test), as in training",
                      "case_ids": [r.case_id for r in self.records]},
            "simulated_data": self.simulated,
            "note": SIMULATED_NOTE if self.simulated else "",
            "protocol": PROTOCOL,
            "methods": methods,
        }

    def _write(self, report: EvaluationReport) -> None:
        write_text_atomic(self.out / "per_case.csv", _rows_csv(report.rows))
        write_text_atomic(self.out / "summary.json", json.dumps(report.summary, indent=2, allow_nan=False) + "\n")
        write_text_atomic(self.out / "summary.md", report.markdown)


def evaluate(options: EvaluationOptions, progress: ProgressCallback | None = None) -> EvaluationReport:
    """Run every method of ``options`` on the chosen split and summarise (see the module docstring).

    Everything that can be checked without computing (methods, task, bundle, grid, cases, the
    output folder) is checked first, so a mistake fails before hours of sampling.
    """
    return _Evaluation(options, progress).run()


__all__ = [
    "INTERPOLATION_METHODS",
    "METHODS",
    "MODEL_METHODS",
    "SPLITS",
    "EvaluationOptions",
    "EvaluationReport",
    "evaluate",
    "markdown_table",
    "prepare_output_folder",
    "summarize_rows",
    "synthesis_in_target_frame",
]
