"""Degradation operators: exact measurement models and data-consistency projections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ScoreFusionLib.degradation import AveragePool, ThickSlice, degradation_from_dict
from ScoreFusionLib.errors import GeometryError, InputError
from ScoreFusionLib.geometry import voxel_to_ras
from ScoreFusionLib.volume import Volume

RNG = np.random.default_rng(1234)


def block_mean(x: np.ndarray, fk: int, fj: int, fi: int) -> np.ndarray:
    """Independent average pooling of the last three axes by reshaping."""
    *lead, k, j, i = x.shape
    r = x.reshape(*lead, k // fk, fk, j // fj, fj, i // fi, fi)
    return r.mean(axis=(-5, -3, -1))


OPERATORS = [
    AveragePool(4),
    AveragePool((2, 1, 4)),
    ThickSlice(axis=2, factor=4),
    ThickSlice(axis=1, factor=3, fwhm=2.0, profile="box"),
    ThickSlice(axis=0, factor=2, fwhm=3.0, offset=0.3),
]


def test_average_pool_matches_block_means_and_nearest_repeat():
    x = RNG.normal(size=(2, 8, 12, 16))
    op = AveragePool((4, 2, 2))  # (i, j, k) factors -> array axes (k, j, i) = (2, 2, 4)
    y = op.degrade(x)
    np.testing.assert_allclose(y, block_mean(x, 2, 2, 4), atol=1e-12)
    lifted = op.lift(y)
    expected = np.repeat(np.repeat(np.repeat(y, 2, axis=-3), 2, axis=-2), 4, axis=-1)
    np.testing.assert_array_equal(lifted, expected)
    np.testing.assert_allclose(op.degrade(lifted), y, atol=1e-12)


@pytest.mark.parametrize("op", OPERATORS, ids=repr)
def test_projection_reproduces_the_measurement(op):
    shape = (3, 12, 12, 16)
    x = RNG.normal(size=shape)
    y = op.degrade(RNG.normal(size=shape))
    p = op.project(x, y)
    np.testing.assert_allclose(op.degrade(p), y, atol=1e-10)
    # float32 numpy and torch give the same constraint to float tolerance
    p32 = op.project(x.astype(np.float32), y.astype(np.float32))
    assert p32.dtype == np.float32
    np.testing.assert_allclose(op.degrade(p32.astype(np.float64)), y, atol=2e-6)
    pt = op.project(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    np.testing.assert_allclose(pt.numpy(), p32, atol=1e-5)


@pytest.mark.parametrize("op", OPERATORS, ids=repr)
def test_projection_is_the_closest_consistent_volume(op):
    shape = (12, 12, 16)
    x = RNG.normal(size=shape)
    y = op.degrade(RNG.normal(size=shape))
    p = op.project(x, y)
    # idempotent
    np.testing.assert_allclose(op.project(p, y), p, atol=1e-10)
    # orthogonal: any other consistent volume z = p + n (A n = 0) is farther from x
    for _ in range(5):
        n = op.project_null(RNG.normal(size=shape))
        np.testing.assert_allclose(op.degrade(n), 0.0, atol=1e-10)
        assert np.linalg.norm(x - p) <= np.linalg.norm(x - (p + n)) + 1e-9
        assert abs(np.sum((x - p) * n)) < 1e-8


def test_soft_projection_strength():
    op = AveragePool(2)
    x = RNG.normal(size=(8, 8, 8))
    y = op.degrade(RNG.normal(size=(8, 8, 8)))
    np.testing.assert_array_equal(op.project(x, y, strength=0.0), x)
    half = op.project(x, y, strength=0.5)
    np.testing.assert_allclose(half, (x + op.project(x, y)) / 2.0, atol=1e-12)
    with pytest.raises(InputError, match="strength"):
        op.project(x, y, strength=1.5)


def test_operators_do_not_modify_inputs():
    op = ThickSlice(axis=2, factor=2)
    x = RNG.normal(size=(8, 4, 4))
    y = op.degrade(RNG.normal(size=(8, 4, 4)))
    x0, y0 = x.copy(), y.copy()
    op.project(x, y)
    op.condition(x)
    op.project_null(x)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)


def test_thick_slice_box_without_gap_is_average_pooling():
    x = RNG.normal(size=(16, 6, 5))
    np.testing.assert_allclose(
        ThickSlice(axis=2, factor=4, profile="box").degrade(x), AveragePool((1, 1, 4)).degrade(x), atol=1e-12
    )


def test_gaussian_profile_rows_are_normalised_and_centred():
    op = ThickSlice(axis=2, factor=4, fwhm=4.0)
    a, _ = op.matrices(2, 64)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
    j = np.arange(64)
    centres = a @ j
    interior = slice(2, -2)  # rows whose profile is not cut by the volume's ends
    np.testing.assert_allclose(centres[interior], (np.arange(16) * 4 + 1.5)[interior], atol=1e-6)
    # FWHM: variance of the sampled Gaussian ~ sigma^2 = (4 / 2.3548)^2
    var = a[8] @ (j - centres[8]) ** 2
    assert abs(np.sqrt(var) - 4.0 / 2.35482) < 0.02


def test_gap_voxels_are_unmeasured_and_untouched_by_projection():
    # 1x1x5 mm acquisition: 4 mm slices with a 1 mm gap on a 1 mm grid
    op = ThickSlice.from_mm(axis=2, hr_spacing_mm=1.0, thickness_mm=4.0, gap_mm=1.0, profile="box")
    assert op.factors == (1, 1, 5)
    assert op.fwhm == pytest.approx(4.0)
    # a centred 4 mm slab leaves half a voxel of gap on each side of every 5 mm period
    a, _ = op.matrices(2, 20)
    np.testing.assert_allclose(a[0, :5], [0.125, 0.25, 0.25, 0.25, 0.125])
    # shifted by half a voxel, the slab covers voxels 0-3 and voxel 4 is never measured
    op = ThickSlice(axis=2, factor=5, fwhm=4.0, profile="box", offset=-0.5)
    a, _ = op.matrices(2, 20)
    unmeasured = np.flatnonzero(a.sum(axis=0) == 0)
    np.testing.assert_array_equal(unmeasured, [4, 9, 14, 19])
    x = RNG.normal(size=(20, 3, 3))
    y = op.degrade(RNG.normal(size=(20, 3, 3)))
    p = op.project(x, y)
    np.testing.assert_array_equal(p[unmeasured], x[unmeasured])


def test_affine_intensity_maps_commute_with_degradation():
    x = RNG.normal(size=(12, 12, 16))
    for op in OPERATORS:
        np.testing.assert_allclose(op.degrade(3.0 * x - 2.0), 3.0 * op.degrade(x) - 2.0, atol=1e-10)


def test_measurement_grid_geometry_is_cell_centred():
    affine = np.array([[0.0, 0.0, -1.0, 10.0], [1.0, 0.0, 0.0, -5.0], [0.0, -1.0, 0.0, 3.0], [0, 0, 0, 1]])
    vol = Volume(RNG.normal(size=(8, 4, 12)), affine)
    op = AveragePool((2, 2, 4))
    lr = op.degrade_volume(vol)
    assert lr.shape_ijk == (6, 2, 2)
    # each LR voxel centre is the mean of its children's centres
    for ijk_lr in [(0, 0, 0), (5, 1, 1), (3, 0, 1)]:
        children = np.array(
            [(ijk_lr[0] * 2 + a, ijk_lr[1] * 2 + b, ijk_lr[2] * 4 + c)
             for a in range(2) for b in range(2) for c in range(4)]
        )
        expected = voxel_to_ras(affine, children).mean(axis=0)
        np.testing.assert_allclose(voxel_to_ras(lr.affine, np.array([ijk_lr]))[0], expected, atol=1e-12)
    # lifting the measurement returns to the original grid
    back = op.lift_volume(lr)
    np.testing.assert_allclose(back.affine, affine, atol=1e-12)
    np.testing.assert_allclose(op.degrade(back.array), lr.array, atol=1e-12)


def test_offset_moves_the_measurement_grid_and_back():
    op = ThickSlice(axis=2, factor=4, offset=0.5)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    lr_affine = op.lr_affine(affine)
    assert lr_affine[2, 3] == pytest.approx(1.5 + 0.5)
    np.testing.assert_allclose(op.hr_affine(lr_affine), affine, atol=1e-12)


def test_serialisation_round_trip():
    for op in OPERATORS:
        clone = degradation_from_dict(op.to_dict())
        x = RNG.normal(size=(12, 12, 16))
        np.testing.assert_array_equal(clone.degrade(x), op.degrade(x))
    with pytest.raises(InputError, match="unknown degradation"):
        degradation_from_dict({"type": "fourier"})


def test_bad_inputs_raise_specific_errors():
    with pytest.raises(GeometryError, match="not a multiple"):
        AveragePool(4).degrade(np.zeros((6, 8, 8)))
    with pytest.raises(InputError, match="last three axes"):
        AveragePool(2).degrade(np.zeros((4, 4)))
    with pytest.raises(InputError, match="axis"):
        ThickSlice(axis=3)
    with pytest.raises(InputError, match="profile"):
        ThickSlice(profile="triangle")
    with pytest.raises(InputError, match="factors"):
        AveragePool((2, 0, 2))
    with pytest.raises(GeometryError, match="whole multiple"):
        ThickSlice.from_mm(axis=2, hr_spacing_mm=1.0, thickness_mm=2.5)
    with pytest.raises(GeometryError, match="rank deficient"):
        ThickSlice(axis=2, factor=2, fwhm=200.0).degrade(np.zeros((16, 2, 2)))
