"""Tests of Volume and of the exact grid operations (reorientation, crop and pad)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from nibabel.orientations import aff2axcodes

from ScoreFusionLib.errors import GeometryError, InputError
from ScoreFusionLib.geometry import super_resolution_grid
from ScoreFusionLib.grid import crop_or_pad, permute_flip_array, reorient_to_ras
from ScoreFusionLib.volume import Volume, require_same_grid, require_usable_intensities

TOL_MM = 1e-9


def _positions(vol: Volume) -> np.ndarray:
    """RAS centre of every voxel, in the array's C order, from the matrix by hand."""
    k, j, i = np.indices(vol.array.shape, dtype=np.float64)
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    m = np.asarray(vol.affine)
    return ijk @ m[:3, :3].T + m[:3, 3]


def _by_value(vol: Volume) -> np.ndarray:
    """Positions sorted by (unique) voxel value: a canonical (value -> position) table."""
    order = np.argsort(vol.array.ravel(), kind="stable")
    return _positions(vol)[order]


def _unique_volume(rng: np.random.Generator, affine: np.ndarray, shape_kji: tuple[int, ...]) -> Volume:
    values = rng.permutation(int(np.prod(shape_kji))).astype(np.float64) + 0.25
    return Volume(values.reshape(shape_kji), affine)


def _random_shape(rng: np.random.Generator, low: int = 2, high: int = 8) -> tuple[int, int, int]:
    return tuple(int(x) for x in rng.integers(low, high, size=3))


# ---------------------------------------------------------------- Volume


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 5), (0, 3, 3), (3, 0, 3), (3,)])
def test_volume_rejects_non_3d_or_empty(shape):
    with pytest.raises(InputError, match=re.escape(str(shape))):
        Volume(np.zeros(shape), np.eye(4))


def test_volume_rejects_non_array():
    with pytest.raises(InputError, match="list"):
        Volume([[[1.0]]], np.eye(4))


def test_volume_rejects_bad_affine():
    with pytest.raises(GeometryError):
        Volume(np.zeros((2, 2, 2)), np.zeros((4, 4)))


def test_volume_affine_is_read_only_float64_copy():
    m = np.diag([2, 3, 4, 1]).astype(np.int64)
    vol = Volume(np.zeros((2, 3, 4)), m)
    assert vol.affine.dtype == np.float64
    assert not vol.affine.flags.writeable
    with pytest.raises(ValueError):
        vol.affine[0, 0] = 7.0
    m[0, 0] = 9
    m[:3, 3] = 5
    np.testing.assert_array_equal(vol.affine, np.diag([2.0, 3.0, 4.0, 1.0]))
    mf = np.eye(4)
    vol2 = Volume(np.zeros((2, 2, 2)), mf)
    mf[0, 3] = 100.0
    assert vol2.affine[0, 3] == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        vol2.affine = np.eye(4)  # type: ignore[misc]


def test_volume_properties(make_affine):
    m = make_affine(30.0)
    vol = Volume(np.zeros((4, 5, 6)), m)
    assert vol.shape_ijk == (6, 5, 4)
    assert all(type(n) is int for n in vol.shape_ijk)
    spacing = np.sqrt((m[:3, :3] ** 2).sum(axis=0))
    np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-14)
    np.testing.assert_allclose(vol.direction, m[:3, :3] / spacing, atol=1e-14)
    origin = vol.origin
    np.testing.assert_array_equal(origin, m[:3, 3])
    origin[0] += 1.0  # a copy: changing it leaves the volume alone
    np.testing.assert_array_equal(vol.origin, m[:3, 3])


def test_with_array(make_affine):
    vol = Volume(np.zeros((2, 3, 4)), make_affine())
    new = vol.with_array(np.ones((2, 3, 4), dtype=np.float32))
    assert new.affine.tobytes() == vol.affine.tobytes()
    assert new.array.dtype == np.float32
    with pytest.raises(GeometryError, match=re.escape("(4, 3, 2)")):
        vol.with_array(np.ones((4, 3, 2)))


def test_same_grid_and_require_same_grid_tolerances(make_affine):
    m = make_affine(30.0)
    a = Volume(np.zeros((3, 4, 5)), m)
    near = m.copy()
    near[0, 3] += 5e-4
    far = m.copy()
    far[1, 1] += 2e-3
    b, c = Volume(np.ones((3, 4, 5)), near), Volume(np.ones((3, 4, 5)), far)
    assert a.same_grid(b) and b.same_grid(a)
    assert not a.same_grid(c)
    assert a.same_grid(c, atol_mm=5e-3)
    assert not a.same_grid(b, atol_mm=1e-4)
    assert not a.same_grid(Volume(np.zeros((3, 5, 4)), m))

    require_same_grid({})
    require_same_grid({"t1": a})
    require_same_grid({"t1": a, "t2": b})
    with pytest.raises(GeometryError, match=r"'flair' and 't1'.*resample"):
        require_same_grid({"t1": a, "t2": b, "flair": c})
    require_same_grid({"t1": a, "flair": c}, atol_mm=5e-3)
    with pytest.raises(GeometryError, match=r"'t2' has shape \(4, 5, 3\).*'t1' has \(5, 4, 3\)"):
        require_same_grid({"t1": a, "t2": Volume(np.zeros((3, 5, 4)), m)})


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (np.array([[[1.0, np.nan], [2.0, 3.0]]]), "1 NaN and 0 infinite"),
        (np.array([[[1.0, np.inf], [-np.inf, 3.0]]]), "0 NaN and 2 infinite"),
        (np.full((2, 2, 2), 7.0), "constant"),
        (np.zeros((2, 2, 2), dtype=np.int16), "constant"),
        (np.array([[[1 + 1j, 2]]]), "real numbers"),
        (np.array([[["a", "b"]]]), "real numbers"),
        (np.array([[[1.0, None]]], dtype=object), "real numbers"),
        (np.zeros((0, 2, 2)), "empty"),
    ],
)
def test_require_usable_intensities_rejects(array, pattern):
    with pytest.raises(InputError, match=pattern) as info:
        require_usable_intensities(array, name="T1ce")
    assert "T1ce" in str(info.value)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_require_usable_intensities_accepts(dtype):
    require_usable_intensities(np.arange(8, dtype=dtype).reshape(2, 2, 2))


# ---------------------------------------------------------------- permute/flip and reorientation


def test_permute_flip_array_against_explicit_indexing(rng):
    arr = rng.random((3, 4, 5))  # (k, j, i)
    out = permute_flip_array(arr, (2, 0, 1), (True, False, True))
    # New IJK axes: new i = old k (flipped), new j = old i, new k = old j (flipped).
    n_i, n_j, n_k = 5, 4, 3
    assert out.shape == (n_j, n_i, n_k)  # (new k, new j, new i) = (old j, old i, old k)
    for ni in range(n_k):
        for nj in range(n_i):
            for nk in range(n_j):
                old_i, old_j, old_k = nj, n_j - 1 - nk, n_k - 1 - ni
                assert out[nk, nj, ni] == arr[old_k, old_j, old_i]
    assert out.flags.c_contiguous


def test_reorient_to_ras_keeps_every_voxel_in_place(rng, make_affine):
    seen_perms = set()
    for _ in range(40):
        m = make_affine(30.0)
        vol = _unique_volume(rng, m, _random_shape(rng))
        out, record = reorient_to_ras(vol)
        seen_perms.add((record.perm, record.flips))
        assert "".join(aff2axcodes(out.affine)) == "RAS"
        d = out.affine[:3, :3] / np.linalg.norm(out.affine[:3, :3], axis=0)
        assert np.all(np.argmax(np.abs(d), axis=0) == [0, 1, 2]) and np.all(np.diag(d) > 0)
        # Same multiset of values, each at the same RAS position.
        np.testing.assert_array_equal(np.sort(out.array.ravel()), np.sort(vol.array.ravel()))
        np.testing.assert_allclose(_by_value(out), _by_value(vol), rtol=0, atol=TOL_MM)
        # Same spacing per physical direction, no resampling.
        assert sorted(out.spacing.round(12)) == sorted(vol.spacing.round(12))
        # The recorded obliquity: worst angle between an axis and its nearest RAS axis.
        dv = vol.direction
        expected = np.degrees(np.arccos(np.min(np.max(np.abs(dv), axis=0))))
        assert record.obliquity_deg == pytest.approx(expected, abs=1e-9)
        assert record.original_shape_ijk == vol.shape_ijk
        np.testing.assert_array_equal(record.original_affine, vol.affine)
    assert len(seen_perms) >= 20


def test_reorient_identity_for_ras_input(rng):
    m = np.diag([0.9, 1.1, 3.0, 1.0])
    m[:3, 3] = (-90.1, 12.3, -40.7)
    vol = _unique_volume(rng, m, (4, 5, 6))
    out, record = reorient_to_ras(vol)
    assert record.is_identity
    np.testing.assert_array_equal(out.array, vol.array)
    np.testing.assert_array_equal(out.affine, vol.affine)


def test_undo_restores_array_and_affine_bitwise(rng, make_affine):
    for _ in range(200):
        m = make_affine(40.0)
        dtype = (np.float32, np.int16, np.float64)[int(rng.integers(3))]
        vol = Volume(rng.integers(-1000, 1000, size=_random_shape(rng)).astype(dtype), m)
        out, record = reorient_to_ras(vol)
        back = record.undo(out)
        assert back.array.dtype == vol.array.dtype
        assert back.array.shape == vol.array.shape
        assert back.array.tobytes() == vol.array.tobytes()
        assert back.affine.tobytes() == vol.affine.tobytes()


def test_undo_of_a_super_resolved_grid(rng, make_affine):
    for _ in range(30):
        m = make_affine(30.0)
        vol = _unique_volume(rng, m, _random_shape(rng, 2, 6))
        out, record = reorient_to_ras(vol)
        f = tuple(int(x) for x in rng.integers(1, 4, size=3))  # in reoriented (i, j, k) order
        sr_shape, sr_affine = super_resolution_grid(out.shape_ijk, out.affine, f)
        sr_array = out.array
        for a in range(3):  # nearest repeat along IJK axis a = array axis 2 - a
            sr_array = np.repeat(sr_array, f[a], axis=2 - a)
        sr = Volume(sr_array, sr_affine)
        assert sr.shape_ijk == sr_shape
        back = record.undo(sr)

        # The same SR grid computed directly on the original orientation.
        f_orig = [0, 0, 0]
        for new_axis, old_axis in enumerate(record.perm):
            f_orig[old_axis] = f[new_axis]
        direct_shape, direct_affine = super_resolution_grid(vol.shape_ijk, vol.affine, f_orig)
        assert back.shape_ijk == direct_shape
        np.testing.assert_allclose(back.affine, direct_affine, rtol=0, atol=TOL_MM)
        # Independently: HR voxel j of the original orientation sits at LR index (j + 1/2)/f - 1/2.
        k, j, i = np.indices(back.array.shape, dtype=np.float64)
        lr_ijk = (np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1) + 0.5) / np.array(f_orig) - 0.5
        expected = lr_ijk @ m[:3, :3].T + m[:3, 3]
        np.testing.assert_allclose(_positions(back), expected, rtol=0, atol=TOL_MM)
        direct_array = vol.array
        for a in range(3):
            direct_array = np.repeat(direct_array, f_orig[a], axis=2 - a)
        np.testing.assert_array_equal(back.array, direct_array)


# ---------------------------------------------------------------- crop and pad


def test_brats_centre_crop(make_affine):
    m = make_affine(20.0)
    arr = np.arange(155 * 240 * 240, dtype=np.int32).reshape(155, 240, 240)
    vol = Volume(arr, m)
    out = crop_or_pad(vol, (192, 192, 152))
    assert out.shape_ijk == (192, 192, 152)
    np.testing.assert_array_equal(out.array, arr[1:153, 24:216, 24:216])
    expected_origin = m[:3, :3] @ np.array([24.0, 24.0, 1.0]) + m[:3, 3]
    np.testing.assert_allclose(out.origin, expected_origin, rtol=0, atol=TOL_MM)
    np.testing.assert_array_equal(out.affine[:3, :3], m[:3, :3])
    assert out.array.dtype == np.int32


def test_crop_or_pad_keeps_positions_and_values(rng, make_affine):
    for _ in range(40):
        m = make_affine(40.0)
        vol = _unique_volume(rng, m, _random_shape(rng, 3, 9))
        before = vol.array.copy()
        current = np.array(vol.shape_ijk)
        target = tuple(int(x) for x in rng.integers(1, 12, size=3))
        start = tuple(int(rng.integers(1 - t, c)) for t, c in zip(target, current))  # window overlaps
        fill = None if rng.random() < 0.5 else -5.5
        out = crop_or_pad(vol, target, start_ijk=start, fill=fill)
        np.testing.assert_array_equal(vol.array, before)
        assert out.shape_ijk == target
        expected_fill = vol.array.min() if fill is None else fill

        k, j, i = np.indices(out.array.shape)
        new_ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
        old_ijk = new_ijk + np.array(start)
        inside = np.all((old_ijk >= 0) & (old_ijk < current), axis=1)
        values = out.array.ravel()
        old_kji = (old_ijk[inside, 2], old_ijk[inside, 1], old_ijk[inside, 0])
        np.testing.assert_array_equal(values[inside], vol.array[old_kji])
        assert np.all(values[~inside] == expected_fill)
        # Kept voxels sit where they were.
        old_flat = np.ravel_multi_index(old_kji, vol.array.shape)
        np.testing.assert_allclose(_positions(out)[inside], _positions(vol)[old_flat], rtol=0, atol=TOL_MM)


def test_pad_uses_minimum_and_centred_default_start():
    arr = np.full((2, 3, 4), 10.0)
    arr[0, 0, 0] = -3.0
    vol = Volume(arr, np.eye(4))
    out = crop_or_pad(vol, (8, 5, 2))  # i: pad 4, j: pad 2, k: crop 2 -> 2 (no-op)
    # Centred start (n - target) // 2 = (-2, -1, 0).
    np.testing.assert_array_equal(out.origin, [-2.0, -1.0, 0.0])
    np.testing.assert_array_equal(out.array[:, 1:4, 2:6], arr)
    assert np.count_nonzero(out.array == -3.0) == 80 - 24 + 1
    out2 = crop_or_pad(vol, (8, 5, 2), fill=0.0)
    assert np.count_nonzero(out2.array == 0.0) == 80 - 24


def test_crop_then_pad_back_restores_kept_region(rng, make_affine):
    for _ in range(20):
        m = make_affine(40.0)
        vol = _unique_volume(rng, m, _random_shape(rng, 4, 10))
        current = np.array(vol.shape_ijk)
        target = tuple(int(rng.integers(1, c + 1)) for c in current)
        start = tuple(int(rng.integers(0, c - t + 1)) for c, t in zip(current, target))
        cropped = crop_or_pad(vol, target, start_ijk=start)
        back = crop_or_pad(cropped, vol.shape_ijk, start_ijk=tuple(-s for s in start), fill=-1.0)
        assert back.shape_ijk == vol.shape_ijk
        np.testing.assert_allclose(back.affine, vol.affine, rtol=0, atol=TOL_MM)
        region = tuple(slice(s, s + t) for s, t in zip(start[::-1], target[::-1]))
        np.testing.assert_array_equal(back.array[region], vol.array[region])
        outside = np.ones(vol.array.shape, dtype=bool)
        outside[region] = False
        assert np.all(back.array[outside] == -1.0)


@pytest.mark.parametrize(
    ("shape", "start"),
    [((2, 2, 2), (4, 0, 0)), ((2, 2, 2), (0, 10, 0)), ((2, 2, 2), (0, 0, -2)), ((3, 3, 3), (-5, 0, 0))],
)
def test_window_missing_the_volume_raises(shape, start):
    vol = Volume(np.zeros((4, 4, 4)), np.eye(4))
    with pytest.raises(GeometryError, match="misses"):
        crop_or_pad(vol, shape, start_ijk=start)


@pytest.mark.parametrize("shape", [(0, 2, 2), (2, -1, 2), (2, 2)])
def test_bad_target_shape_raises(shape):
    with pytest.raises(GeometryError):
        crop_or_pad(Volume(np.zeros((4, 4, 4)), np.eye(4)), shape)
