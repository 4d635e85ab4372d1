"""Tests of ScoreFusionLib.metrics against independent computations (scikit-image, by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from ScoreFusionLib import metrics as M
from ScoreFusionLib.errors import InputError

skm = pytest.importorskip("skimage.metrics")


def _pair(shape: tuple[int, ...], seed: int, smooth: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A (result, reference) pair with a reference range far from [0, 1]."""
    rng = np.random.default_rng(seed)
    gt = rng.normal(size=shape)
    if smooth:
        gt = ndimage.gaussian_filter(gt, 2.0)
    gt = 300.0 * (gt - gt.min()) / (gt.max() - gt.min()) + 50.0
    res = gt + 20.0 * rng.normal(size=shape) + 5.0
    return res, gt


def _sk_normalised(res: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent paper normalisation: both by the GT's min and max, no clipping."""
    lo, hi = gt.min(), gt.max()
    return (res.astype(np.float64) - lo) / (hi - lo), (gt.astype(np.float64) - lo) / (hi - lo)


# --------------------------------------------------------------------------------- normalisation


def test_normalize_uses_reference_min_max_and_does_not_clip():
    gt = np.array([[10.0, 20.0], [30.0, 50.0]])
    res = np.array([[0.0, 20.0], [30.0, 90.0]])  # wider range than the GT
    res_n, gt_n = M.normalize_by_reference(res, gt)
    np.testing.assert_allclose(gt_n, [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_allclose(res_n, [[-0.25, 0.25], [0.5, 2.0]])  # not clipped to [0, 1]
    assert res_n.dtype == np.float64 and gt_n.dtype == np.float64


# -------------------------------------------------------------------------------------- PSNR


def test_psnr_hand_computation():
    gt = np.array([0.0, 10.0, 20.0, 40.0]) + 100.0  # range 40
    res = gt + np.array([4.0, 0.0, 0.0, -4.0])  # normalised errors +-0.1
    mse = (0.1**2 + 0.1**2) / 4
    assert M.psnr(res, gt) == pytest.approx(10 * math.log10(1 / mse), abs=1e-12)
    assert M.psnr(res, gt) == pytest.approx(23.010299956639813, abs=1e-9)
    # Masked: only the first two voxels -> MSE = 0.01 / 2.
    mask = np.array([True, True, False, False])
    assert M.psnr(res, gt, mask=mask) == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-12)


def test_psnr_uses_reference_range_not_result_range():
    gt = np.array([0.0, 1.0, 2.0, 4.0])
    res = np.array([0.0, 1.0, 2.0, 8.0])  # error 4 at the max; result range 8
    # Normalised by the GT (range 4): error 1.0 on one voxel of four -> MSE 0.25.
    assert M.psnr(res, gt) == pytest.approx(10 * math.log10(4.0), abs=1e-12)
    # Swapping roles changes the normalisation, so the metric is not symmetric.
    assert M.psnr(gt, res) == pytest.approx(10 * math.log10(16.0), abs=1e-12)


def test_psnr_identical_is_inf():
    _, gt = _pair((8, 9, 10), 1)
    assert M.psnr(gt.copy(), gt) == math.inf
    assert M.volume_metrics(gt.copy(), gt)["psnr"] == math.inf


def test_psnr_matches_skimage_psnr():
    res, gt = _pair((10, 11, 12), 2)
    res_n, gt_n = _sk_normalised(res, gt)
    expected = skm.peak_signal_noise_ratio(gt_n, res_n, data_range=1.0)
    assert M.psnr(res, gt) == pytest.approx(expected, abs=1e-9)


# -------------------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("shape", [(20, 24, 28), (9, 9, 9), (7, 7, 7), (33, 40)])
@pytest.mark.parametrize("smooth", [False, True])
def test_ssim_equals_skimage(shape, smooth):
    res, gt = _pair(shape, seed=sum(shape), smooth=smooth)
    res_n, gt_n = _sk_normalised(res, gt)
    expected = skm.structural_similarity(gt_n, res_n, data_range=1)
    got = M.ssim(res, gt)
    assert abs(got - expected) < 1e-6
    assert got < 0.999  # a non-trivial value, so the comparison can fail


def test_ssim_float32_inputs_match_skimage_on_float64_normalisation():
    res, gt = _pair((12, 13, 14), 5, smooth=True)
    res32, gt32 = res.astype(np.float32), gt.astype(np.float32)
    res_n, gt_n = _sk_normalised(res32, gt32)
    expected = skm.structural_similarity(gt_n, res_n, data_range=1)
    assert abs(M.ssim(res32, gt32) - expected) < 1e-6


def test_ssim_identical_is_one():
    _, gt = _pair((10, 10, 10), 6)
    assert M.ssim(gt.copy(), gt) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(14, 15, 16), (20, 22)])
def test_masked_ssim_is_mean_of_skimage_map_over_mask_inside_crop(shape):
    res, gt = _pair(shape, 7, smooth=True)
    res_n, gt_n = _sk_normalised(res, gt)
    _, s_map = skm.structural_similarity(gt_n, res_n, data_range=1, full=True)
    rng = np.random.default_rng(8)
    mask = rng.random(shape) < 0.3
    crop = (slice(3, -3),) * len(shape)
    expected = s_map[crop][mask[crop]].mean()
    assert abs(M.ssim(res, gt, mask=mask) - expected) < 1e-6
    # A mask covering everything equals the unmasked value.
    assert M.ssim(res, gt, mask=np.ones(shape, bool)) == pytest.approx(M.ssim(res, gt), abs=1e-12)


def test_masked_ssim_outside_crop_only_is_an_error():
    res, gt = _pair((10, 10, 10), 9)
    mask = np.zeros(gt.shape, bool)
    mask[0, :, :] = True  # entirely in the 3-voxel border
    with pytest.raises(InputError, match="border crop"):
        M.ssim(res, gt, mask=mask)


# ------------------------------------------------------------------------- foreground / bundle


def test_foreground_mask_and_volume_metrics():
    res, gt = _pair((12, 14, 16), 10, smooth=True)
    gt = gt.copy()
    gt[:, :, :4] = gt.min()  # exact-minimum background
    res[:, :, :4] = gt.min()
    fg = M.foreground_mask_from_reference(gt)
    assert fg.dtype == np.bool_
    np.testing.assert_array_equal(fg, gt > gt.min())
    assert not fg[:, :, :4].any()

    res_n, gt_n = _sk_normalised(res, gt)
    mse_fg = np.mean((res_n[fg] - gt_n[fg]) ** 2)
    assert M.psnr(res, gt, mask=fg) == pytest.approx(10 * math.log10(1 / mse_fg), abs=1e-9)
    # The exact background inflates whole-volume PSNR.
    assert M.psnr(res, gt) > M.psnr(res, gt, mask=fg)

    tumour = np.zeros(gt.shape, bool)
    tumour[4:8, 5:9, 6:10] = True
    out = M.volume_metrics(res, gt, mask=tumour)
    assert set(out) == {"psnr", "ssim", "psnr_foreground", "ssim_foreground", "psnr_masked", "ssim_masked"}
    assert out["psnr"] == pytest.approx(M.psnr(res, gt), abs=1e-12)
    assert out["ssim"] == pytest.approx(skm.structural_similarity(gt_n, res_n, data_range=1), abs=1e-6)
    assert out["psnr_foreground"] == pytest.approx(M.psnr(res, gt, mask=fg), abs=1e-12)
    assert out["ssim_foreground"] == pytest.approx(M.ssim(res, gt, mask=fg), abs=1e-12)
    assert out["psnr_masked"] == pytest.approx(M.psnr(res, gt, mask=tumour), abs=1e-12)
    assert out["ssim_masked"] == pytest.approx(M.ssim(res, gt, mask=tumour), abs=1e-12)
    # Healthy-tissue variant is just the complement mask.
    assert M.psnr(res, gt, mask=~tumour) != pytest.approx(out["psnr_masked"])
    assert set(M.volume_metrics(res, gt)) == {"psnr", "ssim", "psnr_foreground", "ssim_foreground"}


# --------------------------------------------------------------------------------------- MMD


def test_mmd_linear_against_direct_computation():
    pairs = [_pair((6, 7, 8), s) for s in range(4)]
    results = [r for r, _ in pairs]
    refs = [g for _, g in pairs]
    normed = [_sk_normalised(r, g) for r, g in pairs]
    x = np.stack([g.ravel() for _, g in normed])  # GT, n x V
    y = np.stack([r.ravel() for r, _ in normed])  # results
    expected = float(np.sum((x.mean(axis=0) - y.mean(axis=0)) ** 2))
    assert expected > 1e-3
    assert M.mmd_linear(results, refs) == pytest.approx(expected, rel=1e-12)
    # Generators work too (memory-friendly for a whole test set).
    assert M.mmd_linear(iter(results), iter(refs)) == pytest.approx(expected, rel=1e-12)


def test_mmd_linear_identical_sets_is_zero():
    refs = [_pair((5, 6, 7), s)[1] for s in range(3)]
    assert M.mmd_linear([r.copy() for r in refs], refs) == 0.0


def test_mmd_linear_bad_inputs():
    a = _pair((5, 6, 7), 0)
    b = _pair((5, 6, 8), 1)
    with pytest.raises(InputError, match="shared grid"):
        M.mmd_linear([a[0], b[0]], [a[1], b[1]])
    with pytest.raises(InputError, match="as many"):
        M.mmd_linear([a[0], a[0]], [a[1]])
    with pytest.raises(InputError, match="at least one"):
        M.mmd_linear([], [])


# -------------------------------------------------------------------------------------- Dice


def test_dice_edge_cases():
    empty = np.zeros((3, 4), bool)
    some = empty.copy()
    some[1, 1:3] = True
    other = empty.copy()
    other[1, 2:4] = True
    assert M.dice(empty, empty) == 1.0
    assert M.dice(some, empty) == 0.0
    assert M.dice(empty, some) == 0.0
    assert M.dice(some, some) == 1.0
    assert M.dice(some, ~some) == 0.0
    assert M.dice(some, other) == pytest.approx(2 * 1 / (2 + 2))


# Hand-made label maps (flat index -> label). Expected Dice in the comments.
_TRUTH_2021 = np.array([0, 1, 2, 4, 4, 2, 0, 0])
_PRED_2021 = np.array([0, 1, 2, 2, 4, 0, 1, 0])
# WT {1,2,4}: truth idx 1-5 (5), pred 1,2,3,4,6 (5), both 1-4 (4) -> 8/10
# TC {1,4}:   truth 1,3,4 (3), pred 1,4,6 (3), both 1,4 (2)        -> 4/6
# ET {4}:     truth 3,4 (2),  pred 4 (1), both 4 (1)              -> 2/3
_EXPECTED = {"WT": 0.8, "TC": 2 / 3, "ET": 2 / 3}


def test_region_dice_brats2021():
    got = M.region_dice(_PRED_2021.reshape(2, 2, 2), _TRUTH_2021.reshape(2, 2, 2), "brats2021")
    assert set(got) == {"WT", "TC", "ET"}
    for region, value in _EXPECTED.items():
        assert got[region] == pytest.approx(value, abs=1e-12)


def test_region_dice_brats2023_resection_cavity_not_in_wt():
    truth = np.where(_TRUTH_2021 == 4, 3, _TRUTH_2021)
    pred = np.where(_PRED_2021 == 4, 3, _PRED_2021)
    truth[7] = 4  # resection cavity: in no region
    pred[0] = 4
    got = M.region_dice(pred.reshape(2, 4), truth.reshape(2, 4), "brats2023")
    for region, value in _EXPECTED.items():
        assert got[region] == pytest.approx(value, abs=1e-12)


def test_region_dice_convention_matters():
    # The 2021 maps read as 2023: label 4 becomes a resection cavity, ET (label 3) is empty in both.
    got = M.region_dice(_PRED_2021, _TRUTH_2021, "brats2023")
    assert got["ET"] == 1.0
    assert got["WT"] == pytest.approx(2 * 2 / (3 + 4))  # truth {1,2,5}, pred {1,2,3,6}
    assert got["TC"] == pytest.approx(2 * 1 / (1 + 2))  # truth {1}, pred {1,6}
    # Label 3 does not exist in the 2021 convention.
    with pytest.raises(InputError, match="not part of the brats2021"):
        M.region_dice(np.array([0, 3]), np.array([0, 1]), "brats2021")
    with pytest.raises(InputError, match="unknown label convention"):
        M.region_dice(_PRED_2021, _TRUTH_2021, "brats2099")


# -------------------------------------------------------------------------------------- HD95


def _ball(shape, centre_mm, radius_mm, spacing_ijk):
    """Ball in mm on a (k, j, i) grid with the given (i, j, k) spacing."""
    sk, sj, si = spacing_ijk[2], spacing_ijk[1], spacing_ijk[0]
    k, j, i = np.indices(shape, dtype=np.float64)
    ck, cj, ci = centre_mm
    return ((k * sk - ck) ** 2 + (j * sj - cj) ** 2 + (i * si - ci) ** 2) <= radius_mm**2


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_offset_spheres_isotropic(axis):
    centre = np.array([20.0, 20.0, 18.0])
    a = _ball((40, 40, 40), centre, 9.0, (1, 1, 1))
    shifted = centre.copy()
    shifted[axis] += 4.0
    b = _ball((40, 40, 40), shifted, 9.0, (1, 1, 1))
    assert abs(M.hd95(a, b, (1.0, 1.0, 1.0)) - 4.0) <= 1.0
    assert M.hd95(a, b, (1.0, 1.0, 1.0)) == M.hd95(b, a, (1.0, 1.0, 1.0))


def test_hd95_spacing_is_in_ijk_order():
    spacing = (2.0, 1.0, 1.0)  # i (last array axis) is coarse
    a = _ball((30, 30, 24), (15.0, 15.0, 20.0), 9.0, spacing)
    b = _ball((30, 30, 24), (15.0, 15.0, 26.0), 9.0, spacing)  # 6 mm = 3 voxels along i
    assert abs(M.hd95(a, b, spacing) - 6.0) <= 2.0
    assert np.array_equal(a, np.roll(b, -3, axis=2))
    # Reading the spacing in array order would measure 3 mm instead.
    assert M.hd95(a, b, spacing) > 4.5


def _brute_surface(mask):
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded.copy()
    for ax in range(mask.ndim):
        interior &= np.roll(padded, 1, axis=ax) & np.roll(padded, -1, axis=ax)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    return mask & ~interior[inner]


def test_hd95_matches_brute_force():
    rng = np.random.default_rng(11)
    a = ndimage.gaussian_filter(rng.random((12, 14, 10)), 1.5) > 0.5
    b = ndimage.gaussian_filter(rng.random((12, 14, 10)), 1.5) > 0.5
    assert a.any() and b.any()
    spacing = (0.8, 1.3, 2.1)  # (i, j, k)
    scale = np.array(spacing[::-1])
    pa = np.argwhere(_brute_surface(a)) * scale
    pb = np.argwhere(_brute_surface(b)) * scale
    d = cdist(pa, pb)
    expected = max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))
    assert M.hd95(a, b, spacing) == pytest.approx(expected, abs=1e-9)


def test_hd95_empty_conventions_and_2d():
    empty = np.zeros((10, 10), bool)
    some = empty.copy()
    some[2:5, 2:5] = True
    assert M.hd95(empty, empty, (1.0, 1.0)) == 0.0
    assert M.hd95(some, empty, (1.0, 1.0)) == math.inf
    assert M.hd95(empty, some, (1.0, 1.0)) == math.inf
    assert M.hd95(some, some, (1.0, 1.0)) == 0.0
    moved = np.roll(some, 2, axis=1)  # axis 1 of a 2D array is i
    assert M.hd95(some, moved, (0.5, 3.0)) == pytest.approx(1.0)
    with pytest.raises(InputError, match="spacing has 3 values"):
        M.hd95(some, moved, (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="positive"):
        M.hd95(some, moved, (0.0, 1.0))


# -------------------------------------------------------------------------------- bad inputs


def _image_fns():
    return [
        ("normalize", M.normalize_by_reference),
        ("psnr", M.psnr),
        ("ssim", M.ssim),
        ("volume_metrics", M.volume_metrics),
        ("mmd", lambda r, g: M.mmd_linear([r], [g])),
    ]


@pytest.mark.parametrize("name,fn", _image_fns())
def test_image_metrics_reject_bad_inputs(name, fn):
    res, gt = _pair((8, 9, 10), 12)
    with pytest.raises(InputError, match="shape"):
        fn(res[:, :, :9], gt)
    bad = res.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="1 NaN"):
        fn(bad, gt)
    bad = gt.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(InputError, match="1 infinite"):
        fn(res, bad)
    with pytest.raises(InputError, match="constant"):
        fn(res, np.full(gt.shape, 3.0))
    with pytest.raises(InputError, match="real numbers"):
        fn(res.astype(np.complex128), gt)


@pytest.mark.parametrize("fn", [M.psnr, M.ssim, M.volume_metrics])
def test_masked_metrics_reject_bad_masks(fn):
    res, gt = _pair((8, 9, 10), 13)
    with pytest.raises(InputError, match="is empty"):
        fn(res, gt, mask=np.zeros(gt.shape, bool))
    with pytest.raises(InputError, match="boolean"):
        fn(res, gt, mask=np.ones(gt.shape, np.uint8))
    with pytest.raises(InputError, match="boolean"):
        fn(res, gt, mask=(gt > gt.mean()).astype(float))
    with pytest.raises(InputError, match="shape"):
        fn(res, gt, mask=np.ones((8, 9, 9), bool))


def test_ssim_rejects_small_or_wrong_dimensionality():
    res, gt = _pair((6, 9, 10), 14)
    with pytest.raises(InputError, match="at least 7"):
        M.ssim(res, gt)
    res, gt = _pair((8, 8, 8, 8), 15)
    with pytest.raises(InputError, match="2D or 3D"):
        M.ssim(res, gt)


def test_segmentation_metrics_reject_bad_inputs():
    m = np.zeros((4, 5), bool)
    with pytest.raises(InputError, match="boolean"):
        M.dice(m.astype(np.uint8), m)
    with pytest.raises(InputError, match="boolean"):
        M.hd95(m, m.astype(int), (1.0, 1.0))
    with pytest.raises(InputError, match="shape"):
        M.dice(m, np.zeros((4, 6), bool))
    with pytest.raises(InputError, match="integer label map"):
        M.region_dice(m.astype(float), m.astype(int), "brats2021")
    with pytest.raises(InputError, match="shape"):
        M.region_dice(np.zeros((3,), int), np.zeros((4,), int), "brats2021")
    with pytest.raises(InputError, match="constant"):
        M.foreground_mask_from_reference(np.zeros((3, 3)))


# -------------------------------------------------------------------------- inputs untouched


def test_inputs_are_not_modified():
    res, gt = _pair((9, 10, 11), 16)
    res32 = res.astype(np.float32)
    mask = gt > np.median(gt)
    labels_p = np.array([[0, 1], [2, 4]])
    labels_t = np.array([[1, 1], [4, 0]])
    saved = [a.copy() for a in (res, gt, res32, mask, labels_p, labels_t)]

    M.normalize_by_reference(res, gt)
    M.normalize_by_reference(res32, gt)
    M.psnr(res, gt, mask=mask)
    M.ssim(res32, gt, mask=mask)
    M.volume_metrics(res, gt, mask=mask)
    M.foreground_mask_from_reference(gt)
    M.mmd_linear([res, res32], [gt, gt])
    M.dice(mask, ~mask)
    M.hd95(mask, ~mask, (1.0, 2.0, 3.0))
    M.region_dice(labels_p, labels_t, "brats2021")

    for before, after in zip(saved, (res, gt, res32, mask, labels_p, labels_t)):
        assert after.dtype == before.dtype
        np.testing.assert_array_equal(after, before)
