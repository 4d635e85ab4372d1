"""Real tissue maps that drive the simulator: ICBM152 2009a T1, GM and WM from nilearn.

The files are read from the installed nilearn wheel (never imported: it is installed with
``--no-deps`` only for its data). GM and WM are probabilities x 255; there is no CSF map,
so CSF is what remains of the brain mask ``T1 > 0``. GM and WM are cut to the same mask,
so every fraction is zero in the background and the simulated background is exactly zero
before noise.

Grid rule for a spacing ``s`` (mm, isotropic; the source is 1 mm):

* ``n_out = ceil(n_in * 1 mm / s)`` voxels per axis, so 197x233x189 becomes 99x117x95 at
  2 mm and stays unchanged at 1 mm;
* the matrix is :func:`ScoreFusionLib.geometry.low_resolution_affine` of the ICBM matrix
  with factor ``s``: cell-centred, the first output box starts at the same corner as the
  first ICBM box, and the last one may overhang the ICBM box by less than a voxel (that
  overhang is background).

Resampling is area-weighted block averaging: each output value is the mean of the 1 mm
voxels it covers, weighted by overlap (exact 2x2x2 means at 2 mm, fractional overlaps for
non-integer factors, zero beyond the ICBM box). Averaging keeps fractions summing to the
brain fraction of the cell, which is what partial volume means.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from ..errors import DatasetError, InputError
from ..geometry import low_resolution_affine

#: The nilearn release whose bundled files were checked (paths and content).
NILEARN_REQUIREMENT = "nilearn==0.14.1"
ICBM_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
SOURCE_SPACING_MM = 1.0
#: Finer than the source only interpolates (and costs 8x memory per halving); coarser than
#: 8 mm leaves a brain of a few thousand voxels.
MIN_SPACING_MM = 1.0
MAX_SPACING_MM = 8.0

_INSTALL_HINT = f"pip install --no-deps {NILEARN_REQUIREMENT}"


def icbm_data_dir() -> Path:
    """Folder of nilearn's bundled data files; :class:`DatasetError` with the install command
    when nilearn or one of the three ICBM152 files is absent."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "the simulator needs the ICBM152 maps shipped in the nilearn wheel, which is not "
            f"installed; run `{_INSTALL_HINT}` (nilearn is only used for its data files)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in ICBM_FILES.values() if not (folder / name).is_file()]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise DatasetError(
            f"nilearn is installed but {', '.join(missing)} {verb} missing from {folder}; "
            f"reinstall it with `{_INSTALL_HINT}`"
        )
    return folder


def validate_spacing(spacing: float) -> float:
    """Return ``spacing`` as a float, or raise :class:`InputError` for unusable values."""
    try:
        value = float(spacing)
    except (TypeError, ValueError):
        raise InputError(f"spacing must be a number of millimetres, got {spacing!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"spacing must be a positive number of millimetres, got {spacing!r}")
    if value < MIN_SPACING_MM - 1e-9 or value > MAX_SPACING_MM + 1e-9:
        raise InputError(
            f"spacing {value:g} mm is outside the supported range {MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm "
            "(the ICBM152 source maps are 1 mm)"
        )
    return value


def output_shape(source_shape_kji: tuple[int, int, int], spacing: float) -> tuple[int, int, int]:
    """(k, j, i) shape of the grid at ``spacing``: ``ceil(n * 1 mm / spacing)`` per axis."""
    factor = spacing / SOURCE_SPACING_MM
    return tuple(max(1, math.ceil(n / factor - 1e-9)) for n in source_shape_kji)


def _axis_weights(n_in: int, factor: float) -> sparse.csr_matrix:
    """(n_out, n_in) overlap weights of output cells of width ``factor`` input voxels."""
    n_out = max(1, math.ceil(n_in / factor - 1e-9))
    rows, cols, vals = [], [], []
    for o in range(n_out):
        lo, hi = o * factor - 0.5, (o + 1) * factor - 0.5
        for i in range(max(0, math.floor(lo + 0.5)), min(n_in, math.ceil(hi + 0.5))):
            overlap = min(hi, i + 0.5) - max(lo, i - 0.5)
            if overlap > 1e-12:
                rows.append(o)
                cols.append(i)
                vals.append(overlap / factor)
    return sparse.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(n_out, n_in))


def block_average(array: np.ndarray, spacing: float) -> np.ndarray:
    """Area-weighted average of a 1 mm (k, j, i) array onto the ``spacing`` grid (float32)."""
    factor = spacing / SOURCE_SPACING_MM
    out = np.asarray(array, dtype=np.float32)
    if abs(factor - 1.0) < 1e-9:
        return out.copy()
    for axis in range(3):
        moved = np.moveaxis(out, axis, 0)
        w = _axis_weights(moved.shape[0], factor)
        flat = w @ moved.reshape(moved.shape[0], -1)
        out = np.moveaxis(np.asarray(flat).reshape((w.shape[0],) + moved.shape[1:]), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class TissueMaps:
    """Tissue fractions and the real T1 on one simulator grid (arrays (k, j, i), read-only).

    ``brain`` is the fraction of each cell inside ``T1 > 0``; ``gm + wm + csf == brain``.
    ``reference_t1`` is the real ICBM T1 (0-1) averaged the same way, for sanity checks.
    ``box_ras`` (2x3, mm) is the ICBM box, over which smooth random fields are defined so
    they do not depend on the spacing.
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    reference_t1: np.ndarray
    affine: np.ndarray
    spacing: float
    box_ras: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (k, j, i)."""
        return tuple(self.gm.shape)

    def fractions(self) -> dict[str, np.ndarray]:
        """Writable copies of the normal-tissue fractions, keyed ``wm``, ``gm``, ``csf``."""
        return {"wm": self.wm.copy(), "gm": self.gm.copy(), "csf": self.csf.copy()}


@functools.lru_cache(maxsize=1)
def _load_source() -> tuple[dict[str, np.ndarray], np.ndarray]:
    import nibabel as nib

    folder = icbm_data_dir()
    arrays = {}
    affine = None
    for key, name in ICBM_FILES.items():
        img = nib.load(str(folder / name))
        data = np.asarray(img.dataobj)
        arrays[key] = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
        if affine is None:
            affine = np.asarray(img.affine, dtype=np.float64)
        elif not np.allclose(affine, img.affine, atol=1e-6) or data.shape[::-1] != arrays["t1"].shape:
            raise DatasetError(f"{name} is not on the same grid as {ICBM_FILES['t1']}")
    block = affine[:3, :3]
    if np.any(np.abs(block - np.diag(np.diag(block))) > 1e-6) or not np.allclose(
        np.abs(np.diag(block)), SOURCE_SPACING_MM, atol=1e-4
    ):
        raise DatasetError(f"{ICBM_FILES['t1']} is not the expected axis-aligned 1 mm grid")
    mask = arrays["t1"] > 0
    gm = np.where(mask, arrays["gm"].astype(np.float32) / 255.0, 0.0).astype(np.float32)
    wm = np.where(mask, arrays["wm"].astype(np.float32) / 255.0, 0.0).astype(np.float32)
    csf = np.where(mask, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    source = {
        "gm": gm,
        "wm": wm,
        "csf": csf,
        "brain": mask.astype(np.float32),
        "reference_t1": arrays["t1"].astype(np.float32) / 255.0,
    }
    return {key: _freeze(value) for key, value in source.items()}, affine


def _freeze(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=4)
def _tissue_maps_cached(spacing: float) -> TissueMaps:
    source, affine = _load_source()
    nk, nj, ni = source["gm"].shape
    step = np.diag(affine[:3, :3])
    corners = np.array([affine[:3, 3] - 0.5 * step, affine[:3, 3] + (np.array([ni, nj, nk]) - 0.5) * step])
    box = np.sort(corners, axis=0)
    factor = spacing / SOURCE_SPACING_MM
    if abs(factor - 1.0) < 1e-9:
        arrays = source  # already frozen; no second copy of the full-resolution maps
    else:
        arrays = {key: _freeze(block_average(value, spacing)) for key, value in source.items()}
    out_affine = low_resolution_affine(affine, (factor, factor, factor))
    out_affine.setflags(write=False)
    box.setflags(write=False)
    return TissueMaps(
        gm=arrays["gm"],
        wm=arrays["wm"],
        csf=arrays["csf"],
        brain=arrays["brain"],
        reference_t1=arrays["reference_t1"],
        affine=out_affine,
        spacing=spacing,
        box_ras=box,
    )


def load_tissue_maps(spacing: float = 1.0) -> TissueMaps:
    """ICBM152 tissue fractions and real T1 on the cell-centred grid of ``spacing`` mm.

    Results are cached per spacing and read-only; use :meth:`TissueMaps.fractions` for
    copies to modify.
    """
    value = validate_spacing(spacing)
    return _tissue_maps_cached(round(value, 6))
