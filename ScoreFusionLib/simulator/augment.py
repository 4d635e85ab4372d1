"""Realism augmentations: smooth deformation, bias field, Rician noise and global gain.

The deformation acts on tissue fractions (linear) and labels (nearest) *before* any
signal is computed, so every contrast of a case sees the same anatomy. Bias, gain and
noise act on each contrast's signal independently, as they would on separate scans.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import fields

DEFORM_CONTROL_POINTS = (6, 10)  # per axis, inclusive
DEFORM_AMPLITUDE_MM = (2.0, 4.0)
BIAS_CONTROL_POINTS = (4, 5)  # 4 = one cubic polynomial over the box
BIAS_STRENGTH = (0.10, 0.30)
SNR_RANGE = (10.0, 40.0)
GAIN_RANGE = (500.0, 2000.0)  # log-uniform, arbitrary scanner units


# --------------------------------------------------------------------------- deformation
@dataclass(frozen=True, eq=False)
class DeformationParams:
    """A smooth displacement: ``coeffs`` (3 = x, y, z in mm, then k, j, i control points)."""

    n_ctrl: tuple[int, int, int]
    amplitude_mm: float
    coeffs: np.ndarray

    def as_dict(self) -> dict[str, object]:
        return {
            "control_points_ijk": list(self.n_ctrl),
            "amplitude_mm": self.amplitude_mm,
            "note": "largest control-point displacement; the field never exceeds it",
        }


def sample_deformation(rng: np.random.Generator) -> DeformationParams:
    """Random control grid (6-10 points per axis) with the largest vector scaled to 2-4 mm."""
    lo, hi = DEFORM_CONTROL_POINTS
    n_ctrl = tuple(int(n) for n in rng.integers(lo, hi + 1, size=3))
    amplitude = float(rng.uniform(*DEFORM_AMPLITUDE_MM))
    ni, nj, nk = n_ctrl
    coeffs = rng.standard_normal(size=(3, nk, nj, ni))
    coeffs *= amplitude / float(np.linalg.norm(coeffs, axis=0).max())
    return DeformationParams(n_ctrl, amplitude, coeffs.astype(np.float32))


def displacement_field(params: DeformationParams, affine: np.ndarray, shape: tuple[int, int, int],
                       box_ras: np.ndarray) -> list[np.ndarray]:
    """Displacement in mm along RAS x, y and z, one (k, j, i) array each."""
    centres = fields.axis_centres(affine, shape)
    return [fields.field_on_grid(params.coeffs[c], box_ras, centres) for c in range(3)]


class Warp:
    """Resampling of (k, j, i) arrays at given continuous indices, for a subset of voxels.

    ``flat`` lists the output voxels to compute (every other voxel is zero) and ``coords``
    (3, N) the continuous (k, j, i) index each one samples. One warp is built per case and
    applied to every fraction map and the label map, so they move together.
    """

    def __init__(self, shape: tuple[int, int, int], flat: np.ndarray, coords: np.ndarray) -> None:
        self.shape = tuple(int(n) for n in shape)
        self._flat = flat
        self._coords = coords

    @classmethod
    def from_displacement(
        cls, displacement_mm: list[np.ndarray], affine: np.ndarray, support: np.ndarray
    ) -> Warp:
        """``out(x) = in(x + u(x))`` for the voxels of ``support`` (u: RAS x, y, z in mm)."""
        flat, kji = support_points(support)
        step = np.diag(np.asarray(affine, dtype=np.float64)[:3, :3])  # (i, j, k) mm per voxel
        coords = np.empty((3, flat.size), dtype=np.float64)
        for row, axis_ras in enumerate((2, 1, 0)):
            coords[row] = kji[row] + displacement_mm[axis_ras].ravel()[flat] / step[axis_ras]
        return cls(support.shape, flat, coords)

    def _select(self, box: tuple[slice, slice, slice] | None) -> np.ndarray | slice:
        if box is None:
            return slice(None)
        keep = np.ones(self._flat.size, dtype=bool)
        for row, sl in enumerate(box):
            keep &= (self._coords[row] >= sl.start - 1) & (self._coords[row] <= sl.stop)
        return np.flatnonzero(keep)

    def apply(
        self,
        array: np.ndarray,
        order: int,
        box: tuple[slice, slice, slice] | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Warp ``array`` (linear for ``order=1``, nearest for ``order=0``).

        ``box`` (k, j, i slices) promises that ``array`` is zero outside it, so only the
        output voxels that sample it are computed. With ``out`` only the warped voxels are
        written into it and the rest of ``out`` is kept.
        """
        sel = self._select(box)
        if out is None:
            out = np.zeros(self.shape, dtype=array.dtype)
        elif not out.flags.c_contiguous or tuple(out.shape) != self.shape:
            raise ValueError("out must be a C-contiguous array of the warp's shape")
        values = ndimage.map_coordinates(
            array, self._coords[:, sel], order=order, mode="grid-constant", cval=0, prefilter=False
        )
        out.reshape(-1)[self._flat[sel]] = values
        return out


def support_points(support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the ``True`` voxels and their (3, N) float (k, j, i) indices."""
    flat = np.flatnonzero(support)
    kji = np.empty((3, flat.size), dtype=np.float64)
    for row, index in enumerate(np.unravel_index(flat, support.shape)):
        kji[row] = index
    return flat, kji


def reach_voxels(amplitude_mm: float, spacing: float) -> int:
    """How many voxels a displacement of at most ``amplitude_mm`` can move content."""
    return int(np.ceil(amplitude_mm / spacing)) + 1


def expand_box(box: tuple[slice, slice, slice], reach: int, shape: tuple[int, int, int]) -> tuple[slice, ...]:
    """``box`` grown by ``reach`` voxels on every side, clipped to ``shape``."""
    return tuple(slice(max(0, sl.start - reach), min(n, sl.stop + reach)) for sl, n in zip(box, shape))


def deformation_support(brain: np.ndarray, amplitude_mm: float, spacing: float) -> np.ndarray:
    """Output voxels that can sample brain tissue: the brain dilated by the displacement bound."""
    reach = reach_voxels(amplitude_mm, spacing)
    return ndimage.maximum_filter(brain > 0, size=2 * reach + 1)


# --------------------------------------------------------------------------- acquisition
@dataclass(frozen=True, eq=False)
class AcquisitionParams:
    """Scanner effects for one contrast."""

    snr: float
    gain: float
    bias_strength: float
    bias_coeffs: np.ndarray

    def as_dict(self) -> dict[str, object]:
        n = self.bias_coeffs.shape
        return {
            "snr": self.snr,
            "gain": self.gain,
            "bias_strength": self.bias_strength,
            "bias_control_points_ijk": [int(n[2]), int(n[1]), int(n[0])],
        }


def sample_acquisition(
    rng: np.random.Generator, shared_with: AcquisitionParams | None = None
) -> AcquisitionParams:
    """SNR 10-40, log-uniform gain, and a bias field of +-10-30 % for one contrast.

    ``shared_with`` keeps SNR and gain of another contrast (T1c is the T1w sequence in the
    same session) while the bias field is drawn anew.
    """
    snr = float(rng.uniform(*SNR_RANGE))
    gain = float(np.exp(rng.uniform(np.log(GAIN_RANGE[0]), np.log(GAIN_RANGE[1]))))
    if shared_with is not None:
        snr, gain = shared_with.snr, shared_with.gain
    strength = float(rng.uniform(*BIAS_STRENGTH))
    lo, hi = BIAS_CONTROL_POINTS
    n_ctrl = [int(n) for n in rng.integers(lo, hi + 1, size=3)]
    coeffs = fields.random_coefficients(rng, n_ctrl).astype(np.float32)
    return AcquisitionParams(snr, gain, strength, coeffs)


def bias_field(params: AcquisitionParams, affine: np.ndarray, shape: tuple[int, int, int],
               box_ras: np.ndarray) -> np.ndarray:
    """Multiplicative field ``exp(log(1 + b) g)`` with ``max |g| = 1``: within ``[1/(1+b), 1+b]``."""
    g = fields.field_on_grid(params.bias_coeffs, box_ras, fields.axis_centres(affine, shape))
    np.clip(g, -1.0, 1.0, out=g)
    return np.exp(np.float32(np.log1p(params.bias_strength)) * g)


def add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise: ``|S + n1 + i n2|``, ``n ~ N(0, sigma^2)``.

    A zero background becomes Rayleigh distributed, as in magnitude MR images.
    """
    real = rng.standard_normal(signal.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += signal
    imag = rng.standard_normal(signal.shape, dtype=np.float32)
    imag *= np.float32(sigma)
    return np.hypot(real, imag)
