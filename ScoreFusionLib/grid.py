"""Volume-level grid operations that keep the geometry exact: reorientation, crop and pad.

Nothing here resamples: voxels are moved, never interpolated, and every change of the
array is composed into the IJK->RAS matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import GeometryError
from .geometry import obliquity_degrees, permute_flip_affine, ras_reorientation, shift_affine
from .volume import Volume


def permute_flip_array(array_kji: np.ndarray, perm: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    """Reorder a (k, j, i) array's IJK axes by ``perm`` and reverse the ``flips`` axes.

    Same convention as :func:`ScoreFusionLib.geometry.permute_flip_affine`; returns a copy.
    """
    ijk = np.transpose(array_kji, (2, 1, 0))
    ijk = np.transpose(ijk, tuple(perm))
    for axis, flip in enumerate(flips):
        if flip:
            ijk = np.flip(ijk, axis=axis)
    return np.ascontiguousarray(np.transpose(ijk, (2, 1, 0)))


@dataclass(frozen=True)
class Reorientation:
    """How a volume was brought to RAS-aligned axes, so the change can be undone exactly."""

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    original_shape_ijk: tuple[int, int, int]
    original_affine: np.ndarray
    obliquity_deg: float

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flips)

    def undo(self, volume: Volume) -> Volume:
        """Map a volume on the reoriented grid back to the original axis order.

        Works for any grid obtained from the reoriented one by per-axis scaling (e.g. an SR
        output): the inverse permutation and flips are applied to the array and the matrix.
        """
        inv_perm = tuple(int(np.argsort(self.perm)[a]) for a in range(3))
        # New axis a of the undo is reoriented axis inv_perm[a] = perm^-1(a); it was flipped
        # if the original axis a was flipped on the way in.
        inv_flips = tuple(self.flips[inv_perm[a]] for a in range(3))
        array = permute_flip_array(volume.array, inv_perm, inv_flips)
        affine = permute_flip_affine(volume.affine, volume.shape_ijk, inv_perm, inv_flips)
        # Back on the original grid (not e.g. an SR output): return the original matrix bitwise.
        # Flipping forth and back moves the origin by +x then -x, which can differ in the last bit.
        if tuple(array.shape[::-1]) == tuple(self.original_shape_ijk) and np.allclose(
            affine, self.original_affine, rtol=0.0, atol=1e-6
        ):
            affine = self.original_affine
        return Volume(array, affine)


def reorient_to_ras(volume: Volume) -> tuple[Volume, Reorientation]:
    """Permute and flip axes (no resampling) so that i, j, k point nearest to R, A, S.

    Returns the reoriented volume and the record needed to undo it. The obliquity (degrees)
    is recorded so callers can warn when the anatomy is far from axis-aligned.
    """
    perm, flips = ras_reorientation(volume.affine)
    record = Reorientation(
        perm=perm,
        flips=flips,
        original_shape_ijk=volume.shape_ijk,
        original_affine=volume.affine.copy(),
        obliquity_deg=obliquity_degrees(volume.affine),
    )
    array = permute_flip_array(volume.array, perm, flips)
    affine = permute_flip_affine(volume.affine, volume.shape_ijk, perm, flips)
    return Volume(array, affine), record


def crop_or_pad(
    volume: Volume,
    shape_ijk: Sequence[int],
    start_ijk: Sequence[int] | None = None,
    fill: float | None = None,
) -> Volume:
    """Cut or extend the grid to ``shape_ijk`` voxels starting at voxel ``start_ijk``.

    ``start_ijk`` defaults to the centred placement ``(n - target) // 2`` (BraTS:
    240x240x155 -> 192x192x152 starts at (24, 24, 1)); negative starts pad. Padding uses
    ``fill`` (default: the volume's minimum, i.e. background). The matrix is shifted so every
    kept voxel stays at its RAS position.
    """
    target = tuple(int(n) for n in shape_ijk)
    if len(target) != 3 or min(target) < 1:
        raise GeometryError(f"target shape must be three positive sizes, got {tuple(shape_ijk)}")
    current = volume.shape_ijk
    if start_ijk is None:
        start = tuple((c - t) // 2 for c, t in zip(current, target))
    else:
        start = tuple(int(s) for s in start_ijk)
    if fill is None:
        fill = float(np.min(volume.array))
    out = np.full(target[::-1], fill, dtype=volume.array.dtype)
    src, dst = [], []
    for c, t, s in zip(current, target, start):
        lo, hi = max(s, 0), min(s + t, c)
        if hi <= lo:
            raise GeometryError(f"crop window start {start} shape {target} misses the volume {current}")
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[dst[2], dst[1], dst[0]] = volume.array[src[2], src[1], src[0]]
    return Volume(out, shift_affine(volume.affine, start))
