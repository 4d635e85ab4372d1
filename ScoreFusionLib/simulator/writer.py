"""Writing simulated cases in the BraTS-2023-style layout, with a JSON sidecar.

``<out>/ScoreFusionSim-00001/ScoreFusionSim-00001-{t1n,t1c,t2w,t2f,pdw,seg}.nii.gz`` plus
``ScoreFusionSim-00001.json``. A case folder is built under a temporary name and renamed
into place, so a crash never leaves a half-written case that looks complete. Every NIfTI's
``descrip`` and the sidecar say *simulated*.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..atomic import publish_directory, write_text_atomic
from ..errors import DatasetError, InputError, ScoreFusionError
from ..volume_io import save_volume
from .case import (
    MAX_CASE_INDEX,
    SimulatedCase,
    case_id,
    simulate_case,
    validate_case_index,
    validate_convention,
    validate_seed,
    validate_t1_source,
)
from .tissue import validate_spacing

NIFTI_SUFFIX = ".nii.gz"


def case_files(case: SimulatedCase) -> dict[str, str]:
    """File name per written item (contrasts, then ``seg`` when there is a label map)."""
    names = {contrast: f"{case.case_id}-{contrast}{NIFTI_SUFFIX}" for contrast in case.images}
    if case.labels is not None:
        names["seg"] = f"{case.case_id}-seg{NIFTI_SUFFIX}"
    return names


def sidecar(case: SimulatedCase) -> dict[str, object]:
    """The JSON sidecar: every sampled parameter, the files and the *simulated* marker."""
    out = dict(case.params)
    out["description"] = case.description
    out["files"] = case_files(case)
    out["layout"] = "BraTS-2023 style names; ScoreFusionSim ids are simulated, never BraTS data"
    return out


def _write_into(case: SimulatedCase, folder: Path) -> None:
    files = case_files(case)
    volumes = dict(case.images)
    if case.labels is not None:
        volumes["seg"] = case.labels
    # gzip dominates the time of a 1 mm case and zlib releases the GIL: one thread per file.
    workers = max(1, min(len(volumes), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(save_volume, volume, folder / files[name], case.description)
            for name, volume in volumes.items()
        ]
        for future in futures:
            future.result()
    text = json.dumps(sidecar(case), indent=2, allow_nan=False) + "\n"
    write_text_atomic(folder / f"{case.case_id}.json", text)


def _publish(final: Path, build: Callable[[Path], None], overwrite: bool) -> None:
    try:
        publish_directory(final, build, overwrite)
    except (FileExistsError, NotADirectoryError) as exc:
        raise DatasetError(f"{exc}; pass --overwrite (overwrite=True) to replace it") from exc


def write_case(case: SimulatedCase, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write one case to ``out_dir/<case_id>/`` and return that folder."""
    final = Path(out_dir) / case.case_id
    _publish(final, lambda tmp: _write_into(case, tmp), overwrite)
    return final


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"output path {out} exists and is not a folder")


def write_cohort(
    out_dir: str | os.PathLike,
    n_cases: int,
    seed: int,
    *,
    spacing: float = 1.0,
    tumor: bool = False,
    convention: str = "brats2023",
    deform: bool = True,
    noise: bool = True,
    mass_effect: bool = True,
    t1_source: str = "simulated",
    overwrite: bool = False,
    first_index: int = 1,
    progress: bool = False,
) -> list[Path]:
    """Simulate and write cases ``first_index .. first_index + n_cases - 1``; return their folders.

    All arguments are checked, and existing case folders refused (unless ``overwrite``),
    before anything is simulated, so a bad call writes nothing. Case ``k`` depends only
    on ``(seed, k)`` and the options, so cohorts can be extended or rebuilt piecewise.
    """
    if isinstance(n_cases, bool) or not isinstance(n_cases, int) or n_cases < 1:
        raise InputError(f"the number of cases must be a positive integer, got {n_cases!r}")
    seed = validate_seed(seed)
    spacing = validate_spacing(spacing)
    convention = validate_convention(convention)
    t1_source = validate_t1_source(t1_source, tumor)
    first_index = validate_case_index(first_index)
    last = first_index + n_cases - 1
    if last > MAX_CASE_INDEX:
        raise InputError(f"case ids stop at {MAX_CASE_INDEX}; {n_cases} cases from {first_index} do not fit")
    out = Path(out_dir)
    _check_out_dir(out)
    indices = range(first_index, last + 1)
    if not overwrite:
        existing = [case_id(k) for k in indices if (out / case_id(k)).exists()]
        if existing:
            shown = ", ".join(existing[:3]) + (" ..." if len(existing) > 3 else "")
            raise DatasetError(
                f"{len(existing)} case folder(s) already exist in {out} ({shown}); "
                "pass --overwrite (overwrite=True) to replace them or choose another --out"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create the output folder {out}: {exc}") from exc

    from tqdm import tqdm

    written = []
    bar = tqdm(indices, desc="simulating", unit="case", file=sys.stderr, disable=not progress)
    for k in bar:
        case = simulate_case(
            seed,
            k,
            spacing=spacing,
            tumor=tumor,
            convention=convention,
            deform=deform,
            noise=noise,
            mass_effect=mass_effect,
            t1_source=t1_source,
        )
        try:
            written.append(write_case(case, out, overwrite=overwrite))
        except ScoreFusionError:
            raise
        except OSError as exc:
            raise DatasetError(f"cannot write {case.case_id} into {out}: {exc}") from exc
    return written
