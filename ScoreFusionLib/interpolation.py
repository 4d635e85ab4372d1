"""Interpolation baselines for super-resolution on the cell-centred SR grid.

These are the floor every learned method must beat (method.md section 11): nearest
neighbour, trilinear and cubic B-spline upsampling. HR voxel ``j`` samples the LR volume at
the continuous index ``(j + 0.5)/f - 0.5`` (scipy's ``grid_mode=True``), so the output lies
exactly on :func:`ScoreFusionLib.geometry.super_resolution_grid`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError
from .geometry import super_resolution_grid
from .volume import Volume, require_usable_intensities

INTERPOLATION_ORDERS = {"nearest": 0, "trilinear": 1, "bspline": 3}


def upsample_array(array_kji: np.ndarray, factors_ijk: int | Sequence[int], method: str = "trilinear") -> np.ndarray:
    """Upsample a (k, j, i) array by integer (i, j, k) factors with the named interpolation."""
    from scipy.ndimage import zoom

    if method not in INTERPOLATION_ORDERS:
        raise InputError(f"unknown interpolation {method!r}; use one of {', '.join(INTERPOLATION_ORDERS)}")
    f = tuple(int(v) for v in np.broadcast_to(np.asarray(factors_ijk), (3,)))
    arr = np.asarray(array_kji, dtype=np.float64)
    if method == "nearest":
        return np.repeat(np.repeat(np.repeat(arr, f[2], axis=0), f[1], axis=1), f[0], axis=2)
    return zoom(arr, (f[2], f[1], f[0]), order=INTERPOLATION_ORDERS[method], grid_mode=True, mode="nearest")


def upsample_volume(volume: Volume, factors_ijk: int | Sequence[int], method: str = "trilinear") -> Volume:
    """The interpolated volume on the exact SR grid of ``volume`` (float32)."""
    require_usable_intensities(volume.array, "input volume")
    shape, affine = super_resolution_grid(volume.shape_ijk, volume.affine, factors_ijk)
    out = upsample_array(volume.array, factors_ijk, method).astype(np.float32)
    return Volume(out, affine)
