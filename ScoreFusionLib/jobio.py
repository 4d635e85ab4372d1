"""The job folder shared by the Slicer module and the worker subprocess.

Layout (numpy and JSON only; every matrix is IJK->RAS, never LPS)::

    job.json      ``kind`` (``translate``, the default when absent, or ``segment``), the input names
                  (``contrasts``) and the kind's settings: for ``translate`` the task, the bundle
                  (folder, .zip or model id; + optional manifest sha256) and sampling settings
                  (samples, tile_size, max_memory_gb, ...); for ``segment`` the segmenter (``default``,
                  a segmenter bundle folder or .zip), device, label convention (null: the segmenter's own),
                  whether to keep the region probabilities, and the sliding-window settings
    input.npz     one float32 (k, j, i) array per contrast, plus ``ijk_to_ras`` (4x4 float64)
    cancel        created by the driver to ask the worker to stop (cooperative cancel)
    output.npz    ``translate``: ``array`` (float32, (k, j, i)) and the output's OWN ``ijk_to_ras``;
                  with several samples also ``uncertainty``, their voxel-wise standard deviation on
                  the same grid. ``segment``: ``labels`` (uint8, (k, j, i), on the input grid),
                  ``ijk_to_ras`` and, when asked for, ``probability_TC``/``_WT``/``_ET`` (float32)
    output.json   provenance of the run (for ``segment`` also ``label_convention``)

All inputs of one job share one grid (one ``ijk_to_ras``). For super-resolution the output
grid differs from the input's, which is why ``output.npz`` carries its own matrix.
Outputs are written atomically, so a cancelled or crashed run never leaves a partial file.
Job folders written before ``kind`` existed read as ``translate`` jobs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, write_text_atomic
from .errors import InputError
from .volume import Volume, require_finite_real

JOB_FILE = "job.json"
INPUT_FILE = "input.npz"
OUTPUT_FILE = "output.npz"
OUTPUT_JSON = "output.json"
CANCEL_FILE = "cancel"
MATRIX_KEY = "ijk_to_ras"
ARRAY_KEY = "array"
UNCERTAINTY_KEY = "uncertainty"
LABELS_KEY = "labels"
PROBABILITY_PREFIX = "probability_"
MAX_SAMPLES = 64
JOB_FORMAT = "scorefusion-job"
JOB_FORMAT_VERSION = 1

TRANSLATE_KIND = "translate"
SEGMENT_KIND = "segment"
KINDS = (TRANSLATE_KIND, SEGMENT_KIND)
TASKS = ("super_resolve", "synthesize")
REQUIRED_KEYS = ("task", "contrasts", "bundle")
SEGMENT_REQUIRED_KEYS = ("contrasts",)
#: Region probability maps a segmentation job can keep (the segmenter's output channels).
REGIONS = ("TC", "WT", "ET")


def _validate_contrasts(contrasts: Any) -> list[str]:
    if (not isinstance(contrasts, (list, tuple)) or not contrasts
            or not all(isinstance(c, str) and c.strip() for c in contrasts)):
        raise InputError(f"job.json: 'contrasts' must be a non-empty list of names, got {contrasts!r}")
    names = [str(c) for c in contrasts]
    if len(set(names)) != len(names):
        raise InputError(f"job.json: contrast names repeat: {names}")
    if MATRIX_KEY in names:
        raise InputError(f"job.json: {MATRIX_KEY!r} cannot be a contrast name")
    return names


def _check_keys(cls: Any, d: Any, required: tuple[str, ...]) -> dict:
    if not isinstance(d, dict):
        raise InputError(f"job.json must hold a JSON object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        raise InputError(f"job.json is missing the keys {missing}")
    if "format_version" in d and d["format_version"] != JOB_FORMAT_VERSION:
        raise InputError(f"job.json has format version {d['format_version']!r}; this worker reads "
                         f"version {JOB_FORMAT_VERSION}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - known - {"format", "format_version"})
    if unknown:
        raise InputError(f"job.json has unknown keys {unknown}")
    return {k: v for k, v in d.items() if k in known}


@dataclass
class JobSettings:
    """What ``job.json`` holds: the task, its inputs' names, the bundle and sampling settings."""

    task: str
    contrasts: list[str]
    bundle: str
    bundle_sha256: str | None = None
    method: str = "auto"
    sampler: str = "ddpm"
    steps: int = 50
    time_grid: str = "default"
    seed: int = 0
    device: str = "auto"
    slice_batch: int = 8
    samples: int = 1
    tile_size: int | None = None
    max_memory_gb: float | None = None
    kind: str = TRANSLATE_KIND

    def validate(self) -> JobSettings:
        if self.kind != TRANSLATE_KIND:
            raise InputError(f"job.json: a translation job has kind {TRANSLATE_KIND!r}, got {self.kind!r}")
        if self.task not in TASKS:
            raise InputError(f"job.json: unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        self.contrasts = _validate_contrasts(self.contrasts)
        if self.task == "super_resolve" and len(self.contrasts) != 1:
            raise InputError(
                f"job.json: a super_resolve job takes exactly one contrast (the low-resolution volume), "
                f"got {self.contrasts}"
            )
        if not isinstance(self.bundle, str) or not self.bundle:
            raise InputError(f"job.json: 'bundle' must be a bundle folder, a bundle .zip or a model id, "
                             f"got {self.bundle!r}")
        if self.bundle_sha256 is not None and not (
            isinstance(self.bundle_sha256, str) and len(self.bundle_sha256) == 64
        ):
            raise InputError("job.json: 'bundle_sha256' must be the 64-digit hex sha256 of manifest.json")
        for name in ("steps", "seed", "slice_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"job.json: {name!r} must be a whole number, got {value!r}")
        if self.steps < 1:
            raise InputError(f"job.json: 'steps' must be at least 1, got {self.steps}")
        if self.slice_batch < 1:
            raise InputError(f"job.json: 'slice_batch' must be at least 1, got {self.slice_batch}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or not 1 <= self.samples <= MAX_SAMPLES:
            raise InputError(f"job.json: 'samples' must be a whole number in 1..{MAX_SAMPLES}, got {self.samples!r}")
        if self.tile_size is not None and (isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int)
                                           or self.tile_size < 8):
            raise InputError(f"job.json: 'tile_size' must be null or a whole number of voxels >= 8, "
                             f"got {self.tile_size!r}")
        if self.max_memory_gb is not None and (
                isinstance(self.max_memory_gb, bool) or not isinstance(self.max_memory_gb, (int, float))
                or not math.isfinite(self.max_memory_gb) or self.max_memory_gb <= 0):
            raise InputError(f"job.json: 'max_memory_gb' must be null or a positive number, got {self.max_memory_gb!r}")
        for name in ("method", "sampler", "time_grid", "device"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"job.json: {name!r} must be a string, got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        return {"format": JOB_FORMAT, "format_version": JOB_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Any) -> JobSettings:
        return cls(**_check_keys(cls, d, REQUIRED_KEYS)).validate()


@dataclass
class SegmentJobSettings:
    """``job.json`` of a segmentation job: the inputs' names, the segmenter and how to run it.

    ``segmenter`` is ``default`` (the shipped bundle), a segmenter bundle folder or .zip;
    ``label_convention`` None writes the segmenter's own convention (``brats2023`` or
    ``brats2021``); ``probabilities`` keeps the TC/WT/ET probability maps in ``output.npz``;
    ``overlap`` None uses the segmenter's sliding-window overlap. ``synthesized`` names the inputs
    that are generated images: their background is set to 0 wherever every real input is 0, as the
    segmenter's per-channel normalisation expects (at least one input must be real then).
    """

    contrasts: list[str]
    segmenter: str = "default"
    device: str = "auto"
    label_convention: str | None = None
    probabilities: bool = False
    overlap: float | None = None
    sw_batch_size: int = 1
    synthesized: list[str] = field(default_factory=list)
    kind: str = SEGMENT_KIND

    def validate(self) -> SegmentJobSettings:
        from .labels import CONVENTIONS

        if self.kind != SEGMENT_KIND:
            raise InputError(f"job.json: a segmentation job has kind {SEGMENT_KIND!r}, got {self.kind!r}")
        self.contrasts = _validate_contrasts(self.contrasts)
        if not isinstance(self.segmenter, str) or not self.segmenter.strip():
            raise InputError(f"job.json: 'segmenter' must be 'default' or a segmenter bundle folder or .zip, "
                             f"got {self.segmenter!r}")
        if not isinstance(self.device, str):
            raise InputError(f"job.json: 'device' must be a string, got {self.device!r}")
        if self.label_convention is not None and self.label_convention not in CONVENTIONS:
            raise InputError(f"job.json: 'label_convention' must be null or one of {sorted(CONVENTIONS)}, "
                             f"got {self.label_convention!r}")
        if not isinstance(self.probabilities, bool):
            raise InputError(f"job.json: 'probabilities' must be true or false, got {self.probabilities!r}")
        if self.overlap is not None and (
                isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float))
                or not 0.0 <= self.overlap < 1.0):
            raise InputError(f"job.json: 'overlap' must be null or a number in [0, 1), got {self.overlap!r}")
        if isinstance(self.sw_batch_size, bool) or not isinstance(self.sw_batch_size, int) or self.sw_batch_size < 1:
            raise InputError(f"job.json: 'sw_batch_size' must be a whole number >= 1, got {self.sw_batch_size!r}")
        if not isinstance(self.synthesized, (list, tuple)) or not all(c in self.contrasts for c in self.synthesized):
            raise InputError(f"job.json: 'synthesized' must list some of the contrasts {self.contrasts}, "
                             f"got {self.synthesized!r}")
        self.synthesized = [str(c) for c in self.synthesized]
        if self.synthesized and set(self.synthesized) == set(self.contrasts):
            raise InputError("job.json: at least one input must be real when others are 'synthesized'")
        return self

    def to_dict(self) -> dict:
        return {"format": JOB_FORMAT, "format_version": JOB_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Any) -> SegmentJobSettings:
        return cls(**_check_keys(cls, d, SEGMENT_REQUIRED_KEYS)).validate()


def parse_settings(d: Any) -> JobSettings | SegmentJobSettings:
    """The settings of a ``job.json`` object, by its ``kind`` (absent: ``translate``)."""
    kind = d.get("kind", TRANSLATE_KIND) if isinstance(d, dict) else TRANSLATE_KIND
    if kind == SEGMENT_KIND:
        return SegmentJobSettings.from_dict(d)
    if kind != TRANSLATE_KIND:
        raise InputError(f"job.json: unknown job kind {kind!r}; use one of {', '.join(KINDS)}")
    return JobSettings.from_dict(d)


@dataclass
class Job:
    """A job read back from its folder."""

    folder: Path
    settings: JobSettings | SegmentJobSettings
    volumes: dict[str, Volume] = field(default_factory=dict)


def _settings(settings: JobSettings | SegmentJobSettings | dict) -> JobSettings | SegmentJobSettings:
    if isinstance(settings, (JobSettings, SegmentJobSettings)):
        return settings.validate()
    return parse_settings(dict(settings))


def _check_matrix(matrix: Any, where: str) -> np.ndarray:
    m = np.asarray(matrix)
    if m.shape != (4, 4):
        raise InputError(f"{where}: '{MATRIX_KEY}' must be a 4x4 matrix, got shape {tuple(m.shape)}")
    if not np.issubdtype(m.dtype, np.number) or not np.all(np.isfinite(m)):
        raise InputError(f"{where}: '{MATRIX_KEY}' must hold finite numbers")
    m = m.astype(np.float64)
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(f"{where}: the last row of '{MATRIX_KEY}' must be (0, 0, 0, 1), got {m[3].tolist()}")
    return m


def _check_array(array: Any, where: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise InputError(f"{where} must be a 3D (k, j, i) array, got shape {tuple(arr.shape)}")
    if min(arr.shape) < 1:
        raise InputError(f"{where} is empty (shape {tuple(arr.shape)})")
    require_finite_real(arr, where)
    return arr.astype(np.float32, copy=False)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_job(folder: str | os.PathLike, volumes: dict[str, Volume],
              settings: JobSettings | SegmentJobSettings | dict) -> Path:
    """Create the job folder: ``input.npz`` with every contrast and the shared matrix, and ``job.json``.

    ``volumes`` maps each name of ``settings.contrasts`` to a :class:`Volume`; all must share
    one grid. Returns the folder.
    """
    folder = Path(folder)
    s = _settings(settings)
    if set(volumes) != set(s.contrasts):
        raise InputError(f"the job's contrasts {s.contrasts} differ from the volumes given {sorted(volumes)}")
    ref = volumes[s.contrasts[0]]
    arrays: dict[str, np.ndarray] = {}
    for name in s.contrasts:
        vol = volumes[name]
        if not isinstance(vol, Volume):
            raise InputError(f"input {name!r} must be a Volume, got {type(vol).__name__}")
        if not vol.same_grid(ref, atol_mm=1e-6):
            raise InputError(f"input {name!r} is not on the grid of {s.contrasts[0]!r}; all inputs of a job "
                             "must share one grid (resample them first)")
        arrays[name] = _check_array(vol.array, f"input {name!r}")
    arrays[MATRIX_KEY] = np.asarray(ref.affine, dtype=np.float64)
    folder.mkdir(parents=True, exist_ok=True)
    _save_npz(folder / INPUT_FILE, arrays)
    write_text_atomic(folder / JOB_FILE, json.dumps(s.to_dict(), indent=2) + "\n")
    return folder


def read_settings(folder: str | os.PathLike) -> JobSettings | SegmentJobSettings:
    """``job.json`` of ``folder``, validated."""
    path = Path(folder) / JOB_FILE
    if not path.is_file():
        raise InputError(f"no {JOB_FILE} in the job folder {folder}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    return parse_settings(d)


def read_inputs(folder: str | os.PathLike, settings: JobSettings | SegmentJobSettings) -> dict[str, Volume]:
    """The input volumes of ``input.npz``, validated against ``settings``."""
    path = Path(folder) / INPUT_FILE
    if not path.is_file():
        raise InputError(f"no {INPUT_FILE} in the job folder {folder}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable npz file: {exc}") from exc
    if MATRIX_KEY not in data:
        raise InputError(f"{INPUT_FILE} has no '{MATRIX_KEY}' matrix")
    matrix = _check_matrix(data.pop(MATRIX_KEY), INPUT_FILE)
    missing = [c for c in settings.contrasts if c not in data]
    if missing:
        raise InputError(f"{INPUT_FILE} lacks the contrasts {missing} named in {JOB_FILE} (it has {sorted(data)})")
    extra = sorted(set(data) - set(settings.contrasts))
    if extra:
        raise InputError(f"{INPUT_FILE} holds arrays {extra} that {JOB_FILE} does not name")
    volumes: dict[str, Volume] = {}
    shape = None
    for name in settings.contrasts:
        arr = _check_array(data[name], f"input {name!r}")
        if shape is not None and arr.shape != shape:
            raise InputError(f"input {name!r} has shape {arr.shape} (k, j, i) but {settings.contrasts[0]!r} has "
                             f"{shape}; all inputs of a job share one grid")
        shape = arr.shape
        volumes[name] = Volume(arr, matrix)
    return volumes


def read_job(folder: str | os.PathLike) -> Job:
    """Read and validate a job folder; every problem is an :class:`InputError` naming the file."""
    settings = read_settings(folder)
    return Job(Path(folder), settings, read_inputs(folder, settings))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write_output(folder: str | os.PathLike, volume: Volume, provenance: dict | None = None,
                 uncertainty: Volume | None = None) -> Path:
    """Write ``output.npz`` (array + its own ``ijk_to_ras`` [+ uncertainty]) and ``output.json``, each atomically.

    Returns the path of ``output.npz``.
    """
    folder = Path(folder)
    if not isinstance(volume, Volume):
        raise InputError(f"the output must be a Volume, got {type(volume).__name__}")
    arr = _check_array(volume.array, "the output")
    arrays = {ARRAY_KEY: arr, MATRIX_KEY: np.asarray(volume.affine, dtype=np.float64)}
    if uncertainty is not None:
        std = _check_array(uncertainty.array, "the uncertainty map")
        if std.shape != arr.shape or not np.allclose(uncertainty.affine, volume.affine, rtol=0, atol=1e-9):
            raise InputError("the uncertainty map must lie on the output's grid")
        arrays[UNCERTAINTY_KEY] = std
    out = folder / OUTPUT_FILE
    _save_npz(out, arrays)
    meta = {"shape_kji": list(arr.shape), MATRIX_KEY: np.asarray(volume.affine).tolist(),
            "uncertainty": uncertainty is not None, "provenance": _jsonable(provenance or {})}
    write_text_atomic(folder / OUTPUT_JSON, json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return out


def _read_output_arrays(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(folder) / OUTPUT_FILE
    if not path.is_file():
        raise InputError(f"no {OUTPUT_FILE} in the job folder {folder}")
    with np.load(path, allow_pickle=False) as npz:
        if ARRAY_KEY not in npz.files or MATRIX_KEY not in npz.files:
            raise InputError(f"{path} must hold '{ARRAY_KEY}' and '{MATRIX_KEY}'")
        arrays = {ARRAY_KEY: _check_array(npz[ARRAY_KEY], OUTPUT_FILE),
                  MATRIX_KEY: _check_matrix(npz[MATRIX_KEY], OUTPUT_FILE)}
        if UNCERTAINTY_KEY in npz.files:
            arrays[UNCERTAINTY_KEY] = _check_array(npz[UNCERTAINTY_KEY], f"{OUTPUT_FILE} uncertainty")
    return arrays


def read_output(folder: str | os.PathLike) -> tuple[Volume, dict]:
    """The output volume and the provenance written by :func:`write_output`."""
    folder = Path(folder)
    arrays = _read_output_arrays(folder)
    provenance: dict = {}
    meta_path = folder / OUTPUT_JSON
    if meta_path.is_file():
        provenance = json.loads(meta_path.read_text(encoding="utf-8")).get("provenance", {})
    return Volume(arrays[ARRAY_KEY], arrays[MATRIX_KEY]), provenance


def read_uncertainty(folder: str | os.PathLike) -> Volume | None:
    """The standard deviation of the samples on the output's grid, or None for a one-sample run."""
    arrays = _read_output_arrays(folder)
    if UNCERTAINTY_KEY not in arrays:
        return None
    if arrays[UNCERTAINTY_KEY].shape != arrays[ARRAY_KEY].shape:
        raise InputError(f"{OUTPUT_FILE}: the uncertainty map's shape differs from the output's")
    return Volume(arrays[UNCERTAINTY_KEY], arrays[MATRIX_KEY])


@dataclass
class SegmentationOutput:
    """What a segmentation job wrote: the label map on the input grid, optional region probabilities, provenance."""

    labels: Volume
    probabilities: dict[str, Volume]
    provenance: dict

    @property
    def label_convention(self) -> str | None:
        value = self.provenance.get("label_convention")
        return str(value) if value else None


def _check_labels(labels: Any, where: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise InputError(f"{where} must be a non-empty 3D (k, j, i) array, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{where} must hold integer labels, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise InputError(f"{where} must hold labels in 0..255, got {int(arr.min())}..{int(arr.max())}")
    return arr.astype(np.uint8, copy=False)


def write_segmentation(folder: str | os.PathLike, labels: Volume, probabilities: dict[str, Volume] | None = None,
                       provenance: dict | None = None) -> Path:
    """Write a segmentation job's ``output.npz`` (uint8 ``labels``, matrix [, probabilities]) and ``output.json``.

    Everything is checked before anything is written, and each file is written atomically.
    ``provenance['label_convention']``, when given, is checked against the label values.
    Returns the path of ``output.npz``.
    """
    from .labels import validate_labels

    folder = Path(folder)
    if not isinstance(labels, Volume):
        raise InputError(f"the label map must be a Volume, got {type(labels).__name__}")
    arr = _check_labels(labels.array, "the label map")
    provenance = dict(provenance or {})
    if provenance.get("label_convention"):
        validate_labels(arr, str(provenance["label_convention"]))
    arrays = {LABELS_KEY: arr, MATRIX_KEY: np.asarray(labels.affine, dtype=np.float64)}
    for region, volume in (probabilities or {}).items():
        if region not in REGIONS:
            raise InputError(f"unknown probability map {region!r}; use {', '.join(REGIONS)}")
        prob = _check_array(volume.array, f"the {region} probability map")
        if prob.shape != arr.shape or not np.allclose(volume.affine, labels.affine, rtol=0, atol=1e-9):
            raise InputError(f"the {region} probability map must lie on the label map's grid")
        arrays[PROBABILITY_PREFIX + region] = prob
    out = folder / OUTPUT_FILE
    _save_npz(out, arrays)
    meta = {"kind": SEGMENT_KIND, "shape_kji": list(arr.shape), MATRIX_KEY: np.asarray(labels.affine).tolist(),
            "probabilities": sorted(probabilities or {}), "label_convention": provenance.get("label_convention"),
            "provenance": _jsonable(provenance)}
    write_text_atomic(folder / OUTPUT_JSON, json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return out


def read_segmentation(folder: str | os.PathLike) -> SegmentationOutput:
    """The label map (uint8, (k, j, i)) with its IJK->RAS matrix, probabilities and provenance of a segmentation job."""
    folder = Path(folder)
    path = folder / OUTPUT_FILE
    if not path.is_file():
        raise InputError(f"no {OUTPUT_FILE} in the job folder {folder}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable npz file: {exc}") from exc
    if LABELS_KEY not in data or MATRIX_KEY not in data:
        raise InputError(f"{path} must hold '{LABELS_KEY}' and '{MATRIX_KEY}' (is it a segmentation job's output?)")
    labels = _check_labels(data[LABELS_KEY], f"{OUTPUT_FILE} labels")
    matrix = _check_matrix(data[MATRIX_KEY], OUTPUT_FILE)
    probabilities = {}
    for region in REGIONS:
        key = PROBABILITY_PREFIX + region
        if key in data:
            prob = _check_array(data[key], f"{OUTPUT_FILE} {region} probabilities")
            if prob.shape != labels.shape:
                raise InputError(f"{OUTPUT_FILE}: the {region} probability map's shape differs from the labels'")
            probabilities[region] = Volume(prob, matrix)
    provenance: dict = {}
    meta_path = folder / OUTPUT_JSON
    if meta_path.is_file():
        provenance = json.loads(meta_path.read_text(encoding="utf-8")).get("provenance", {})
    return SegmentationOutput(Volume(labels, matrix), probabilities, provenance)


def request_cancel(folder: str | os.PathLike) -> Path:
    """Create the cancel file the worker polls after every step."""
    path = Path(folder) / CANCEL_FILE
    path.touch()
    return path


def cancel_requested(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CANCEL_FILE).exists()
