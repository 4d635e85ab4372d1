"""Pure IJK->RAS matrix arithmetic (numpy, float64): no arrays of voxels here.

All per-axis arguments are in (i, j, k) order. Grids are **cell-centred**: a voxel is a
box and the matrix maps its integer index to the box centre, so resampling by an integer
factor keeps the outer box of the volume exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from .errors import GeometryError

#: Multiply an LPS matrix (ITK, DICOM, most NRRD) by this to get RAS (NIfTI, Slicer), and back.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))


def validate_affine(affine: np.ndarray) -> np.ndarray:
    """Return ``affine`` as a fresh float64 4x4 array, or raise :class:`GeometryError`."""
    try:
        if np.iscomplexobj(affine):  # np.array(..., float64) would silently drop the imaginary part
            raise TypeError("complex values")
        m = np.array(affine, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"affine is not numeric: {exc}") from exc
    if m.shape != (4, 4):
        raise GeometryError(f"an IJK->RAS matrix must be 4x4, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise GeometryError("the IJK->RAS matrix contains NaN or infinite values")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise GeometryError(f"the last row of an IJK->RAS matrix must be [0 0 0 1], got {m[3]}")
    block = m[:3, :3]
    norms = np.linalg.norm(block, axis=0)
    if np.any(norms < 1e-9) or abs(np.linalg.det(block)) < 1e-12 * max(float(np.prod(norms)), 1e-300):
        raise GeometryError(
            "the IJK->RAS matrix is not invertible (a zero voxel size or collinear axes)"
        )
    m[3] = (0.0, 0.0, 0.0, 1.0)
    return m


def decompose(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a matrix into (direction 3x3 with unit columns, spacing (i,j,k), origin)."""
    m = validate_affine(affine)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    return m[:3, :3] / spacing, spacing, m[:3, 3].copy()


def compose(direction: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """Build an IJK->RAS matrix from unit direction columns, spacing and origin."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    m[:3, 3] = np.asarray(origin, dtype=np.float64)
    return validate_affine(m)


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Convert an IJK->LPS matrix to IJK->RAS (the operation is its own inverse)."""
    return LPS_TO_RAS @ validate_affine(affine)


ras_to_lps = lps_to_ras


def _as_factors(factors: Sequence[float] | float) -> np.ndarray:
    f = np.broadcast_to(np.asarray(factors, dtype=np.float64), (3,)).copy()
    if not np.isfinite(f).all() or np.any(f <= 0):
        raise GeometryError(f"scale factors must be positive, got {tuple(f.tolist())}")
    return f


def super_resolution_affine(affine: np.ndarray, factors: Sequence[float] | float) -> np.ndarray:
    """IJK->RAS of the grid that splits every voxel into ``factors`` (i, j, k) sub-voxels.

    ``M_out = M_in @ [[diag(1/f), (1/f - 1)/2], [0, 1]]``: HR index ``j`` sits at the
    continuous LR index ``(j + 0.5)/f - 0.5``, so both grids cover the same physical box.
    """
    f = _as_factors(factors)
    step = np.eye(4)
    step[:3, :3] = np.diag(1.0 / f)
    step[:3, 3] = (1.0 / f - 1.0) / 2.0
    return validate_affine(affine) @ step


def low_resolution_affine(affine: np.ndarray, factors: Sequence[float] | float) -> np.ndarray:
    """Inverse of :func:`super_resolution_affine`: the grid of ``factors``-times larger voxels."""
    f = _as_factors(factors)
    step = np.eye(4)
    step[:3, :3] = np.diag(f)
    step[:3, 3] = (f - 1.0) / 2.0
    return validate_affine(affine) @ step


def super_resolution_grid(
    shape_ijk: Sequence[int], affine: np.ndarray, factors: Sequence[int] | int
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape (i, j, k) and IJK->RAS of the SR grid for integer per-axis ``factors``."""
    f = np.broadcast_to(np.asarray(factors), (3,))
    if not all(float(x).is_integer() and x >= 1 for x in f):
        raise GeometryError(f"super-resolution factors must be integers >= 1, got {tuple(f.tolist())}")
    fi = tuple(int(x) for x in f)
    shape = tuple(int(n) * k for n, k in zip(shape_ijk, fi))
    return shape, super_resolution_affine(affine, fi)


def factors_for_spacing(
    affine: np.ndarray, target_spacing: Sequence[float], rtol: float = 1e-3
) -> tuple[int, int, int]:
    """Integer (i, j, k) factors that turn the grid's spacing into ``target_spacing``.

    Raises :class:`GeometryError` when a ratio is not (close to) a whole number, naming the
    nearest spacing that is reachable.
    """
    _, spacing, _ = decompose(affine)
    target = np.asarray(target_spacing, dtype=np.float64)
    if target.shape != (3,) or not np.isfinite(target).all() or np.any(target <= 0):
        raise GeometryError(f"target spacing must be three positive numbers, got {target_spacing}")
    ratio = spacing / target
    rounded = np.maximum(np.round(ratio), 1.0)
    if np.any(np.abs(ratio - rounded) > rtol * rounded) or np.any(ratio < 1.0 - rtol):
        nearest = spacing / rounded
        raise GeometryError(
            f"target spacing {tuple(target.tolist())} mm is not the input spacing "
            f"{tuple(np.round(spacing, 6).tolist())} divided by whole numbers; "
            f"the nearest reachable spacing is {tuple(np.round(nearest, 6).tolist())}"
        )
    return tuple(int(x) for x in rounded)


def shift_affine(affine: np.ndarray, start_ijk: Sequence[float]) -> np.ndarray:
    """IJK->RAS of a sub-grid whose voxel (0,0,0) is voxel ``start_ijk`` of this grid.

    Negative starts describe padding.
    """
    m = validate_affine(affine)
    out = m.copy()
    out[:3, 3] = m[:3, :3] @ np.asarray(start_ijk, dtype=np.float64) + m[:3, 3]
    return out


def permute_flip_affine(
    affine: np.ndarray, shape_ijk: Sequence[int], perm: Sequence[int], flips: Sequence[bool]
) -> np.ndarray:
    """IJK->RAS after reordering IJK axes by ``perm`` and then reversing the ``flips`` axes.

    New axis ``a`` is old axis ``perm[a]``; if ``flips[a]``, new index ``x`` is old index
    ``n - 1 - x``. Matches :func:`ScoreFusionLib.grid.permute_flip_array`.
    """
    m = validate_affine(affine)
    if sorted(perm) != [0, 1, 2]:
        raise GeometryError(f"perm must be a permutation of (0, 1, 2), got {tuple(perm)}")
    step = np.zeros((4, 4))
    step[3, 3] = 1.0
    for new_axis, old_axis in enumerate(perm):
        if flips[new_axis]:
            step[old_axis, new_axis] = -1.0
            step[old_axis, 3] = float(shape_ijk[old_axis] - 1)
        else:
            step[old_axis, new_axis] = 1.0
    return m @ step


def nearest_ras_axes(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For each IJK axis, the RAS axis (0=R, 1=A, 2=S) it is closest to, and whether it points
    the negative way. Always a permutation, even for 45-degree obliques."""
    direction, _, _ = decompose(affine)
    best = max(
        itertools.permutations(range(3)),
        key=lambda p: sum(abs(direction[p[a], a]) for a in range(3)),
    )
    negative = tuple(bool(direction[best[a], a] < 0) for a in range(3))
    return tuple(best), negative


def orientation_codes(affine: np.ndarray) -> str:
    """Three-letter axis codes such as ``"RAS"`` or ``"LPS"`` (nibabel's ``aff2axcodes``)."""
    axes, negative = nearest_ras_axes(affine)
    return "".join(_AXIS_LETTERS[ras][0 if neg else 1] for ras, neg in zip(axes, negative))


def obliquity_degrees(affine: np.ndarray) -> float:
    """Largest angle (degrees) between an IJK axis and the RAS axis nearest to it."""
    direction, _, _ = decompose(affine)
    axes, _ = nearest_ras_axes(affine)
    cosines = [abs(direction[axes[a], a]) for a in range(3)]
    return float(np.degrees(np.arccos(np.clip(min(cosines), -1.0, 1.0))))


def ras_reorientation(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """``(perm, flips)`` that make the IJK axes point (as nearly as possible) R, A and S."""
    axes, negative = nearest_ras_axes(affine)
    perm = tuple(axes.index(ras) for ras in range(3))
    flips = tuple(negative[perm[a]] for a in range(3))
    return perm, flips


def voxel_to_ras(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """RAS positions (N, 3) of continuous IJK indices (N, 3)."""
    m = validate_affine(affine)
    pts = np.asarray(ijk, dtype=np.float64)
    return pts @ m[:3, :3].T + m[:3, 3]
