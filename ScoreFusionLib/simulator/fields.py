"""Smooth random fields on axis-aligned grids, evaluated separably.

Deformations, bias fields and tumour outlines all need a field that varies slowly in
space. A tensor-product cubic B-spline over a few control points gives one: it is smooth
(C2), bounded by its largest coefficient (the clamped basis is a partition of unity), and
costs three small matrix products instead of a full 3D interpolation. Fields are defined
over a *physical* box in mm, so the same coefficients give the same field on a 1 mm or a
2 mm grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.interpolate import BSpline

from ..errors import GeometryError


def axis_centres(affine: np.ndarray, shape_kji: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS coordinates (mm) of the voxel centres along i, j and k of an axis-aligned grid.

    The simulator only uses grids derived from the ICBM152 matrix, which is diagonal; a
    rotated matrix is refused because the fields are evaluated one axis at a time.
    """
    a = np.asarray(affine, dtype=np.float64)
    block = a[:3, :3]
    if np.any(np.abs(block - np.diag(np.diag(block))) > 1e-9):
        raise GeometryError("the simulator needs an axis-aligned (diagonal) IJK->RAS matrix")
    nk, nj, ni = (int(n) for n in shape_kji)
    xs = a[0, 0] * np.arange(ni) + a[0, 3]
    ys = a[1, 1] * np.arange(nj) + a[1, 3]
    zs = a[2, 2] * np.arange(nk) + a[2, 3]
    return xs, ys, zs


def bspline_basis(positions: np.ndarray, lo: float, hi: float, n_ctrl: int) -> np.ndarray:
    """Dense (len(positions), n_ctrl) matrix of clamped cubic B-splines spanning [lo, hi].

    Positions outside the interval are clamped to it, so a field extends flat past its box.
    """
    if n_ctrl < 4:
        raise ValueError(f"a cubic B-spline needs at least 4 control points, got {n_ctrl}")
    if not hi > lo:
        raise ValueError(f"empty interval [{lo}, {hi}]")
    u = np.clip((np.asarray(positions, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    interior = np.linspace(0.0, 1.0, n_ctrl - 2)[1:-1]
    knots = np.concatenate([np.zeros(4), interior, np.ones(4)])
    return BSpline.design_matrix(u, knots, 3).toarray().astype(np.float32)


def evaluate(coeffs: np.ndarray, bk: np.ndarray, bj: np.ndarray, bi: np.ndarray) -> np.ndarray:
    """Tensor-product field ``sum coeffs[a, b, c] bk[:, a] bj[:, b] bi[:, c]`` as (k, j, i)."""
    c = np.asarray(coeffs, dtype=np.float32)
    tmp = np.tensordot(c, bi, axes=([2], [1]))  # (a, b, ni)
    tmp = np.tensordot(bj, tmp, axes=([1], [1]))  # (nj, a, ni)
    out = np.tensordot(bk, tmp, axes=([1], [1]))  # (nk, nj, ni)
    return np.ascontiguousarray(out, dtype=np.float32)


def field_on_grid(
    coeffs: np.ndarray,
    box_ras: np.ndarray,
    centres: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    """Evaluate control coefficients ``(nk_c, nj_c, ni_c)`` spread over ``box_ras`` (2x3, mm)
    at the voxel centres ``(xs, ys, zs)`` of a grid, returning a (k, j, i) float32 array."""
    xs, ys, zs = centres
    box = np.asarray(box_ras, dtype=np.float64)
    nk_c, nj_c, ni_c = coeffs.shape
    bi = bspline_basis(xs, box[0, 0], box[1, 0], ni_c)
    bj = bspline_basis(ys, box[0, 1], box[1, 1], nj_c)
    bk = bspline_basis(zs, box[0, 2], box[1, 2], nk_c)
    return evaluate(coeffs, bk, bj, bi)


def random_coefficients(
    rng: np.random.Generator, n_ctrl: Sequence[int], std: float | None = None, probe: int = 24
) -> np.ndarray:
    """Random (k, j, i) control coefficients for ``n_ctrl`` (i, j, k) points.

    Averaging by the spline shrinks random coefficients a lot, so they are rescaled on a
    fixed ``probe``-point lattice over the box: by default until the field peaks at
    exactly +-1 (an amplitude then means what it says), or, with ``std``, until its
    standard deviation is ``std`` (for lobulated shapes; clip the field where a bound
    matters). The lattice does not depend on any grid, so neither does the field.
    """
    ni, nj, nk = (int(n) for n in n_ctrl)
    c = rng.uniform(-1.0, 1.0, size=(nk, nj, ni))
    u = np.linspace(0.0, 1.0, probe)
    sampled = evaluate(c, bspline_basis(u, 0.0, 1.0, nk), bspline_basis(u, 0.0, 1.0, nj),
                       bspline_basis(u, 0.0, 1.0, ni))
    scale = float(np.abs(sampled).max()) if std is None else float(sampled.std()) / std
    return c / max(scale, 1e-12)
