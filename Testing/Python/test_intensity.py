"""Tests of intensity normalisation, its inverse, and foreground masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ScoreFusionLib.errors import InputError
from ScoreFusionLib.intensity import (
    FOREGROUND_THRESHOLD,
    Normalization,
    fit_minmax,
    fit_normalization,
    fit_percentile,
    foreground_mask,
    head_mask,
    mask_channel,
    otsu_threshold,
)

DTYPES = (np.uint8, np.int16, np.int32, np.float32, np.float64)


def _random(rng: np.random.Generator, dtype, shape=(6, 7, 8)) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -2000), min(info.max, 4000)
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    return (rng.lognormal(3.0, 1.5, size=shape) - 15.0).astype(dtype)


def _map(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return 2.0 * (np.asarray(x, dtype=np.float64) - lo) / (hi - lo) - 1.0


# ---------------------------------------------------------------- min-max


@pytest.mark.parametrize("dtype", DTYPES)
def test_minmax_maps_extremes_exactly(rng, dtype):
    x = _random(rng, dtype)
    norm = fit_minmax(x)
    assert norm.low == float(x.min()) and norm.high == float(x.max())
    assert norm.method == "minmax" and norm.percentiles is None
    y = norm.apply(x)
    assert y.dtype == np.float32  # documented output type
    assert y.shape == x.shape
    assert y.ravel()[np.argmin(x)] == -1.0
    assert y.ravel()[np.argmax(x)] == 1.0
    assert y.min() == -1.0 and y.max() == 1.0
    np.testing.assert_allclose(y, _map(x, x.min(), x.max()), rtol=0, atol=2.0**-23)


@pytest.mark.parametrize("dtype", DTYPES)
def test_invert_is_the_exact_inverse(rng, dtype):
    x = _random(rng, dtype)
    lo, hi = float(x.min()), float(x.max())
    norm = fit_minmax(x)
    x64 = x.astype(np.float64)
    # The map itself, in float64, inverts to 1e-9 relative.
    back = norm.invert(_map(x, lo, hi))
    assert back.dtype == np.float64
    np.testing.assert_allclose(back, x64, rtol=1e-9, atol=1e-9 * (hi - lo))
    # Through apply() the float32 output limits the round trip to float32 resolution of [-1, 1].
    back32 = norm.invert(norm.apply(x))
    assert np.max(np.abs(back32 - x64)) <= 2.0**-24 * (hi - lo) * 1.01
    # Integer data survive the round trip after rounding.
    if np.issubdtype(dtype, np.integer):
        np.testing.assert_array_equal(np.rint(back32).astype(dtype), x)


def test_invert_uses_the_reference_range_formula():
    norm = Normalization(low=-10.0, high=30.0)
    got = norm.invert(np.array([-1.0, 0.0, 1.0, 1.5]))
    np.testing.assert_allclose(got, [-10.0, 10.0, 30.0, 40.0], rtol=0, atol=0)


def test_inputs_are_not_modified(rng):
    x = _random(rng, np.float32)
    mask = x > np.median(x)
    x0, mask0 = x.copy(), mask.copy()
    norm = fit_minmax(x)
    fit_percentile(x, 1.0, 99.0, mask=mask)
    y = norm.apply(x, clip=True)
    y0 = y.copy()
    norm.invert(y)
    mask_channel(y)
    foreground_mask(y)
    otsu_threshold(x)
    head_mask(x)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(mask, mask0)
    np.testing.assert_array_equal(y, y0)


# ---------------------------------------------------------------- percentile


def test_percentile_uses_given_percentiles_without_clipping(rng):
    x = rng.normal(100.0, 30.0, size=(10, 12, 14))
    norm = fit_percentile(x, 2.0, 98.0)
    lo, hi = np.percentile(x, [2.0, 98.0])
    assert norm.low == lo and norm.high == hi
    assert norm.method == "percentile" and norm.percentiles == (2.0, 98.0)
    y = norm.apply(x)
    assert y.min() < -1.0 and y.max() > 1.0  # no clipping unless asked
    np.testing.assert_allclose(y, _map(x, lo, hi), rtol=0, atol=1e-6)
    yc = norm.apply(x, clip=True)
    assert yc.min() == -1.0 and yc.max() == 1.0
    np.testing.assert_allclose(yc, np.clip(_map(x, lo, hi), -1, 1), rtol=0, atol=1e-6)


def test_percentile_respects_mask(rng):
    x = rng.normal(100.0, 30.0, size=(10, 12, 14))
    x[:, :, :4] = 0.0  # background outside the mask
    mask = np.zeros(x.shape, dtype=bool)
    mask[:, :, 4:] = True
    norm = fit_percentile(x, 5.0, 95.0, mask=mask)
    lo, hi = np.percentile(x[mask], [5.0, 95.0])
    assert (norm.low, norm.high) == (lo, hi)
    assert norm.low != np.percentile(x, 5.0)
    # An integer mask means the same voxels (non-zero), not indices.
    assert fit_percentile(x, 5.0, 95.0, mask=mask.astype(np.uint8)) == norm


def test_fit_normalization_dispatch(rng):
    x = rng.normal(size=(5, 6, 7))
    assert fit_normalization(x) == fit_minmax(x)
    pct = fit_normalization(x, "percentile")
    assert (pct.low, pct.high) == tuple(np.percentile(x, [0.5, 99.5]))
    assert pct.percentiles == (0.5, 99.5)
    with pytest.raises(InputError, match="unknown normalisation"):
        fit_normalization(x, "zscore")


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_to_dict_from_dict_round_trip(rng, method):
    norm = fit_normalization(rng.normal(size=(4, 5, 6)) * 1e3, method)
    d = json.loads(json.dumps(norm.to_dict()))
    again = Normalization.from_dict(d)
    assert again == norm
    assert again.low == norm.low and again.high == norm.high  # bitwise through JSON
    assert set(d) == {"low", "high", "method", "percentiles"}


@pytest.mark.parametrize(
    "array",
    [np.full((3, 3, 3), 5.0), np.zeros((2, 2, 2), dtype=np.uint8), np.array([[[1.0, np.nan]]])],
)
def test_unusable_volume_raises(array):
    with pytest.raises(InputError):
        fit_minmax(array)
    with pytest.raises(InputError):
        fit_percentile(array)
    with pytest.raises(InputError):
        otsu_threshold(array)


@pytest.mark.parametrize(
    ("low", "high"), [(50.0, 50.0), (60.0, 40.0), (-1.0, 50.0), (50.0, 100.5), (float("nan"), 90.0)]
)
def test_bad_percentiles_raise(rng, low, high):
    with pytest.raises(InputError, match="percentiles"):
        fit_percentile(rng.normal(size=(3, 4, 5)), low, high)


def test_percentile_without_contrast_or_voxels_raises(rng):
    x = np.zeros((10, 10, 10))
    x[0, 0, :3] = (1.0, 2.0, 3.0)
    with pytest.raises(InputError, match="no contrast"):
        fit_percentile(x, 1.0, 99.0)
    with pytest.raises(InputError, match="selects no voxels"):
        fit_percentile(x, mask=np.zeros(x.shape, dtype=bool))
    with pytest.raises(InputError, match="shape"):
        fit_percentile(x, mask=np.ones((10, 10), dtype=bool))


@pytest.mark.parametrize(("low", "high"), [(1.0, 1.0), (2.0, 1.0), (0.0, float("inf")), (float("nan"), 1.0)])
def test_normalization_rejects_bad_range(low, high):
    with pytest.raises(InputError):
        Normalization(low, high)


# ---------------------------------------------------------------- masks


def test_mask_channel_is_plus_minus_one_with_threshold():
    assert FOREGROUND_THRESHOLD == -0.99
    y = np.array([-1.0, -0.995, -0.99, np.nextafter(-0.99, 0.0), -0.5, 0.0, 1.0, 1.2]).reshape(2, 2, 2)
    out = mask_channel(y)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.ravel(), [-1, -1, -1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(foreground_mask(y), out > 0)


def test_mask_channel_on_brats_like_volume(rng):
    x = np.zeros((8, 9, 10), dtype=np.int16)
    x[2:6, 2:7, 3:8] = rng.integers(50, 900, size=(4, 5, 5))
    out = mask_channel(fit_minmax(x).apply(x))
    assert set(np.unique(out).tolist()) == {-1.0, 1.0}
    np.testing.assert_array_equal(out, np.where(x > 0, 1.0, -1.0))


def test_otsu_separates_a_bimodal_mixture(rng):
    low, high = rng.normal(100.0, 10.0, 6000), rng.normal(300.0, 20.0, 4000)
    x = rng.permutation(np.concatenate([low, high])).reshape(10, 20, 50)
    t = otsu_threshold(x)
    # Any threshold in the empty gap between the modes gives the same split.
    assert 120.0 < t < 240.0
    assert np.mean(low > t) < 0.001 and np.mean(high > t) > 0.999
    skimage_filters = pytest.importorskip("skimage.filters")
    ref = skimage_filters.threshold_otsu(x, nbins=256)
    assert abs(t - ref) <= (x.max() - x.min()) / 256 + 1e-9


def test_head_mask_keeps_largest_component_and_fills_holes(rng):
    shape = (40, 40, 40)
    z, y, x = np.indices(shape)
    dist = np.sqrt((z - 18) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    vol = rng.uniform(0.0, 10.0, size=shape)  # noisy air
    shell = (dist <= 14) & (dist > 11)  # skull: the hollow interior is as dark as the air
    vol[shell] = rng.uniform(90.0, 110.0, size=int(shell.sum()))
    vol[35:38, 2:5, 2:5] = 100.0  # small bright blob far away
    mask = head_mask(vol)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, dist <= 14)
