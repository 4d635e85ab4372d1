"""Coordinate channels of the model grid (method.md section 3.2, item 2).

The networks see each voxel's global position, ``2 * idx / n - 1`` per tensor axis (range
[-1, 1 - 2/n]), as three channels in the order (W, H, D) = (x, y, z) = (i, j, k). They are
always computed on the **full** model grid and then cropped or sliced together with the
data, never recomputed on a crop or tile (pitfall 14).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from ..errors import GeometryError

#: Order of the coordinate channels, by tensor axis name.
COORDINATE_ORDER = ("W", "H", "D")


def axis_coordinates(n: int) -> np.ndarray:
    """``2 * idx / n - 1`` for ``idx = 0..n-1`` (float32), the official formula."""
    if int(n) < 1:
        raise GeometryError(f"an axis needs at least one voxel, got {n}")
    return (2.0 * np.arange(int(n), dtype=np.float64) / int(n) - 1.0).astype(np.float32)


@lru_cache(maxsize=8)
def _coordinate_volume(shape_dhw: tuple[int, int, int]) -> np.ndarray:
    d, h, w = shape_dhw
    zz, yy, xx = np.meshgrid(axis_coordinates(d), axis_coordinates(h), axis_coordinates(w), indexing="ij")
    out = np.stack([xx, yy, zz]).astype(np.float32)
    out.setflags(write=False)
    return out


def coordinate_channels(shape_dhw: Sequence[int]) -> np.ndarray:
    """The (3, D, H, W) float32 coordinate volume of a grid of shape (D, H, W).

    Channel 0 varies along W (x), channel 1 along H (y), channel 2 along D (z). The array
    is cached per shape and read-only, so many cases on one grid share a single copy.
    """
    shape = tuple(int(s) for s in shape_dhw)
    if len(shape) != 3 or min(shape) < 1:
        raise GeometryError(f"grid shape must be three positive sizes (D, H, W), got {tuple(shape_dhw)}")
    return _coordinate_volume(shape)
