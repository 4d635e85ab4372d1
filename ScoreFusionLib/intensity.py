"""Intensity normalisation to [-1, 1] with an exact inverse, and foreground masks.

The paper maps each volume linearly by its min and max. That is fragile (one hot voxel
compresses everything), so a percentile variant is offered; it stays a single affine
map per volume (no clipping unless asked), which keeps the inverse exact and commutes with
averaging degradation operators (method.md section 6.3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import InputError
from .volume import require_usable_intensities

#: Foreground threshold in normalised units: BraTS background (0) maps to exactly -1.
FOREGROUND_THRESHOLD = -0.99


@dataclass(frozen=True)
class Normalization:
    """The affine map ``v' = 2 (v - low) / (high - low) - 1`` and how it was fitted."""

    low: float
    high: float
    method: str = "minmax"
    percentiles: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)) or self.high <= self.low:
            raise InputError(
                f"normalisation range must satisfy low < high, got low={self.low}, high={self.high}"
            )

    def apply(self, array: np.ndarray, clip: bool = False) -> np.ndarray:
        """Map intensities to [-1, 1] (float32; values outside the fitted range exceed it)."""
        a = np.asarray(array, dtype=np.float64)
        out = 2.0 * (a - self.low) / (self.high - self.low) - 1.0
        if clip:
            out = np.clip(out, -1.0, 1.0)
        return out.astype(np.float32)

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Map normalised values back to the original intensity units (float64)."""
        a = np.asarray(array, dtype=np.float64)
        return (a + 1.0) / 2.0 * (self.high - self.low) + self.low

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["percentiles"] is not None:
            d["percentiles"] = list(d["percentiles"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        pct = d.get("percentiles")
        return cls(float(d["low"]), float(d["high"]), str(d.get("method", "minmax")),
                   tuple(pct) if pct is not None else None)


def fit_minmax(array: np.ndarray, name: str = "volume") -> Normalization:
    """Paper normalisation: the volume's own minimum and maximum."""
    require_usable_intensities(array, name)
    a = np.asarray(array)
    return Normalization(float(a.min()), float(a.max()), "minmax")


def fit_percentile(
    array: np.ndarray,
    low_pct: float = 0.5,
    high_pct: float = 99.5,
    mask: np.ndarray | None = None,
    name: str = "volume",
) -> Normalization:
    """Robust normalisation: the ``low_pct`` and ``high_pct`` percentiles (inside ``mask``).

    Background voxels usually sit below the low percentile and map slightly below -1.
    """
    require_usable_intensities(array, name)
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_pct}, {high_pct}")
    a = np.asarray(array)
    if mask is not None and np.shape(mask) != a.shape:
        raise InputError(f"the mask of {name} has shape {np.shape(mask)}, the volume {a.shape}")
    values = a[np.asarray(mask, dtype=bool)] if mask is not None else a.ravel()
    if values.size == 0:
        raise InputError(f"the mask of {name} selects no voxels")
    lo, hi = np.percentile(values, [low_pct, high_pct])
    if hi <= lo:
        raise InputError(
            f"{name} has no contrast between its {low_pct} and {high_pct} percentiles ({lo:g}); "
            "use min-max normalisation or a wider percentile range"
        )
    return Normalization(float(lo), float(hi), "percentile", (float(low_pct), float(high_pct)))


def fit_normalization(array: np.ndarray, method: str = "minmax", name: str = "volume") -> Normalization:
    """Dispatch by name: ``minmax`` (paper) or ``percentile`` (0.5-99.5 %)."""
    if method == "minmax":
        return fit_minmax(array, name)
    if method == "percentile":
        return fit_percentile(array, name=name)
    raise InputError(f"unknown normalisation {method!r}; use 'minmax' or 'percentile'")


def foreground_mask(normalised: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Voxels brighter than the background, on a normalised volume (method.md section 3.2)."""
    return np.asarray(normalised) > threshold


def mask_channel(normalised_reference: np.ndarray) -> np.ndarray:
    """The network's mask channel: +1 on foreground, -1 on background (float32)."""
    return foreground_mask(normalised_reference).astype(np.float32) * 2.0 - 1.0


def otsu_threshold(array: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of the intensity histogram (for unmasked clinical data)."""
    require_usable_intensities(array)
    a = np.asarray(array, dtype=np.float64).ravel()
    hist, edges = np.histogram(a, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def head_mask(array: np.ndarray) -> np.ndarray:
    """Foreground of an unmasked scan: above Otsu's threshold, holes filled, largest component."""
    from scipy import ndimage

    mask = np.asarray(array) > otsu_threshold(array)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(mask)
