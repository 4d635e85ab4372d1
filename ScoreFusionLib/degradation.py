"""Linear degradation operators ``y = A x`` and their data-consistency projections.

Both supported acquisitions are *separable*: ``A`` acts independently along each IJK axis
with a small matrix ``A_a`` (``n_lr x n_hr``), so ``A = A_k (x) A_j (x) A_i``. Then

* the condition the networks see on the high-resolution grid is ``U(y)`` with the right
  inverse ``U = A+`` (nearest repeat for average pooling, since ``pinv(avgpool) = repeat``);
* the pseudo-inverse of a Kronecker product is the product of the per-axis ones, so the
  projection onto ``{x : A x = y}`` is ``x - U(A x - y)`` applied axis by axis;
* every row of ``A_a`` sums to one, so an affine intensity map commutes with ``A`` and the
  projection stays valid after per-volume normalisation (method.md section 6.3).

Operators accept numpy arrays or torch tensors whose **last three axes are (k, j, i)** and
never modify their input. Per-axis parameters are given in (i, j, k) order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import GeometryError, InputError
from .geometry import low_resolution_affine, shift_affine, super_resolution_affine
from .volume import Volume

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _apply_along(x: Any, matrix: np.ndarray, ijk_axis: int) -> Any:
    """Multiply ``matrix`` (m x n) into the array axis holding IJK axis ``ijk_axis``."""
    axis = x.ndim - 1 - ijk_axis
    if _is_torch(x):
        import torch

        m = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)
        return torch.tensordot(m, x, dims=([1], [axis])).movedim(0, axis)
    m = matrix.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64, copy=False)
    return np.moveaxis(np.tensordot(m, x, axes=([1], [axis])), 0, axis)


class SeparableDegradation:
    """Base class: per-axis matrices ``A_a`` and right inverses ``U_a`` (identity where absent)."""

    kind = "separable"

    def __init__(self, factors: Sequence[int]) -> None:
        f = tuple(int(v) for v in factors)
        if len(f) != 3 or min(f) < 1 or tuple(factors) != f:
            raise InputError(f"degradation factors must be three integers >= 1, got {tuple(factors)}")
        self.factors: tuple[int, int, int] = f
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    # -- per-axis matrices -------------------------------------------------------------
    def _axis_forward(self, ijk_axis: int, n_hr: int) -> np.ndarray:
        raise NotImplementedError

    def _axis_inverse(self, ijk_axis: int, forward: np.ndarray) -> np.ndarray:
        return np.linalg.pinv(forward)

    def matrices(self, ijk_axis: int, n_hr: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(A_a, U_a)`` in float64 for an axis of ``n_hr`` voxels, or None if untouched."""
        if self.factors[ijk_axis] == 1 and not self._acts_on(ijk_axis):
            return None
        key = (ijk_axis, n_hr)
        if key not in self._cache:
            if n_hr % self.factors[ijk_axis]:
                raise GeometryError(
                    f"axis {'ijk'[ijk_axis]} has {n_hr} voxels, not a multiple of the factor "
                    f"{self.factors[ijk_axis]}; pad the volume first"
                )
            forward = self._axis_forward(ijk_axis, n_hr)
            inverse = self._axis_inverse(ijk_axis, forward)
            if not np.allclose(forward @ inverse, np.eye(forward.shape[0]), atol=1e-8):
                raise GeometryError(
                    f"the {self.kind} operator along axis {'ijk'[ijk_axis]} is rank deficient; "
                    "no exact data-consistency projection exists"
                )
            self._cache[key] = (forward, inverse)
        return self._cache[key]

    def _acts_on(self, ijk_axis: int) -> bool:
        return self.factors[ijk_axis] > 1

    def _check(self, x: Any) -> None:
        if getattr(x, "ndim", 0) < 3:
            ndim = getattr(x, "ndim", 0)
            raise InputError(f"expected an array whose last three axes are (k, j, i), got ndim={ndim}")

    # -- the operator ------------------------------------------------------------------
    def degrade(self, x: Any) -> Any:
        """``A x``: the low-resolution measurement of a high-resolution array."""
        self._check(x)
        out = x
        for a in range(3):
            mats = self.matrices(a, x.shape[-1 - a])
            if mats is not None:
                out = _apply_along(out, mats[0], a)
        return out if out is not x else (x.clone() if _is_torch(x) else np.array(x, copy=True))

    def lift(self, y: Any) -> Any:
        """``U y``: a right inverse back onto the high-resolution grid (``A U y == y``)."""
        self._check(y)
        out = y
        for a in range(3):
            n_hr = y.shape[-1 - a] * self.factors[a]
            mats = self.matrices(a, n_hr)
            if mats is not None:
                out = _apply_along(out, mats[1], a)
        return out if out is not y else (y.clone() if _is_torch(y) else np.array(y, copy=True))

    def condition(self, x: Any) -> Any:
        """``U A x``: what a network conditioned on the degraded input sees (SR ``c_ref``)."""
        return self.lift(self.degrade(x))

    def project(self, x: Any, y: Any, strength: float = 1.0) -> Any:
        """Move ``x`` onto ``{x : A x = y}`` (``strength`` 1) or part of the way (soft, < 1).

        ``x - strength * U (A x - y)``; with strength 1, ``degrade(project(x, y)) == y``.
        """
        if not 0.0 <= strength <= 1.0:
            raise InputError(f"projection strength must lie in [0, 1], got {strength}")
        if strength == 0.0:
            return x.clone() if _is_torch(x) else np.array(x, copy=True)
        return x - strength * self.lift(self.degrade(x) - y)

    def project_null(self, r: Any, strength: float = 1.0) -> Any:
        """Project onto the null space of ``A`` (``A r = 0``): the residual-space constraint."""
        if not 0.0 <= strength <= 1.0:
            raise InputError(f"projection strength must lie in [0, 1], got {strength}")
        return r - strength * self.condition(r)

    # -- grids -------------------------------------------------------------------------
    def lr_shape(self, hr_shape_ijk: Sequence[int]) -> tuple[int, int, int]:
        for a, (n, f) in enumerate(zip(hr_shape_ijk, self.factors)):
            if n % f:
                raise GeometryError(f"axis {'ijk'[a]} has {n} voxels, not a multiple of the factor {f}")
        return tuple(int(n) // f for n, f in zip(hr_shape_ijk, self.factors))

    def lr_affine(self, hr_affine: np.ndarray) -> np.ndarray:
        """IJK->RAS of the measurement grid (cell-centred, same outer box)."""
        return low_resolution_affine(hr_affine, self.factors)

    def degrade_volume(self, volume: Volume) -> Volume:
        """The simulated low-resolution acquisition of ``volume``, on its own grid."""
        self.lr_shape(volume.shape_ijk)
        return Volume(self.degrade(np.asarray(volume.array, dtype=np.float64)), self.lr_affine(volume.affine))

    def lift_volume(self, volume: Volume) -> Volume:
        """A measured low-resolution volume brought onto its SR grid with the right inverse."""
        return Volume(self.lift(np.asarray(volume.array, dtype=np.float64)), self.hr_affine(volume.affine))

    def hr_affine(self, lr_affine: np.ndarray) -> np.ndarray:
        """IJK->RAS of the high-resolution grid whose measurement grid is ``lr_affine``."""
        return super_resolution_affine(lr_affine, self.factors)

    def to_dict(self) -> dict:
        raise NotImplementedError


class AveragePool(SeparableDegradation):
    """The paper's SR degradation: mean over ``f_i x f_j x f_k`` blocks (stride = kernel).

    ``lift`` is nearest repeat, which is exactly the pseudo-inverse, so ``U A`` is the
    orthogonal projector onto block-constant volumes.
    """

    kind = "average_pool"

    def __init__(self, factors: int | Sequence[int] = 4) -> None:
        super().__init__(np.broadcast_to(np.asarray(factors), (3,)).tolist())

    def _axis_forward(self, ijk_axis: int, n_hr: int) -> np.ndarray:
        f = self.factors[ijk_axis]
        return np.kron(np.eye(n_hr // f), np.full((1, f), 1.0 / f))

    def _axis_inverse(self, ijk_axis: int, forward: np.ndarray) -> np.ndarray:
        return (forward > 0).T.astype(np.float64)

    def to_dict(self) -> dict:
        return {"type": self.kind, "factors": list(self.factors)}

    def __repr__(self) -> str:
        return f"AveragePool(factors={self.factors})"


class ThickSlice(SeparableDegradation):
    """Clinical through-plane acquisition along one IJK axis.

    Each measured slice ``m`` integrates the high-resolution voxels with a slice profile
    (Gaussian of the given FWHM, or a box of that width) centred on the cell-centred
    position ``m * factor + (factor - 1)/2 + offset`` (HR voxel units). ``factor`` is the
    slice distance (thickness + gap) in HR voxels; ``fwhm`` defaults to ``factor`` (no gap).
    Rows are normalised to sum to one; ``lift`` is the pseudo-inverse.
    """

    kind = "thick_slice"

    def __init__(
        self,
        axis: int = 2,
        factor: int = 4,
        fwhm: float | None = None,
        profile: str = "gaussian",
        offset: float = 0.0,
    ) -> None:
        if axis not in (0, 1, 2):
            raise InputError(f"thick-slice axis must be 0 (i), 1 (j) or 2 (k), got {axis}")
        if profile not in ("gaussian", "box"):
            raise InputError(f"slice profile must be 'gaussian' or 'box', got {profile!r}")
        factors = [1, 1, 1]
        factors[axis] = int(factor)
        super().__init__(factors)
        self.axis = axis
        self.fwhm = float(factor if fwhm is None else fwhm)
        if not math.isfinite(self.fwhm) or self.fwhm <= 0:
            raise InputError(f"slice FWHM must be positive, got {fwhm}")
        self.profile = profile
        self.offset = float(offset)
        if not abs(self.offset) < factor:
            raise InputError(f"slice offset must be smaller than the slice distance {factor}, got {offset}")

    @classmethod
    def from_mm(
        cls,
        axis: int,
        hr_spacing_mm: float,
        thickness_mm: float,
        gap_mm: float = 0.0,
        profile: str = "gaussian",
    ) -> ThickSlice:
        """Build from millimetres: slice distance ``thickness + gap`` must be a whole number
        of high-resolution voxels."""
        if hr_spacing_mm <= 0 or thickness_mm <= 0 or gap_mm < 0:
            raise InputError("spacing and thickness must be positive and the gap non-negative")
        ratio = (thickness_mm + gap_mm) / hr_spacing_mm
        factor = round(ratio)
        if factor < 1 or abs(ratio - factor) > 1e-3 * max(factor, 1):
            raise GeometryError(
                f"slice distance {thickness_mm + gap_mm} mm is not a whole multiple of the "
                f"high-resolution spacing {hr_spacing_mm} mm"
            )
        return cls(axis, factor, thickness_mm / hr_spacing_mm, profile)

    def _acts_on(self, ijk_axis: int) -> bool:
        return ijk_axis == self.axis

    def _axis_forward(self, ijk_axis: int, n_hr: int) -> np.ndarray:
        p = self.factors[ijk_axis]
        centres = np.arange(n_hr // p) * p + (p - 1) / 2.0 + self.offset
        j = np.arange(n_hr, dtype=np.float64)
        if self.profile == "gaussian":
            sigma = self.fwhm * _FWHM_TO_SIGMA
            w = np.exp(-0.5 * ((j[None, :] - centres[:, None]) / sigma) ** 2)
        else:
            lo = np.maximum(j[None, :] - 0.5, centres[:, None] - self.fwhm / 2.0)
            hi = np.minimum(j[None, :] + 0.5, centres[:, None] + self.fwhm / 2.0)
            w = np.clip(hi - lo, 0.0, None)
        sums = w.sum(axis=1, keepdims=True)
        if np.any(sums <= 0):
            raise GeometryError("a slice profile covers no voxel of the grid")
        return w / sums

    def lr_affine(self, hr_affine: np.ndarray) -> np.ndarray:
        start = [0.0, 0.0, 0.0]
        start[self.axis] = self.offset / self.factors[self.axis]
        return shift_affine(super().lr_affine(hr_affine), start)

    def hr_affine(self, lr_affine: np.ndarray) -> np.ndarray:
        start = [0.0, 0.0, 0.0]
        start[self.axis] = -self.offset / self.factors[self.axis]
        return super().hr_affine(shift_affine(lr_affine, start))

    def to_dict(self) -> dict:
        return {
            "type": self.kind,
            "axis": self.axis,
            "factor": self.factors[self.axis],
            "fwhm": self.fwhm,
            "profile": self.profile,
            "offset": self.offset,
        }

    def __repr__(self) -> str:
        return (
            f"ThickSlice(axis={self.axis}, factor={self.factors[self.axis]}, fwhm={self.fwhm}, "
            f"profile={self.profile!r}, offset={self.offset})"
        )


def degradation_from_dict(d: dict) -> SeparableDegradation:
    """Rebuild an operator from :meth:`to_dict` output (e.g. a bundle manifest)."""
    kind = d.get("type")
    if kind == AveragePool.kind:
        return AveragePool(d["factors"])
    if kind == ThickSlice.kind:
        return ThickSlice(int(d["axis"]), int(d["factor"]), float(d["fwhm"]), str(d["profile"]),
                          float(d.get("offset", 0.0)))
    raise InputError(f"unknown degradation type {kind!r}; expected 'average_pool' or 'thick_slice'")
