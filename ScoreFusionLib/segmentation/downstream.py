"""Does contrast synthesis help tumour segmentation? Segment held-out cases with the missing contrast filled in.

A synthesis model is only worth using for segmentation if the segmenter does better with its output
than with what a user would otherwise feed it. So every held-out case is segmented once per method,
with the segmenter's channels identical except the missing one, which each method provides:

* ``real``: the real contrast (the upper bound; what the segmenter was trained on);
* ``zero-filled``: an all-zero volume (the segmenter's convention for "absent": zeros stay zero
  under its nonzero normalisation);
* ``other-contrast``: another real contrast of the same case (e.g. T2w for FLAIR);
* ``average`` and ``score-fusion``: the contrast synthesised by a translation bundle whose task
  targets the missing contrast, with the plane average or the learned fusion.

Cases are split exactly as for training and for :mod:`ScoreFusionLib.evaluation` and loaded on the
translation bundle's training grid (centred crop/pad, reoriented to RAS), so the translation model
sees what it was trained on and every method is segmented on the same voxels; without a translation
bundle the native grid is kept. The reference labels are the case's own segmentation on that grid.

Synthesised volumes have no intensity unit and their background is not exactly zero (the networks
produce small values everywhere). The segmenter normalises each channel over its *nonzero* voxels,
so a non-zero background would enter the mean and std and shift the normalised brain intensities
relative to the real channels (which are zero outside the skull-stripped head). Synthesised volumes
are therefore set to 0 outside the head, taken as the voxels where every real input of the case is
0. Real contrasts (``other-contrast``) already have their zero background and are used unchanged.

Metrics per case and method: Dice of the BraTS regions WT, TC, ET
(:func:`~ScoreFusionLib.metrics.region_dice`) and their HD95 in mm
(:func:`~ScoreFusionLib.metrics.hd95`). HD95 is infinite when exactly one of the two masks is
empty; it is stored as null, counted, and left out of the means.

Nothing here imports torch, MONAI or safetensors at import time.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import write_text_atomic
from ..errors import DatasetError, GeometryError, InputError
from ..evaluation import SIMULATED_NOTE, SPLITS, ProgressCallback, prepare_output_folder
from ..volume import Volume

#: The ways of providing the missing contrast, in the default (and table) order.
METHODS = ("real", "zero-filled", "other-contrast", "average", "score-fusion")
#: Methods that synthesise with a translation bundle; the names are its fusion modes.
SYNTHESIS_METHODS = ("average", "score-fusion")
#: ``other-contrast`` default: the real contrast that looks most like the missing one.
DEFAULT_REPLACEMENT = {"t2f": "t2w", "t2w": "t2f", "t1c": "t1n", "t1n": "t1c"}
#: The method every Dice difference is taken against (the segmenter's own "absent" input).
BASELINE = "zero-filled"
REGIONS = ("WT", "TC", "ET")
LABELS_DIR = "labels"
OUTPUT_FILES = ("per_case.csv", "summary.json", "summary.md")
CSV_COLUMNS = ("case_id", "method", *(f"dice_{r.lower()}" for r in REGIONS), *(f"hd95_{r.lower()}" for r in REGIONS),
               "seconds", "synthesis_seconds", "steps")
PROTOCOL = (
    "every held-out case segmented once per method with the segmenter's channels; only the missing contrast "
    "differs: real, all zeros (zero-filled), another real contrast (other-contrast), or synthesised by the "
    "translation bundle (average / score-fusion; set to 0 outside the head = voxels where every real input is 0, "
    "because the segmenter normalises over nonzero voxels); cases on the translation bundle's training grid "
    "(centred crop/pad, RAS), else their native grid; Dice per BraTS region (WT, TC, ET; both empty = 1); "
    "HD95 in mm (both empty = 0; one empty = infinite: stored as null, counted, left out of the mean); std: "
    "population std over cases; difference to zero-filled: mean over cases of (method Dice - zero-filled Dice); "
    "seconds per case: providing the channel (synthesis) plus segmentation"
)


@dataclass
class DownstreamOptions:
    """What to compare, on which cases, with which models, and where to write the results.

    Parameters
    ----------
    data : dataset folder or ``.csv``/``.json`` manifest of labelled cases.
    missing : the contrast a user lacks (any spelling: ``flair`` means ``t2f``); a segmenter channel.
    translation_model : model id, bundle folder or ``.zip`` of an ``mt`` bundle whose target is
        ``missing``; needed by ``average``/``score-fusion``. When given, its recorded grid is
        used for every method (so runs with and without synthesis methods are comparable) and
        its training cases are refused as test cases.
    segmenter : segmenter bundle folder or ``.zip``, or ``default`` (the shipped one).
    methods : names from :data:`METHODS` (a list or a comma-separated string), run in this order.
    replacement : ``other-contrast``'s stand-in; ``None``: :data:`DEFAULT_REPLACEMENT`.
    split, val_fraction, limit : as in :class:`~ScoreFusionLib.evaluation.EvaluationOptions`.
    steps, sampler, time_grid, seed, device : sampling of the synthesis methods (shared by both,
        so they differ by the fusion mode alone); ``device`` also runs the segmenter.
    out : folder for ``per_case.csv``, ``summary.json``, ``summary.md`` (``None``: write nothing).
    save_volumes : also write each label map as ``out/labels/{case}_{method}.nii.gz``.
    overwrite : allow a non-empty ``out``; a previous run's outputs in it are removed first.
    """

    data: str | Path
    missing: str
    translation_model: str | Path | None = None
    segmenter: str | Path = "default"
    methods: Sequence[str] | str = METHODS
    replacement: str | None = None
    split: str = "test"
    val_fraction: float = 0.2
    limit: int | None = None
    steps: int = 50
    sampler: str = "ddpm"
    time_grid: str = "default"
    seed: int = 0
    device: str = "auto"
    out: str | Path | None = None
    save_volumes: bool = False
    overwrite: bool = False

    def validate(self) -> DownstreamOptions:
        """Check everything that needs no file; canonicalises contrasts and normalises ``methods``."""
        from ..data.records import canonical_contrast
        from ..train.options import split_list

        self.methods = split_list(self.methods)
        if not self.methods:
            raise InputError(f"no method to evaluate; choose from {', '.join(METHODS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InputError(f"unknown method(s) {', '.join(unknown)}; use {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise InputError(f"methods {', '.join(self.methods)} name a method twice")
        self.missing = canonical_contrast(self.missing)
        if self.replacement is not None:
            self.replacement = canonical_contrast(self.replacement)
        if self.replacement == self.missing:
            raise InputError(f"the replacement contrast must differ from the missing one ({self.missing}); "
                             "other-contrast replaces it by another real contrast")
        if "other-contrast" in self.methods and self.replacement is None:
            if self.missing not in DEFAULT_REPLACEMENT:
                raise InputError(f"other-contrast has no default stand-in for {self.missing}; give a "
                                 "replacement contrast")
            self.replacement = DEFAULT_REPLACEMENT[self.missing]
        if self.split not in SPLITS:
            raise InputError(f"unknown split {self.split!r}; use one of {', '.join(SPLITS)}")
        if isinstance(self.val_fraction, bool) or not 0.0 <= float(self.val_fraction) < 1.0:
            raise InputError(f"val_fraction must lie in [0, 1), got {self.val_fraction!r}")
        limit = self.limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InputError(f"limit must be a positive integer, got {self.limit!r}")
        synthesis = [m for m in self.methods if m in SYNTHESIS_METHODS]
        if synthesis and self.translation_model is None:
            raise InputError(f"method(s) {', '.join(synthesis)} synthesise {self.missing} with a translation model; "
                             "give one (--translation-model)")
        if self.save_volumes and self.out is None:
            raise InputError("save_volumes needs an output folder")
        return self

    def configuration(self) -> dict:
        """A JSON-friendly record of the options (paths as strings, tuples as lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return out


@dataclass
class DownstreamReport:
    """Per-case rows, the per-method summary and its markdown table."""

    rows: list[dict]
    summary: dict
    markdown: str
    out: Path | None = None


def _finite_or_none(value: float) -> float | None:
    """JSON has no infinity (HD95 with one empty mask): store it as null."""
    return float(value) if math.isfinite(value) else None


def _mean_std(values: Sequence[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(a.mean()), "std": float(a.std())}


def summarize(rows: Sequence[dict], methods: Sequence[str]) -> dict[str, dict]:
    """Per method: Dice mean/std per region, finite-HD95 mean and infinite count, seconds, and Dice - zero-filled.

    The difference to zero-filled is the mean over cases of the per-case differences, so it is
    paired (the same case on both sides) rather than a difference of two means over cases that
    might differ.
    """
    baseline = {r["case_id"]: r for r in rows if r["method"] == BASELINE}
    out: dict[str, dict] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"n_cases": len(mine)}
        entry["dice"] = {region: _mean_std([r[f"dice_{region.lower()}"] for r in mine]) for region in REGIONS}
        entry["hd95"] = {}
        for region in REGIONS:
            values = [r[f"hd95_{region.lower()}"] for r in mine]
            finite = [v for v in values if v is not None]
            entry["hd95"][region] = {"mean": _mean_std(finite)["mean"], "n_finite": len(finite),
                                     "n_infinite": len(values) - len(finite)}
        entry["seconds"] = _mean_std([r["seconds"] for r in mine])
        if baseline:
            entry["dice_minus_zero_filled"] = {
                region: _mean_std([r[f"dice_{region.lower()}"] - baseline[r["case_id"]][f"dice_{region.lower()}"]
                                   for r in mine])["mean"]
                for region in REGIONS
            }
        else:
            entry["dice_minus_zero_filled"] = None
        out[method] = entry
    return out


def _dice_cell(stats: dict) -> str:
    return "n/a" if stats["mean"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _hd95_cell(stats: dict) -> str:
    text = "n/a" if stats["mean"] is None else f"{stats['mean']:.1f}"
    return f"{text} ({stats['n_infinite']} inf)" if stats["n_infinite"] else text


def markdown_table(summary: dict) -> str:
    """The ``summary.md`` text: what was compared, a note on the data, one row per method, the protocol."""
    lines = [f"# ScoreFusion downstream segmentation: missing {summary['missing']} "
             f"({summary['split']['name']} split, {len(summary['split']['case_ids'])} cases)", ""]
    if summary["simulated_data"]:
        lines += [f"**Note:** {SIMULATED_NOTE}.", ""]
    delta = any(e["dice_minus_zero_filled"] is not None for e in summary["methods"].values())
    header = [f"Dice {r}" for r in REGIONS]
    header += [f"ΔDice {r} vs zero-filled" for r in REGIONS] if delta else []
    header += [f"HD95 {r} (mm)" for r in REGIONS] + ["s/case"]
    lines += ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for method, entry in summary["methods"].items():
        cells = [_dice_cell(entry["dice"][r]) for r in REGIONS]
        if delta:
            cells += [f"{entry['dice_minus_zero_filled'][r]:+.3f}" for r in REGIONS]
        cells += [_hd95_cell(entry["hd95"][r]) for r in REGIONS]
        cells.append(f"{entry['seconds']['mean']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    stand_in = f" other-contrast uses {summary['replacement']}." if summary.get("replacement") else ""
    lines += ["", f"Values: mean ± std over cases; HD95 mean over finite values.{stand_in} Protocol: {PROTOCOL}."]
    return "\n".join(lines) + "\n"


def _rows_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # None (an infinite HD95) becomes an empty cell
    return buffer.getvalue()


class _Downstream:
    """One run: models, cases and output folder are all checked before the first case is segmented."""

    def __init__(self, options: DownstreamOptions, progress: ProgressCallback | None) -> None:
        self.options = options.validate()
        self.progress = progress
        self._segmenter_setup()
        self._translation_setup()
        self.records, self.simulated = self._cases()
        self.out = Path(options.out) if options.out is not None else None
        if self.out is not None:
            prepare_output_folder(self.out, options.overwrite, OUTPUT_FILES, (LABELS_DIR,))
        self.rows: list[dict] = []
        self.runs_total = len(self.records) * len(options.methods)
        self.runs_done = 0

    # -- set-up --------------------------------------------------------------------------
    def _segmenter_setup(self) -> None:
        from .defaults import resolve_segmenter
        from .model_bundle import read_segmenter_manifest

        self.segmenter_path = resolve_segmenter(self.options.segmenter)
        self.segmenter_manifest = read_segmenter_manifest(self.segmenter_path)
        channels = self.segmenter_manifest.channels
        if self.options.missing not in channels:
            raise InputError(f"the segmenter does not use {self.options.missing} (its channels are "
                             f"{', '.join(channels)}), so a missing {self.options.missing} cannot change its result")

    def _translation_setup(self) -> None:
        from ..bundle import read_manifest
        from ..data.task import TaskSpec

        opts = self.options
        self.translation_path: Path | None = None
        self.translation_manifest = None
        self.task: TaskSpec | None = None
        self.grid: tuple[int, int, int] | None = None
        if opts.translation_model is None:
            return
        from ..registry import resolve_model

        self.translation_path = Path(resolve_model(opts.translation_model))
        manifest = read_manifest(self.translation_path)
        task = TaskSpec.from_dict(manifest.task)
        if task.kind != "mt":
            raise InputError(f"the translation model {opts.translation_model} is a '{task.kind}' model; "
                             "evaluate-downstream needs a contrast-synthesis (mt) model")
        if task.target != opts.missing:
            raise InputError(f"the translation model {opts.translation_model} synthesises {task.target}, not the "
                             f"missing contrast {opts.missing}")
        if "score-fusion" in opts.methods and not manifest.fuser:
            raise InputError(f"the translation model {opts.translation_model} has no trained fuser, so score-fusion "
                             "is unavailable; train one with `scorefusion train fuser` or leave score-fusion out "
                             "of the methods")
        for method in opts.methods:
            if method in SYNTHESIS_METHODS:
                self._sampling_options(method).validate()
        recorded = manifest.grid.get("shape_ijk") if manifest.grid else None
        self.grid = tuple(int(n) for n in recorded) if recorded else None
        self.translation_manifest, self.task = manifest, task

    def _contrasts(self) -> list[str]:
        """Every contrast a case must provide: the segmenter's (the missing one only for ``real``), the
        translation inputs and the replacement."""
        opts = self.options
        wanted = [c for c in self.segmenter_manifest.channels if c != opts.missing or "real" in opts.methods]
        if self.task is not None:
            wanted += list(self.task.inputs)
        if "other-contrast" in opts.methods:
            wanted.append(opts.replacement)
        return list(dict.fromkeys(wanted))

    def _cases(self) -> tuple[list[Any], bool]:
        from ..data.sources import load_cases
        from ..data.split import split_cases

        opts = self.options
        records = load_cases(opts.data)
        split = split_cases(records, mode="paper", train_fraction=1.0 - float(opts.val_fraction))
        chosen = {"test": split.test, "train": split.train, "all": split.train + split.test}[opts.split]
        if not chosen:
            raise DatasetError(f"the {opts.split} split of the {len(records)} cases in {opts.data} is empty with "
                               f"val_fraction {opts.val_fraction}")
        chosen = chosen[: opts.limit] if opts.limit else chosen
        if opts.split == "test":
            ids = {r.case_id for r in chosen}
            for what, manifest_training in (
                ("translation model", self.translation_manifest.training if self.translation_manifest else {}),
                ("segmenter", self.segmenter_manifest.training),
            ):
                leaked = sorted(ids & set(manifest_training.get("train_case_ids", [])))
                if leaked:
                    raise DatasetError(
                        f"{len(leaked)} test case(s) were used to train the {what} ({', '.join(leaked[:3])}"
                        f"{' ...' if len(leaked) > 3 else ''}); use the val_fraction the models were trained with"
                    )
        needed = self._contrasts() + ["seg"]
        for record in chosen:
            lacking = [c for c in needed if c not in record.paths]
            if lacking:
                raise DatasetError(f"case {record.case_id} has no {', '.join(lacking)} file; downstream evaluation "
                                   f"needs {', '.join(needed)}")
        return chosen, any(r.simulated for r in records)

    def _sampling_options(self, method: str):  # -> SamplingOptions
        from ..translate import SamplingOptions

        opts = self.options
        return SamplingOptions(method=method, steps=int(opts.steps), sampler=opts.sampler, time_grid=opts.time_grid,
                               seed=int(opts.seed), device=opts.device)

    # -- one case, one method ------------------------------------------------------------------
    def _missing_channel(self, method: str, loaded: Any) -> tuple[Volume, float]:
        """The volume standing for the missing contrast, and the seconds synthesis took (0 otherwise)."""
        opts = self.options
        volumes: dict[str, Volume] = loaded.volumes
        if method == "real":
            return volumes[opts.missing], 0.0
        reals = [v for c, v in volumes.items() if c != opts.missing]
        if method == "zero-filled":
            return reals[0].with_array(np.zeros(reals[0].array.shape, dtype=np.float32)), 0.0
        if method == "other-contrast":
            return volumes[opts.replacement], 0.0
        from .. import translate
        from .preprocess import zero_outside_head

        start = time.perf_counter()
        inputs = {c: volumes[c] for c in self.task.inputs}
        result = translate.synthesize(inputs, self.translation_path, self._sampling_options(method)).volume
        seconds = time.perf_counter() - start
        if not result.same_grid(reals[0]):
            raise GeometryError(f"the {method} result of case {loaded.case_id} does not lie on the inputs' grid; "
                                "this is a bug in the translation")
        return zero_outside_head(result, reals), seconds

    def _row(self, record: Any, method: str, loaded: Any) -> Volume:
        from ..labels import region_mask
        from ..metrics import hd95, region_dice
        from . import inference

        opts = self.options
        start = time.perf_counter()
        channel, synthesis_seconds = self._missing_channel(method, loaded)
        volumes = {c: loaded.volumes[c] for c in self.segmenter_manifest.channels if c != opts.missing}
        volumes[opts.missing] = channel
        result = inference.segment(volumes, self.segmenter, device=self.device,
                                   label_convention=loaded.label_convention)
        seconds = time.perf_counter() - start
        truth = loaded.seg
        predicted = result.labels.array
        dice = region_dice(predicted, np.asarray(truth.array).astype(predicted.dtype), loaded.label_convention)
        row: dict[str, Any] = {"case_id": record.case_id, "method": method}
        row.update({f"dice_{r.lower()}": float(dice[r]) for r in REGIONS})
        for region in REGIONS:
            distance = hd95(region_mask(predicted, region, loaded.label_convention),
                            region_mask(truth.array, region, loaded.label_convention), truth.spacing)
            row[f"hd95_{region.lower()}"] = _finite_or_none(distance)
        row.update({"seconds": seconds, "synthesis_seconds": synthesis_seconds,
                    "steps": int(opts.steps) if method in SYNTHESIS_METHODS else ""})
        self.rows.append(row)
        return result.labels

    def _save(self, labels: Volume, case_id: str, method: str) -> None:
        if not self.options.save_volumes:
            return
        from ..volume_io import save_volume

        save_volume(labels, self.out / LABELS_DIR / f"{case_id}_{method}.nii.gz",
                    description=f"ScoreFusion downstream: {method} labels; not for diagnosis")

    def _tick(self, label: str) -> None:
        if self.progress is not None:
            self.progress(self.runs_done, self.runs_total, label)

    # -- the whole run ---------------------------------------------------------------------
    def run(self) -> DownstreamReport:
        from ..data.loading import load_case
        from ..translate import resolve_device
        from .model_bundle import load_segmenter

        self.device = resolve_device(self.options.device)
        self.segmenter = load_segmenter(self.segmenter_path, self.device)
        contrasts = self._contrasts()
        for record in self.records:
            loaded = load_case(record, contrasts, grid_shape_ijk=self.grid, seg=True, reorient=True)
            for method in self.options.methods:
                self._tick(f"{record.case_id} {method}")
                labels = self._row(record, method, loaded)
                self._save(labels, record.case_id, method)
                self.runs_done += 1
        self._tick("")
        summary = self._summary()
        report = DownstreamReport(self.rows, summary, markdown_table(summary), self.out)
        if self.out is not None:
            write_text_atomic(self.out / "per_case.csv", _rows_csv(report.rows))
            write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
            write_text_atomic(self.out / "summary.md", report.markdown)
        return report

    def _summary(self) -> dict:
        from ..bundle import MANIFEST, sha256_file

        opts = self.options
        m = self.segmenter_manifest
        translation = None
        if self.translation_path is not None:
            translation = {"model": str(opts.translation_model), "path": str(self.translation_path.resolve()),
                           "manifest_sha256": sha256_file(self.translation_path / MANIFEST),
                           "task": self.task.to_dict(), "has_fuser": bool(self.translation_manifest.fuser)}
        synthesis = any(method in SYNTHESIS_METHODS for method in opts.methods)
        return {
            "software": f"ScoreFusion {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "configuration": opts.configuration(),
            "missing": opts.missing,
            "replacement": opts.replacement if "other-contrast" in opts.methods else None,
            "segmenter": {"model": str(opts.segmenter), "path": str(self.segmenter_path.resolve()),
                          "manifest_sha256": sha256_file(self.segmenter_path / MANIFEST),
                          "weights_sha256": m.weights_sha256, "channels": list(m.channels)},
            "translation_model": translation,
            "sampling": {"steps": int(opts.steps), "sampler": opts.sampler, "time_grid": opts.time_grid,
                         "seed": int(opts.seed), "same_seed_every_case": True} if synthesis else None,
            "device": self.device,
            "grid": {"shape_ijk": list(self.grid) if self.grid else None,
                     "source": "translation model" if self.grid else "native", "orientation": "RAS"},
            "split": {"name": opts.split, "val_fraction": float(opts.val_fraction),
                      "rule": "cases sorted by id; the last val_fraction are held out (test), as in training",
                      "case_ids": [r.case_id for r in self.records]},
            "simulated_data": self.simulated,
            "note": SIMULATED_NOTE if self.simulated else "",
            "protocol": PROTOCOL,
            "methods": summarize(self.rows, opts.methods),
        }


def evaluate_downstream(options: DownstreamOptions, progress: ProgressCallback | None = None) -> DownstreamReport:
    """Segment every held-out case once per method and compare (see the module docstring).

    Everything that can be checked without computing (methods, contrasts, both models, the
    bundle's task and fuser, the split, leakage of training cases, the output folder) is checked
    first, so a mistake fails before any sampling and writes nothing.
    """
    return _Downstream(options, progress).run()


__all__ = [
    "DEFAULT_REPLACEMENT",
    "METHODS",
    "SYNTHESIS_METHODS",
    "DownstreamOptions",
    "DownstreamReport",
    "evaluate_downstream",
    "markdown_table",
    "summarize",
]
