"""BraTS tumour label conventions.

Compartments are kept by name inside the library and converted to integer labels only at
file boundaries, because label 4 means *enhancing tumour* in BraTS 2017-2021 but *resection
cavity* in BraTS 2024. The convention is chosen from the dataset's naming scheme, never
guessed from the values.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import InputError

#: Compartment names used internally (0 is always background).
COMPARTMENTS = ("necrotic", "edema", "enhancing", "resection_cavity")

#: Integer label of each compartment, per convention.
CONVENTIONS: dict[str, dict[str, int]] = {
    # BraTS 2017-2021 (BraTS2021_* names): 1 NCR, 2 ED, 4 ET; 3 unused.
    "brats2021": {"necrotic": 1, "edema": 2, "enhancing": 4},
    # BraTS 2023+ (BraTS-GLI-* names, and ScoreFusionSim-*): 1 NETC, 2 SNFH, 3 ET, 4 RC.
    "brats2023": {"necrotic": 1, "edema": 2, "enhancing": 3, "resection_cavity": 4},
}

#: Evaluation regions as sets of compartments.
REGIONS: dict[str, tuple[str, ...]] = {
    "WT": ("necrotic", "edema", "enhancing"),
    "TC": ("necrotic", "enhancing"),
    "ET": ("enhancing",),
}


def _convention(name: str) -> dict[str, int]:
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise InputError(f"unknown label convention {name!r}; use one of {sorted(CONVENTIONS)}") from None


def validate_labels(labels: np.ndarray, convention: str) -> None:
    """Raise :class:`InputError` if ``labels`` holds values the convention does not define."""
    allowed = {0, *(_convention(convention).values())}
    # Compare exact values: int() would truncate e.g. 4.5 to an allowed 4.
    unexpected = sorted(v for v in np.unique(np.asarray(labels)).tolist() if v not in allowed)
    if unexpected:
        raise InputError(
            f"label values {unexpected} are not part of the {convention} convention "
            f"(allowed: {sorted(allowed)})"
        )


def region_mask(labels: np.ndarray, region: str, convention: str) -> np.ndarray:
    """Boolean mask of an evaluation region (``WT``, ``TC`` or ``ET``)."""
    if region not in REGIONS:
        raise InputError(f"unknown region {region!r}; use one of {sorted(REGIONS)}")
    values = [_convention(convention)[c] for c in REGIONS[region]]
    return np.isin(labels, values)


def convert_labels(labels: np.ndarray, source: str, target: str) -> np.ndarray:
    """Re-code a label map from one convention to another (same compartments)."""
    validate_labels(labels, source)
    src, dst = _convention(source), _convention(target)
    out = np.zeros_like(labels)
    for compartment, value in src.items():
        if compartment not in dst:
            if np.any(labels == value):
                raise InputError(f"compartment {compartment!r} has no label in the {target} convention")
            continue
        out[labels == value] = dst[compartment]
    return out


def labels_from_compartments(masks: Mapping[str, np.ndarray], convention: str) -> np.ndarray:
    """Build an integer label map from boolean masks per compartment (later names win)."""
    table = _convention(convention)
    shape = next(iter(masks.values())).shape
    out = np.zeros(shape, dtype=np.uint8)
    for compartment, mask in masks.items():
        if compartment not in table:
            raise InputError(f"compartment {compartment!r} has no label in the {convention} convention")
        out[np.asarray(mask, dtype=bool)] = table[compartment]
    return out
