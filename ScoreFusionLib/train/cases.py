"""Loading the training and validation cases of a plane-training run.

The split is the paper's (method.md section 7.1): cases sorted by id, the first
``int((1 - val_fraction) n)`` train, the rest are held out for validation. Every case is
loaded onto one model grid and prepared by :func:`~ScoreFusionLib.data.prepare_case`
before anything is written, so a missing contrast or an unusable grid fails early with the
offending case named.

With a cache folder, prepared cases are stored once as ``.npy`` files and memory-mapped (a
BraTS case takes about 90 MB prepared, so a full training set does not fit in memory). The
cache key covers the task, the grid and each input file's path, size and modification
time, so changed data or options never reuse stale arrays.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.cache import load_prepared, save_prepared
from ..data.loading import load_case
from ..data.records import CaseRecord
from ..data.sources import load_cases
from ..data.split import split_cases
from ..data.task import PreparedCase, TaskSpec, prepare_case
from ..errors import DatasetError, GeometryError
from .options import PlaneTrainingOptions


@dataclass
class TrainingData:
    """Prepared cases of a run and the model grid they share."""

    source: str
    train: list[PreparedCase]
    val: list[PreparedCase]
    grid_ijk: tuple[int, int, int]
    spacing: list[float]
    simulated: bool

    @property
    def train_ids(self) -> list[str]:
        return [c.case_id for c in self.train]

    @property
    def val_ids(self) -> list[str]:
        return [c.case_id for c in self.val]


def _check_contrasts(records: list[CaseRecord], spec: TaskSpec) -> None:
    for rec in records:
        lacking = [c for c in spec.contrasts if c not in rec.paths]
        if lacking:
            have = ", ".join(rec.contrasts) or "none"
            raise DatasetError(
                f"case {rec.case_id} has no {', '.join(repr(c) for c in lacking)} image needed by the "
                f"{spec.kind} task (target {spec.target}, inputs {', '.join(spec.inputs)}); it has: {have}"
            )


#: Array orientation the plane models are trained in (and ``translate`` reorients inputs to).
TRAINING_ORIENTATION = "RAS"


def _cache_folder(cache: Path, rec: CaseRecord, spec: TaskSpec, grid: object) -> Path:
    files = []
    for c in spec.contrasts:
        p = Path(rec.paths[c]).resolve()
        st = p.stat()
        files.append([c, str(p), st.st_size, st.st_mtime_ns])
    key = json.dumps({"task": spec.to_dict(), "grid": grid, "orientation": TRAINING_ORIENTATION, "files": files},
                     sort_keys=True)
    return cache / hashlib.sha256(key.encode("utf-8")).hexdigest()[:20] / rec.case_id


def _prepare(rec: CaseRecord, grid_ijk: Sequence[int] | None, spec: TaskSpec, cache: Path | None,
             check: Callable[[tuple[int, int, int], str], None]) -> PreparedCase:
    """One prepared case (from the cache when present); ``check(shape_ijk, case_id)`` vets its grid."""
    folder = _cache_folder(cache, rec, spec, grid_ijk and list(grid_ijk)) if cache else None
    if folder is not None and (folder / "case.json").is_file():
        case = load_prepared(folder, mmap=True)
        check(tuple(int(n) for n in case.shape[::-1]), rec.case_id)
        return case
    # Inference reorients every input to RAS-aligned axes, so training must see the same
    # orientation (BraTS files are stored LPS: unreoriented slices would be mirrored).
    loaded = load_case(rec, spec.contrasts, grid_shape_ijk=grid_ijk, reorient=True)
    check(tuple(int(n) for n in next(iter(loaded.volumes.values())).shape_ijk), rec.case_id)
    case = prepare_case(loaded, spec)
    if folder is None:
        return case
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_prepared(case, folder)
    except OSError:  # another process (DDP rank) cached it first
        if not (folder / "case.json").is_file():
            raise
    return load_prepared(folder, mmap=True)


def load_training_data(options: PlaneTrainingOptions, spec: TaskSpec) -> TrainingData:
    """Discover, split, load and prepare the cases named by ``options.data`` for plane training."""
    return load_task_cases(options.data, spec, val_fraction=float(options.val_fraction), grid_ijk=options.grid,
                           cache=options.cache, check_grid=options.check_grid)


def load_task_cases(data: str | Path, spec: TaskSpec, *, val_fraction: float, grid_ijk: Sequence[int] | None,
                    cache: str | Path | None, check_grid: Callable[[tuple[int, int, int], str], None]) -> TrainingData:
    """Split (paper rule) and prepare the cases of ``data`` on one model grid.

    ``check_grid(grid_ijk, what)`` vets the first case's grid (the networks' divisibility);
    every later case must have the same grid.
    """
    source = str(Path(data).expanduser().resolve())
    records = load_cases(data)
    split = split_cases(records, mode="paper", train_fraction=1.0 - float(val_fraction))
    _check_contrasts(split.train + split.test, spec)
    grid: tuple[int, int, int] | None = None
    first = ""

    def check(shape: tuple[int, int, int], case_id: str) -> None:
        nonlocal grid, first
        if grid is None:
            grid, first = shape, case_id
            what = "--grid" if grid_ijk is not None else f"the native grid of case {case_id}"
            check_grid(grid, what)
        elif shape != grid:
            raise GeometryError(
                f"case {case_id} has the native grid {shape[0]}x{shape[1]}x{shape[2]} (i, j, k) but case "
                f"{first} has {grid[0]}x{grid[1]}x{grid[2]}; with --grid native all cases must share one grid "
                "(use --grid I J K to crop/pad them to a common one)"
            )

    cache_dir = Path(cache).expanduser().resolve() if cache else None
    prepared = {rec.case_id: _prepare(rec, grid_ijk, spec, cache_dir, check) for rec in split.train + split.test}
    assert grid is not None
    ref = prepared[split.train[0].case_id]
    spacing = [float(s) for s in np.linalg.norm(np.asarray(ref.affine)[:3, :3], axis=0)]
    return TrainingData(
        source=source,
        train=[prepared[r.case_id] for r in split.train],
        val=[prepared[r.case_id] for r in split.test],
        grid_ijk=grid,
        spacing=spacing,
        simulated=any(r.simulated for r in records),
    )
