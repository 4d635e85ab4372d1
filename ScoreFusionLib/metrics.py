"""Evaluation metrics of the paper protocol (method.md section 8), in numpy and scipy only.

Image metrics (PSNR, SSIM, linear MMD) follow the Score-Fusion protocol: result and ground
truth are both mapped with the **ground truth's** min and max, ``(v - min_gt)/(max_gt - min_gt)``,
and the result is not clipped, so an over- or undershooting result is penalised. SSIM is our
own implementation of scikit-image's ``structural_similarity(gt, res, data_range=1)`` with its
defaults; it is kept equal to it within 1e-6 by the tests, so numbers stay comparable with the
paper without making scikit-image a dependency.

Masked variants
---------------
Every image metric takes an optional boolean ``mask`` of the array's shape:

* foreground (``[L]`` protocol): ``mask=foreground_mask_from_reference(gt)``, i.e. ``gt > gt.min()``,
  because an exact background makes whole-volume PSNR look better than the brain is;
* tumour / healthy tissue: ``mask=tumour`` and ``mask=~tumour`` (e.g. from
  :func:`ScoreFusionLib.labels.region_mask`).

The normalisation always uses the whole reference, so masked and unmasked numbers share one
intensity scale. (The BraSyn challenge's regional SSIM clips to percentiles and multiplies by the
mask instead; that is a different protocol and is not implemented here.)

Segmentation metrics (Dice, region Dice, HD95) follow the BraTS conventions of section 8.2.

Bad input (shape mismatch, NaN/Inf, a constant reference, empty or non-boolean masks) raises
:class:`~ScoreFusionLib.errors.InputError`. Inputs are never modified.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError
from .labels import REGIONS, region_mask, validate_labels
from .volume import require_finite_real, require_usable_intensities

__all__ = [
    "SSIM_WIN_SIZE",
    "dice",
    "foreground_mask_from_reference",
    "hd95",
    "mmd_linear",
    "normalize_by_reference",
    "psnr",
    "region_dice",
    "ssim",
    "volume_metrics",
]

#: Side of the uniform SSIM window (scikit-image's default with ``gaussian_weights=False``).
SSIM_WIN_SIZE = 7
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------


def _require_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise InputError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; "
            "metrics need arrays on one grid"
        )


def _require_mask(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    """A boolean mask of ``shape`` with at least one voxel set.

    Non-boolean masks are refused rather than cast, because an intensity image or a label map
    passed by mistake would otherwise silently become "everything but zero".
    """
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise InputError(f"{name} must be a boolean array, got dtype {m.dtype}; compare it explicitly first")
    if tuple(m.shape) != tuple(shape):
        raise InputError(f"{name} has shape {tuple(m.shape)} but the images have shape {tuple(shape)}")
    if not m.any():
        raise InputError(f"{name} is empty (no voxel is set); a masked metric over no voxels is undefined")
    return m


def _normalized_pair(result: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    res = require_finite_real(result, "result")
    ref = np.asarray(reference)
    require_usable_intensities(ref, "reference")
    _require_same_shape(res, ref, "result", "reference")
    lo = float(ref.min())
    span = float(ref.max()) - lo
    # New float64 arrays: the inputs are never written to.
    res_n = (res.astype(np.float64) - lo) / span
    ref_n = (ref.astype(np.float64) - lo) / span
    return res_n, ref_n


# ---------------------------------------------------------------------------------------------
# intensity metrics
# ---------------------------------------------------------------------------------------------


def normalize_by_reference(result: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map result and ground truth with the ground truth's min and max (paper protocol).

    Both become ``(v - min_gt)/(max_gt - min_gt)`` as new float64 arrays, so the reference spans
    exactly [0, 1] and PSNR/SSIM use peak 1. The result is deliberately **not** clipped: values
    outside the reference's range are errors the metrics should see.

    Returns
    -------
    (result_normalised, reference_normalised)
    """
    return _normalized_pair(result, reference)


def _mse(res_n: np.ndarray, ref_n: np.ndarray, mask: np.ndarray | None) -> float:
    diff = res_n - ref_n
    sq = diff * diff
    return float(sq[mask].mean(dtype=np.float64) if mask is not None else sq.mean(dtype=np.float64))


def _psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def psnr(result: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Paper PSNR in dB: ``10 log10(1 / MSE)`` after :func:`normalize_by_reference`.

    The MSE is taken over the whole array, background included (the paper's number), or only
    over the voxels of a boolean ``mask`` (foreground, tumour or healthy-tissue variants; the
    normalisation still uses the whole reference). Identical inputs give ``+inf``.
    """
    res_n, ref_n = _normalized_pair(result, reference)
    m = None if mask is None else _require_mask(mask, ref_n.shape)
    return _psnr_from_mse(_mse(res_n, ref_n, m))


def _ssim_map(im1: np.ndarray, im2: np.ndarray) -> np.ndarray:
    """Per-voxel SSIM of two normalised float64 arrays, as scikit-image computes it.

    Uniform ``7**ndim`` window (``scipy.ndimage.uniform_filter``, reflect borders), data range 1,
    K1 = 0.01, K2 = 0.03 and the sample-covariance factor ``N/(N-1)``. The operations are kept in
    scikit-image's order so the results agree to rounding.
    """
    if im1.ndim not in (2, 3):
        raise InputError(f"SSIM needs 2D or 3D arrays, got {im1.ndim}D with shape {tuple(im1.shape)}")
    if min(im1.shape) < SSIM_WIN_SIZE:
        raise InputError(
            f"SSIM needs at least {SSIM_WIN_SIZE} voxels along every axis (its window), "
            f"got shape {tuple(im1.shape)}"
        )
    win = SSIM_WIN_SIZE
    n_p = win**im1.ndim
    cov_norm = n_p / (n_p - 1)  # sample covariance

    def filt(x: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(x, size=win)

    ux = filt(im1)
    uy = filt(im2)
    uxx = filt(im1 * im1)
    uyy = filt(im2 * im2)
    uxy = filt(im1 * im2)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (_SSIM_K1 * 1.0) ** 2
    c2 = (_SSIM_K2 * 1.0) ** 2
    a1 = 2 * ux * uy + c1
    a2 = 2 * vxy + c2
    b1 = ux**2 + uy**2 + c1
    b2 = vx + vy + c2
    return (a1 * a2) / (b1 * b2)


def _border_crop(ndim: int) -> tuple[slice, ...]:
    pad = (SSIM_WIN_SIZE - 1) // 2
    return (slice(pad, -pad),) * ndim


def _ssim_mean(s_map: np.ndarray, mask: np.ndarray | None) -> float:
    crop = _border_crop(s_map.ndim)
    inner = s_map[crop]
    if mask is None:
        return float(inner.mean(dtype=np.float64))
    inner_mask = mask[crop]
    if not inner_mask.any():
        pad = (SSIM_WIN_SIZE - 1) // 2
        raise InputError(
            f"mask has no voxel inside the SSIM border crop ({pad} voxels from every edge); "
            "masked SSIM is undefined"
        )
    return float(inner[inner_mask].mean(dtype=np.float64))


def ssim(result: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Paper SSIM: scikit-image's ``structural_similarity(gt, res, data_range=1)`` re-implemented.

    Both arrays are first mapped by :func:`normalize_by_reference`. 2D (slices) and 3D arrays are
    accepted, each axis at least 7 long. The SSIM map's mean excludes a 3-voxel border, as in
    scikit-image. With a boolean ``mask`` (foreground, tumour, healthy tissue), the mean is taken
    over the mask's voxels inside that same border crop; the local statistics still use the full
    window, so the map itself does not depend on the mask.
    """
    res_n, ref_n = _normalized_pair(result, reference)
    m = None if mask is None else _require_mask(mask, ref_n.shape)
    return _ssim_mean(_ssim_map(ref_n, res_n), m)


def foreground_mask_from_reference(reference: np.ndarray) -> np.ndarray:
    """Boolean foreground mask ``reference > reference.min()`` for the masked PSNR/SSIM [L] variant.

    BraTS volumes have an exact-minimum background (after skull stripping), which otherwise
    dominates whole-volume PSNR. Pass the result as ``mask=`` to :func:`psnr` or :func:`ssim`.
    """
    ref = np.asarray(reference)
    require_usable_intensities(ref, "reference")
    return ref > ref.min()


def volume_metrics(
    result: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float]:
    """PSNR and SSIM of one volume (or slice), whole and foreground-masked, in one pass.

    Returns a dict with ``psnr``, ``ssim`` (paper numbers), ``psnr_foreground`` and
    ``ssim_foreground`` (mask = ``reference > reference.min()``), and, when a boolean ``mask`` is
    given (e.g. a tumour region), also ``psnr_masked`` and ``ssim_masked``. The SSIM map is
    computed once and shared by all variants.
    """
    res_n, ref_n = _normalized_pair(result, reference)
    user_mask = None if mask is None else _require_mask(mask, ref_n.shape)
    ref = np.asarray(reference)
    fg = ref > ref.min()
    s_map = _ssim_map(ref_n, res_n)
    out = {
        "psnr": _psnr_from_mse(_mse(res_n, ref_n, None)),
        "ssim": _ssim_mean(s_map, None),
        "psnr_foreground": _psnr_from_mse(_mse(res_n, ref_n, fg)),
        "ssim_foreground": _ssim_mean(s_map, fg),
    }
    if user_mask is not None:
        out["psnr_masked"] = _psnr_from_mse(_mse(res_n, ref_n, user_mask))
        out["ssim_masked"] = _ssim_mean(s_map, user_mask)
    return out


def mmd_linear(results: Iterable[np.ndarray], references: Iterable[np.ndarray]) -> float:
    """Linear MMD over a test set: ``|| mean_n X - mean_n Y ||^2`` summed over voxels.

    ``X`` holds the flattened normalised ground truths, ``Y`` the results, each pair mapped by
    :func:`normalize_by_reference`; it is the squared distance between the voxel-wise mean
    volumes. The sum grows with the voxel count, so all volumes must share one shape and
    numbers compare only at identical grids. The means are accumulated one pair at a time, so a
    generator keeps memory at two volumes.
    """
    sum_x: np.ndarray | None = None
    sum_y: np.ndarray | None = None
    shape: tuple[int, ...] | None = None
    count = 0
    missing = object()
    for res, ref in itertools.zip_longest(results, references, fillvalue=missing):
        if res is missing or ref is missing:
            raise InputError("mmd_linear needs as many results as references")
        res_n, ref_n = _normalized_pair(res, ref)
        if shape is None:
            shape = tuple(ref_n.shape)
            sum_x = np.zeros(shape, dtype=np.float64)
            sum_y = np.zeros(shape, dtype=np.float64)
        elif tuple(ref_n.shape) != shape:
            raise InputError(
                f"volume {count} has shape {tuple(ref_n.shape)} but volume 0 has {shape}; "
                "linear MMD sums over voxels and needs one shared grid"
            )
        sum_x += ref_n
        sum_y += res_n
        count += 1
    if count == 0 or sum_x is None or sum_y is None:
        raise InputError("mmd_linear needs at least one (result, reference) pair")
    diff = (sum_x - sum_y) / count
    return float(np.sum(diff * diff, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# segmentation metrics
# ---------------------------------------------------------------------------------------------


def _mask_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred)
    t = np.asarray(truth)
    for arr, name in ((p, "pred"), (t, "truth")):
        if arr.dtype != np.bool_:
            raise InputError(
                f"{name} must be a boolean mask, got dtype {arr.dtype}; use region_dice for label maps"
            )
    _require_same_shape(p, t, "pred", "truth")
    return p, t


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice ``2|P ∩ G| / (|P| + |G|)`` of two boolean masks, BraTS conventions.

    Both empty gives 1.0 (the absence was predicted correctly); only one empty gives 0.0.
    """
    p, t = _mask_pair(pred, truth)
    n_p = int(np.count_nonzero(p))
    n_t = int(np.count_nonzero(t))
    if n_p + n_t == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & t)) / (n_p + n_t)


def region_dice(pred_labels: np.ndarray, true_labels: np.ndarray, convention: str) -> dict[str, float]:
    """Dice per BraTS evaluation region (WT, TC, ET) of two integer label maps.

    ``convention`` (``"brats2021"``: ET = 4; ``"brats2023"``: ET = 3, 4 = resection cavity, which
    belongs to no region) decides which labels form each region; labels outside the convention
    raise :class:`InputError` instead of being silently ignored.
    """
    p = np.asarray(pred_labels)
    t = np.asarray(true_labels)
    for arr, name in ((p, "pred_labels"), (t, "true_labels")):
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{name} must be an integer label map, got dtype {arr.dtype}")
    _require_same_shape(p, t, "pred_labels", "true_labels")
    validate_labels(p, convention)
    validate_labels(t, convention)
    return {
        region: dice(region_mask(p, region, convention), region_mask(t, region, convention))
        for region in REGIONS
    }


def _surface(mask: np.ndarray) -> np.ndarray:
    # Voxels of the mask with a face-neighbour outside it (the grid edge counts as outside).
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance between two boolean masks, in mm.

    Surfaces are the mask voxels with a face-neighbour outside the mask. For each surface voxel
    of one mask, its Euclidean distance to the nearest surface voxel of the other is taken from a
    ``scipy.ndimage.distance_transform_edt`` with voxel ``spacing``; the result is the larger of
    the two directed 95th percentiles (as MONAI and the BraTS 2023 toolkit report it).

    ``spacing`` is in the library's **(i, j, k)** order (``Volume.spacing``; ``(i, j)`` for 2D),
    i.e. the array axes reversed.

    Empty masks: both empty gives 0.0 (perfect agreement, like Dice = 1); only one empty gives
    ``inf`` (no distance exists; BraTS rankings replace it by a fixed penalty such as 374 mm).
    """
    p, t = _mask_pair(pred, truth)
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size != p.ndim:
        raise InputError(f"spacing has {sp.size} values but the masks are {p.ndim}D")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"spacing must be positive and finite, got {tuple(sp.tolist())}")
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0
    if not has_p or not has_t:
        return math.inf
    sampling = sp[::-1]  # (i, j, k) -> array axes (k, j, i)
    surf_p, surf_t = _surface(p), _surface(t)
    dist_to_t = ndimage.distance_transform_edt(~surf_t, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~surf_p, sampling=sampling)
    d_pt = dist_to_t[surf_p]
    d_tp = dist_to_p[surf_t]
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
