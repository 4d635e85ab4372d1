"""The :class:`Volume` value: a 3D array plus its exact IJK->RAS geometry.

Axis convention (one rule for the whole library)
------------------------------------------------
* ``Volume.array`` is stored in **(k, j, i)** memory order, the order of Slicer's
  ``arrayFromVolume`` and of the networks' ``(D, H, W)`` tensors. After reorientation to
  RAS, ``D`` is inferior->superior, ``H`` posterior->anterior and ``W`` left->right.
* Everything that names an axis by a physical property (spacing, SR factors, crop
  starts, grid shapes in ``*_ijk`` arguments) uses **(i, j, k)** order, as NIfTI headers,
  Slicer and ITK report it. IJK axis ``a`` is array axis ``2 - a``.
* ``Volume.affine`` is the 4x4 float64 IJK->RAS matrix: column ``a`` of its 3x3 block is
  the RAS step for one voxel along IJK axis ``a``; its last column is the RAS position of
  the centre of voxel (0, 0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import GeometryError, InputError
from .geometry import decompose, validate_affine


@dataclass(frozen=True, eq=False)
class Volume:
    """An immutable pairing of a (k, j, i) array with its IJK->RAS matrix.

    The array itself is not copied or frozen; library functions never modify it in place.
    """

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        array = self.array
        if not hasattr(array, "ndim") or not hasattr(array, "shape"):
            raise InputError(f"volume data must be an array, got {type(array).__name__}")
        if array.ndim != 3:
            raise InputError(
                f"a volume must be 3D, got a {array.ndim}D array of shape {tuple(array.shape)}"
            )
        if min(array.shape) < 1:
            raise InputError(f"a volume must not be empty, got shape {tuple(array.shape)}")
        affine = validate_affine(self.affine)
        affine.setflags(write=False)
        object.__setattr__(self, "affine", affine)

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Voxel counts along (i, j, k)."""
        k, j, i = self.array.shape
        return (int(i), int(j), int(k))

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along (i, j, k)."""
        return decompose(self.affine)[1]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of i, j and k."""
        return decompose(self.affine)[0]

    @property
    def origin(self) -> np.ndarray:
        """RAS position (mm) of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume on the same grid holding ``array`` (which must have the same shape)."""
        if tuple(array.shape) != tuple(self.array.shape):
            raise GeometryError(
                f"new array shape {tuple(array.shape)} differs from the grid {tuple(self.array.shape)}"
            )
        return Volume(array, self.affine)

    def same_grid(self, other: Volume, atol_mm: float = 1e-3) -> bool:
        """True when ``other`` has the same shape and an affine equal within ``atol_mm``."""
        return tuple(self.array.shape) == tuple(other.array.shape) and bool(
            np.allclose(self.affine, other.affine, rtol=0.0, atol=atol_mm)
        )


def require_same_grid(volumes: dict[str, Volume], atol_mm: float = 1e-3) -> None:
    """Raise :class:`GeometryError` naming the first volume whose grid differs from the first."""
    items = list(volumes.items())
    if not items:
        return
    ref_name, ref = items[0]
    for name, vol in items[1:]:
        if tuple(vol.array.shape) != tuple(ref.array.shape):
            raise GeometryError(
                f"'{name}' has shape {vol.shape_ijk} (i, j, k) but '{ref_name}' has {ref.shape_ijk}; "
                "resample the inputs onto one grid first"
            )
        diff = float(np.max(np.abs(vol.affine - ref.affine)))
        if diff > atol_mm:
            raise GeometryError(
                f"'{name}' and '{ref_name}' have different IJK->RAS matrices (max difference "
                f"{diff:.4g} > {atol_mm} mm); resample the inputs onto one grid first"
            )


def require_finite_real(array: np.ndarray, name: str = "volume") -> np.ndarray:
    """Return ``array`` as numpy, or raise :class:`InputError` if it is empty, non-real or not finite."""
    arr = np.asarray(array)
    if arr.size == 0:
        raise InputError(f"{name} is empty")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(arr.size - finite.sum() - n_nan)
        raise InputError(f"{name} contains {n_nan} NaN and {n_inf} infinite voxels")
    return arr


def require_usable_intensities(array: np.ndarray, name: str = "volume") -> None:
    """Raise :class:`InputError` for non-finite or constant intensities.

    A constant volume has no contrast to normalise or translate; NaN/Inf would silently
    poison every later step.
    """
    arr = require_finite_real(array, name)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise InputError(f"{name} is constant (every voxel is {lo:g}); there is no image to process")
