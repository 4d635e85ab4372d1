"""On-disk cache of prepared cases, memory-mapped on load.

A BraTS case on the 192x192x152 grid takes about 90 MB as prepared float32 arrays, so a
training set does not fit in memory; preparing it once and memory-mapping the ``.npy``
files lets the slice and crop datasets read only the voxels each item needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_directory
from ..errors import DatasetError
from ..grid import Reorientation
from ..intensity import Normalization
from .task import PreparedCase, TaskSpec

CACHE_FORMAT = 1
_ARRAYS = ("conditions", "target", "mask", "r0", "measurement", "seg")


def _maybe(value: Any, fn: Callable[[Any], Any]) -> Any:
    return None if value is None else fn(value)


def _reorientation_to_dict(r: Reorientation | None) -> dict | None:
    if r is None:
        return None
    return {
        "perm": list(r.perm),
        "flips": list(r.flips),
        "original_shape_ijk": list(r.original_shape_ijk),
        "original_affine": np.asarray(r.original_affine).tolist(),
        "obliquity_deg": float(r.obliquity_deg),
    }


def _reorientation_from_dict(d: dict | None) -> Reorientation | None:
    if d is None:
        return None
    return Reorientation(
        perm=tuple(int(v) for v in d["perm"]),
        flips=tuple(bool(v) for v in d["flips"]),
        original_shape_ijk=tuple(int(v) for v in d["original_shape_ijk"]),
        original_affine=np.asarray(d["original_affine"], dtype=np.float64),
        obliquity_deg=float(d["obliquity_deg"]),
    )


def save_prepared(case: PreparedCase, folder: str | os.PathLike) -> Path:
    """Write ``case`` into the new folder ``folder`` (atomically; it must not exist)."""
    folder = Path(folder)
    meta = {
        "format": CACHE_FORMAT,
        "case_id": case.case_id,
        "spec": case.spec.to_dict(),
        "normalizations": {c: n.to_dict() for c, n in case.normalizations.items()},
        "affine": np.asarray(case.affine, dtype=np.float64).tolist(),
        "label_convention": case.label_convention,
        "simulated": bool(case.simulated),
        "original_affine": _maybe(case.original_affine, lambda a: np.asarray(a).tolist()),
        "original_shape_ijk": _maybe(case.original_shape_ijk, list),
        "reorientation": _reorientation_to_dict(case.reorientation),
        "arrays": [],
    }
    with atomic_directory(folder) as tmp:
        for name in _ARRAYS:
            arr = getattr(case, name)
            if arr is not None:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
                meta["arrays"].append(name)
        (tmp / "case.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return folder


def load_prepared(folder: str | os.PathLike, mmap: bool = True) -> PreparedCase:
    """Read a case written by :func:`save_prepared`; arrays are read-only memory maps if ``mmap``."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "case.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{folder} is not a prepared-case cache ({exc})") from exc
    if meta.get("format") != CACHE_FORMAT:
        raise DatasetError(f"{folder}: unsupported cache format {meta.get('format')!r}")
    arrays = {}
    for name in meta["arrays"]:
        try:
            arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{folder}: cannot read {name}.npy ({exc})") from exc
    return PreparedCase(
        case_id=meta["case_id"],
        spec=TaskSpec.from_dict(meta["spec"]),
        conditions=arrays["conditions"],
        target=arrays["target"],
        mask=arrays["mask"],
        r0=arrays["r0"],
        normalizations={c: Normalization.from_dict(d) for c, d in meta["normalizations"].items()},
        affine=np.asarray(meta["affine"], dtype=np.float64),
        measurement=arrays.get("measurement"),
        seg=arrays.get("seg"),
        label_convention=meta.get("label_convention"),
        simulated=bool(meta.get("simulated", False)),
        reorientation=_reorientation_from_dict(meta.get("reorientation")),
        original_affine=_maybe(meta.get("original_affine"), lambda a: np.asarray(a, dtype=np.float64)),
        original_shape_ijk=_maybe(meta.get("original_shape_ijk"), lambda s: tuple(int(v) for v in s)),
    )
