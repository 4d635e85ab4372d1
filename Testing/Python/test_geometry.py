"""Tests of the pure IJK->RAS arithmetic in ScoreFusionLib.geometry.

Expected values are computed here from first principles (direction columns, spacing,
origin, the cell-centred box), never from the function under test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
from nibabel.orientations import aff2axcodes

from ScoreFusionLib.errors import GeometryError
from ScoreFusionLib.geometry import (
    LPS_TO_RAS,
    compose,
    decompose,
    factors_for_spacing,
    low_resolution_affine,
    lps_to_ras,
    obliquity_degrees,
    orientation_codes,
    ras_to_lps,
    shift_affine,
    super_resolution_affine,
    super_resolution_grid,
    validate_affine,
    voxel_to_ras,
)

TOL_MM = 1e-9


def _parts(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent split of a matrix into unit direction columns, spacing and origin."""
    block = np.asarray(m, dtype=np.float64)[:3, :3]
    spacing = np.sqrt((block**2).sum(axis=0))
    return block / spacing, spacing, np.asarray(m, dtype=np.float64)[:3, 3]


def _map(m: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Continuous IJK (N, 3) -> RAS by explicit per-axis steps from the voxel-(0,0,0) centre."""
    d, s, o = _parts(m)
    ijk = np.asarray(ijk, dtype=np.float64)
    return o + sum(np.outer(ijk[:, a] * s[a], d[:, a]) for a in range(3))


def _all_indices(shape_ijk: tuple[int, ...], offset: float = 0.0) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape_ijk], indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1) + offset


def _random_sr_case(rng: np.random.Generator, make_affine: Callable[..., np.ndarray]):
    m = make_affine(40.0)
    shape = tuple(int(x) for x in rng.integers(1, 6, size=3))
    factors = tuple(int(x) for x in rng.integers(1, 5, size=3))
    return m, shape, factors


# ---------------------------------------------------------------- super-resolution grid


def test_sr_grid_covers_exactly_the_same_box_and_corner_lattice(rng, make_affine):
    for _ in range(40):
        m, shape, f = _random_sr_case(rng, make_affine)
        d, s, o = _parts(m)
        hr_shape, m_hr = super_resolution_grid(shape, m, f)
        assert hr_shape == tuple(n * k for n, k in zip(shape, f))
        assert all(isinstance(n, int) for n in hr_shape)

        # Every LR voxel corner (corner index c = 0..n along each axis, i.e. o + D s (c - 1/2)),
        # the outer box corners included, must be an HR voxel corner (HR corner index f c).
        corners = _all_indices(tuple(n + 1 for n in shape))
        lr_corners = o + (corners - 0.5) * s @ d.T
        hr_corners = voxel_to_ras(m_hr, corners * np.asarray(f) - 0.5)
        np.testing.assert_allclose(hr_corners, lr_corners, rtol=0, atol=TOL_MM)

        # The outer box explicitly: o - D s / 2 and the far corner.
        near = o - d @ s / 2
        far = o + d @ (s * (np.asarray(shape) - 0.5))
        _, s_hr, o_hr = _parts(m_hr)
        np.testing.assert_allclose(o_hr - d @ s_hr / 2, near, rtol=0, atol=TOL_MM)
        np.testing.assert_allclose(o_hr + d @ (s_hr * (np.asarray(hr_shape) - 0.5)), far, rtol=0, atol=TOL_MM)


def test_sr_spacing_and_direction(rng, make_affine):
    for _ in range(20):
        m, shape, f = _random_sr_case(rng, make_affine)
        d, s, _ = _parts(m)
        _, m_hr = super_resolution_grid(shape, m, f)
        d_hr, s_hr, _ = _parts(m_hr)
        np.testing.assert_allclose(s_hr, s / np.asarray(f), rtol=1e-12)
        np.testing.assert_allclose(d_hr, d, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(m_hr[3], [0, 0, 0, 1])
        assert m_hr.dtype == np.float64


def test_hr_voxel_centre_is_lr_continuous_index(rng, make_affine):
    for _ in range(25):
        m, shape, f = _random_sr_case(rng, make_affine)
        hr_shape, m_hr = super_resolution_grid(shape, m, f)
        j = _all_indices(hr_shape)
        expected = _map(m, (j + 0.5) / np.asarray(f) - 0.5)
        np.testing.assert_allclose(voxel_to_ras(m_hr, j), expected, rtol=0, atol=TOL_MM)


def test_hr_children_average_to_lr_centre_and_lie_inside_parent(rng, make_affine):
    for _ in range(25):
        m, shape, f = _random_sr_case(rng, make_affine)
        hr_shape, m_hr = super_resolution_grid(shape, m, f)
        j = _all_indices(hr_shape)
        centres = voxel_to_ras(m_hr, j).reshape(*hr_shape, 3)
        # Axis a of the HR grid splits into (LR index, child index): average over the children.
        grouped = centres.reshape(shape[0], f[0], shape[1], f[1], shape[2], f[2], 3)
        mean = grouped.mean(axis=(1, 3, 5)).reshape(-1, 3)
        np.testing.assert_allclose(mean, _map(m, _all_indices(shape)), rtol=0, atol=TOL_MM)

        # Nearest repeat: HR voxel j lies inside LR voxel j // f (not on a boundary).
        d, s, o = _parts(m)
        lr_index = np.linalg.solve(d * s, (centres.reshape(-1, 3) - o).T).T
        np.testing.assert_array_equal(np.rint(lr_index), j // np.asarray(f))
        assert np.all(np.abs(lr_index - np.rint(lr_index)) < 0.5 - 1e-6)


def test_slicer_doc_example_thick_axial_slices():
    m = np.diag([1.0, 1.0, 3.0, 1.0])
    m[:3, 3] = (-12.5, 7.0, 30.0)
    shape, m_hr = super_resolution_grid((10, 11, 12), m, (1, 1, 2))
    assert shape == (10, 11, 24)
    np.testing.assert_allclose(np.linalg.norm(m_hr[:3, :3], axis=0), [1.0, 1.0, 1.5], rtol=0, atol=1e-15)
    np.testing.assert_allclose(m_hr[:3, 3], [-12.5, 7.0, 29.25], rtol=0, atol=1e-12)


def test_scalar_factor_applies_to_every_axis():
    m = np.diag([2.0, 4.0, 6.0, 1.0])
    shape, m_hr = super_resolution_grid((3, 4, 5), m, 2)
    assert shape == (6, 8, 10)
    np.testing.assert_allclose(np.diag(m_hr)[:3], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(m_hr[:3, 3], [-0.5, -1.0, -1.5], atol=1e-15)


def test_low_resolution_affine_inverts_super_resolution_affine(rng, make_affine):
    for _ in range(30):
        m = make_affine(40.0)
        f = rng.uniform(0.5, 5.0, size=3)
        if rng.random() < 0.5:
            f = np.rint(f).clip(1)
        scale = 1e-12 * max(1.0, float(np.abs(m).max()))
        np.testing.assert_allclose(low_resolution_affine(super_resolution_affine(m, f), f), m, atol=scale)
        np.testing.assert_allclose(super_resolution_affine(low_resolution_affine(m, f), f), m, atol=scale)
        # Independently: the LR grid of factor f has voxel (0,0,0) centred on HR index (f - 1)/2.
        lr = low_resolution_affine(m, f)
        np.testing.assert_allclose(lr[:3, 3], _map(m, ((f - 1) / 2)[None])[0], rtol=0, atol=TOL_MM)


@pytest.mark.parametrize("factors", [(2, 2.5, 1), (0, 1, 1), (1, -2, 1), (1, 1, float("nan")), 0.5])
def test_super_resolution_grid_rejects_bad_factors(factors):
    with pytest.raises(GeometryError, match="integers >= 1") as info:
        super_resolution_grid((4, 4, 4), np.eye(4), factors)
    assert "np." not in str(info.value)  # plain numbers, not numpy scalar reprs


@pytest.mark.parametrize("factors", [(0, 1, 1), (1, -1, 1), (1, 1, float("inf"))])
def test_affine_scalers_reject_non_positive_factors(factors):
    with pytest.raises(GeometryError, match="positive") as info:
        super_resolution_affine(np.eye(4), factors)
    assert "np." not in str(info.value)
    with pytest.raises(GeometryError, match="positive"):
        low_resolution_affine(np.eye(4), factors)


def test_factors_for_spacing_integer_ratios(rng, make_affine):
    for _ in range(20):
        m = make_affine(40.0)
        _, s, _ = _parts(m)
        want = tuple(int(x) for x in rng.integers(1, 6, size=3))
        got = factors_for_spacing(m, s / np.asarray(want))
        assert got == want
        assert all(type(x) is int for x in got)


def test_factors_for_spacing_follows_ijk_axes_of_a_permuted_grid():
    # IJK axis k points along R with 3 mm; i along S and j along A with 1 mm.
    m = np.zeros((4, 4))
    m[2, 0], m[1, 1], m[0, 2], m[3, 3] = 1.0, 1.0, 3.0, 1.0
    assert factors_for_spacing(m, (1.0, 1.0, 1.5)) == (1, 1, 2)
    assert factors_for_spacing(m, (1.0, 1.0, 1.0)) == (1, 1, 3)
    assert factors_for_spacing(m, (1.0, 1.0, 3.0)) == (1, 1, 1)


def test_factors_for_spacing_names_nearest_reachable_spacing():
    m = np.diag([1.0, 1.0, 3.0, 1.0])
    with pytest.raises(GeometryError, match=r"nearest reachable spacing is \(1\.0, 1\.0, 0\.75\)"):
        factors_for_spacing(m, (1.0, 1.0, 0.7))
    # Coarser than the input cannot be reached by splitting voxels.
    with pytest.raises(GeometryError, match=r"nearest reachable spacing is \(1\.0, 1\.0, 3\.0\)"):
        factors_for_spacing(m, (1.0, 1.0, 6.0))


@pytest.mark.parametrize("target", [(1.0, 1.0), (1.0, 1.0, 0.0), (1.0, -1.0, 1.0), (1.0, 1.0, float("nan"))])
def test_factors_for_spacing_rejects_bad_targets(target):
    with pytest.raises(GeometryError):
        factors_for_spacing(np.eye(4), target)


# ---------------------------------------------------------------- LPS <-> RAS


def test_lps_ras_is_an_exact_involution(make_affine):
    for _ in range(10):
        m = make_affine(40.0)
        once = lps_to_ras(m)
        assert once.tobytes() != m.tobytes()
        assert lps_to_ras(once).tobytes() == m.tobytes()
        assert ras_to_lps(lps_to_ras(m)).tobytes() == m.tobytes()
    np.testing.assert_array_equal(LPS_TO_RAS, np.diag([-1.0, -1.0, 1.0, 1.0]))


def test_lps_to_ras_known_point():
    # LPS grid: 2 mm voxels, axes along L, P, S; voxel (0,0,0) at LPS (10, 20, 30).
    m_lps = np.diag([2.0, 2.0, 2.0, 1.0])
    m_lps[:3, 3] = (10.0, 20.0, 30.0)
    m_ras = lps_to_ras(m_lps)
    # Voxel (1, 2, 3) is at LPS (12, 24, 36), i.e. 12 mm left, 24 mm posterior: RAS (-12, -24, 36).
    np.testing.assert_array_equal(voxel_to_ras(m_ras, np.array([[1.0, 2.0, 3.0]])), [[-12.0, -24.0, 36.0]])
    assert orientation_codes(m_ras) == "LPS"


def test_lps_to_ras_agrees_with_simpleitk(make_affine):
    sitk = pytest.importorskip("SimpleITK")
    for _ in range(5):
        m_lps = make_affine(40.0)
        d, s, o = _parts(m_lps)
        img = sitk.Image(5, 6, 7, sitk.sitkUInt8)
        img.SetSpacing(tuple(float(x) for x in s))
        img.SetDirection(tuple(float(x) for x in d.ravel()))
        img.SetOrigin(tuple(float(x) for x in o))
        m_ras = lps_to_ras(m_lps)
        for idx in [(0, 0, 0), (4, 5, 6), (1, 3, 2)]:
            lps = np.array(img.TransformContinuousIndexToPhysicalPoint([float(x) for x in idx]))
            ras = voxel_to_ras(m_ras, np.array([idx], dtype=float))[0]
            np.testing.assert_allclose(ras, lps * [-1.0, -1.0, 1.0], rtol=0, atol=1e-9)


# ---------------------------------------------------------------- decompose / compose / validate


def test_decompose_compose_round_trip(make_affine):
    for _ in range(20):
        m = make_affine(60.0)
        d, s, o = decompose(m)
        d_ref, s_ref, o_ref = _parts(m)
        np.testing.assert_allclose(d, d_ref, rtol=0, atol=1e-14)
        np.testing.assert_allclose(s, s_ref, rtol=1e-14)
        np.testing.assert_array_equal(o, o_ref)
        np.testing.assert_allclose(np.linalg.norm(d, axis=0), 1.0, rtol=0, atol=1e-14)
        np.testing.assert_allclose(compose(d, s, o), m, rtol=0, atol=1e-12)
        d2, s2, o2 = decompose(compose(d_ref, s_ref, o_ref))
        np.testing.assert_allclose(d2, d_ref, atol=1e-14)
        np.testing.assert_allclose(s2, s_ref, rtol=1e-14)
        np.testing.assert_array_equal(o2, o_ref)


def test_compose_scales_columns_not_rows():
    d = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    m = compose(d, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    expected = np.array([[0, 2, 0, 4], [0, 0, -3, 5], [1, 0, 0, 6], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_array_equal(m, expected)


def test_validate_affine_returns_float64_copy():
    src = np.eye(4, dtype=np.int32) * 2
    src[3, 3] = 1
    out = validate_affine(src)
    assert out.dtype == np.float64 and out.shape == (4, 4)
    out[0, 0] = 99.0
    assert src[0, 0] == 2
    m = np.eye(4)
    assert validate_affine(m) is not m
    np.testing.assert_array_equal(validate_affine(m.tolist()), m)


_ZERO_COL = np.eye(4)
_ZERO_COL[:3, 1] = 0.0
_COLLINEAR = np.eye(4)
_COLLINEAR[:3, 2] = (1.0, 0.0, 0.0)
_COPLANAR = np.eye(4)
_COPLANAR[:3, 2] = (1.0, 1.0, 0.0)
_NAN = np.eye(4)
_NAN[1, 3] = np.nan
_INF = np.eye(4)
_INF[0, 0] = np.inf
_BAD_SCALE = np.eye(4)
_BAD_SCALE[3, 3] = 2.0
_BAD_ROW = np.eye(4)
_BAD_ROW[3, 0] = 0.1
_COMPLEX = np.eye(4).astype(complex)
_COMPLEX[0, 3] = 1.0 + 2.0j


@pytest.mark.parametrize(
    "bad",
    [
        _ZERO_COL,
        _COLLINEAR,
        _COPLANAR,
        np.zeros((4, 4)),
        _NAN,
        _INF,
        np.eye(3),
        np.eye(4)[:3],
        np.eye(5),
        np.eye(4)[None],
        np.ones(16),
        _BAD_SCALE,
        _BAD_ROW,
        [["a"] * 4] * 4,
        _COMPLEX,
    ],
    ids=[
        "zero-column", "collinear", "coplanar", "zeros", "nan", "inf", "3x3", "3x4", "5x5", "1x4x4",
        "flat16", "last-row-scale", "last-row-shear", "strings", "complex",
    ],
)
def test_validate_affine_rejects(bad):
    with pytest.raises(GeometryError):
        validate_affine(bad)


def test_validate_affine_accepts_tiny_voxels():
    m = np.diag([1e-3, 1e-3, 1e-3, 1.0])
    np.testing.assert_array_equal(validate_affine(m), m)


# ---------------------------------------------------------------- orientation and obliquity


def test_orientation_codes_match_nibabel(make_affine):
    seen = set()
    for _ in range(300):
        m = make_affine(40.0)
        codes = orientation_codes(m)
        assert codes == "".join(aff2axcodes(m))
        seen.add(codes)
    assert len(seen) >= 30  # the random matrices really cover permutations and flips


@pytest.mark.parametrize(
    ("columns", "codes"),
    [
        ((0, 1, 2, 1, 1, 1), "RAS"),
        ((0, 1, 2, -1, -1, 1), "LPS"),
        ((1, 2, 0, 1, -1, -1), "AIL"),
        ((2, 0, 1, -1, 1, -1), "IRP"),
    ],
)
def test_orientation_codes_known(columns, codes):
    m = np.eye(4)
    m[:3, :3] = 0.0
    for a in range(3):
        m[columns[a], a] = columns[3 + a] * (a + 1.5)
    assert orientation_codes(m) == codes == "".join(aff2axcodes(m))


def test_obliquity_is_zero_for_axis_aligned(make_affine):
    for _ in range(20):
        assert obliquity_degrees(make_affine(0.0)) == pytest.approx(0.0, abs=1e-9)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    b, e = [x for x in range(3) if x != axis]
    r = np.eye(3)
    r[b, b], r[b, e], r[e, b], r[e, e] = c, -s, s, c
    return r


@pytest.mark.parametrize("degrees", [1.0, 7.5, 20.0, 33.0, 44.0])
def test_obliquity_equals_single_axis_rotation_angle(make_affine, degrees):
    for axis, sign in itertools.product(range(3), (1.0, -1.0)):
        m = make_affine(0.0)
        m[:3, :3] = _rotation(axis, sign * degrees) @ m[:3, :3]
        assert obliquity_degrees(m) == pytest.approx(degrees, abs=1e-6)
        # Small rotations do not change the nearest axes.
        assert orientation_codes(m) == "".join(aff2axcodes(m))


# ---------------------------------------------------------------- index helpers


def test_voxel_to_ras_and_shift_affine(rng, make_affine):
    for _ in range(10):
        m = make_affine(40.0)
        ijk = rng.uniform(-5, 20, size=(50, 3))
        np.testing.assert_allclose(voxel_to_ras(m, ijk), _map(m, ijk), rtol=0, atol=TOL_MM)
        start = rng.integers(-10, 10, size=3)
        shifted = shift_affine(m, start)
        np.testing.assert_allclose(voxel_to_ras(shifted, ijk), _map(m, ijk + start), rtol=0, atol=TOL_MM)
        np.testing.assert_array_equal(shifted[:3, :3], m[:3, :3])
