"""Volume file I/O: exact round trips, LPS<->RAS at the SimpleITK boundary, bad input, atomicity.

Expected values are computed here independently (by hand, with nibabel or with SimpleITK
directly), never taken from the functions under test alone.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ScoreFusionLib import dicom_io
from ScoreFusionLib.errors import GeometryError, InputError, VolumeFileError
from ScoreFusionLib.volume import Volume
from ScoreFusionLib.volume_io import load_volume, save_volume, volume_format

FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
FLIP_LPS = np.diag([-1.0, -1.0, 1.0])
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def _rotation(axis, degrees: float) -> np.ndarray:
    """Rodrigues rotation matrix (written out, to stay independent of the library)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def _affine(direction: np.ndarray, spacing, origin) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = direction * np.asarray(spacing, dtype=np.float64)
    m[:3, 3] = origin
    return m


_PERM_FLIP = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i->A, j->-S, k->-R
AFFINES = {
    "oblique": _affine(_rotation([1, 2, 3], 23.0), (0.9, 1.3, 3.7), (-91.3, 17.25, 44.1)),
    "permuted_flipped": _affine(_PERM_FLIP, (1.1, 0.8, 2.5), (12.0, -101.5, 60.75)),
    "las": _affine(np.diag([-1.0, 1.0, 1.0]), (2.0, 2.0, 2.0), (32.0, -40.0, -16.0)),
    "oblique_permuted_flipped": _affine(
        _rotation([-2, 1, 0.5], 17.0) @ _PERM_FLIP @ np.diag([1.0, -1.0, 1.0]),
        (0.7, 1.9, 1.2),
        (5.5, 130.2, -77.7),
    ),
}


def _as_float32(m: np.ndarray) -> np.ndarray:
    return m.astype(np.float32).astype(np.float64)


def _sample(dtype, shape=(5, 6, 7), seed=0) -> np.ndarray:
    """Random (k, j, i) data including the type's extremes."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        a = (rng.normal(size=shape) * 321.0).astype(dtype)
        a.flat[0], a.flat[1] = -1e4, 2.5e4
        return a
    info = np.iinfo(dtype)
    a = rng.integers(info.min, int(info.max) + 1, size=shape).astype(dtype)
    a.flat[0], a.flat[1] = info.min, info.max
    return a


def _ijk_lps(m_ras: np.ndarray) -> np.ndarray:
    """IJK->LPS matrix, written out: negate the x and y rows."""
    out = m_ras.copy()
    out[:2] *= -1.0
    return out


def _sitk_affine_ras(image) -> np.ndarray:
    """IJK->RAS of a SimpleITK image, computed independently of the library."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = FLIP_LPS @ d @ np.diag(image.GetSpacing())
    m[:3, 3] = FLIP_LPS @ np.array(image.GetOrigin())
    return m


# --------------------------------------------------------------------------- format names


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("a.nii", "nifti"),
        ("a.NII.GZ", "nifti"),
        ("a.nrrd", "nrrd"),
        ("a.nhdr", "nrrd"),
        ("a.mha", "metaimage"),
        ("a.mhd", "metaimage"),
        ("series_out", "dicom"),
    ],
)
def test_volume_format_from_name(name: str, fmt: str) -> None:
    assert volume_format(name) == fmt


def test_existing_directory_is_dicom(tmp_path: Path) -> None:
    (tmp_path / "ser.ies").mkdir()
    assert volume_format(tmp_path / "ser.ies") == "dicom"


@pytest.mark.parametrize("name", ["a.txt", "a.png", "a.nii.bak", "a.dcm"])
def test_unknown_extension_names_supported_formats(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(b"something")
    with pytest.raises(VolumeFileError) as err:
        load_volume(p)
    for listed in (".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", "DICOM"):
        assert listed in str(err.value)
    vol = Volume(np.zeros((2, 2, 2), np.float32), np.eye(4))
    with pytest.raises(VolumeFileError, match="supported"):
        save_volume(vol, tmp_path / ("out_" + name))
    assert not (tmp_path / ("out_" + name)).exists()


# --------------------------------------------------------------------------- voxel round trips


@pytest.mark.parametrize("suffix", FILE_SUFFIXES)
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_exact_voxel_roundtrip(tmp_path: Path, suffix: str, dtype) -> None:
    data = _sample(dtype)
    original = data.copy()
    vol = Volume(data, AFFINES["oblique"])
    out = load_volume(save_volume(vol, tmp_path / f"v{suffix}"))
    assert out.array.dtype == np.dtype(dtype)
    assert out.array.shape == (5, 6, 7)
    np.testing.assert_array_equal(out.array, original)
    assert out.array.dtype.isnative


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_dicom_integer_voxels_exact(tmp_path: Path, dtype) -> None:
    data = _sample(dtype)
    out = load_volume(save_volume(Volume(data, AFFINES["oblique"]), tmp_path / "series"))
    np.testing.assert_array_equal(out.array, data.astype(np.float64))


def test_dicom_integer_range_beyond_int16_is_exact_with_intercept(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(40000, 40000 + 65536, size=(4, 5, 6)).astype(np.int32)
    data.flat[0], data.flat[1] = 40000, 40000 + 65535
    out = load_volume(save_volume(Volume(data, AFFINES["oblique"]), tmp_path / "series"))
    np.testing.assert_array_equal(out.array, data)


def test_dicom_float_voxels_within_half_slope(tmp_path: Path) -> None:
    data = _sample(np.float32)
    lo, hi = float(data.min()), float(data.max())
    half_step = (hi - lo) / 65535.0 / 2.0 * (1.0 + 1e-6)
    out = load_volume(save_volume(Volume(data, AFFINES["oblique"]), tmp_path / "series"))
    err = np.abs(out.array - data.astype(np.float64))
    assert err.max() <= half_step
    assert err.max() > 0.0  # it really is quantised: this data cannot be stored exactly


def test_dtype_policy_float64_and_bool(tmp_path: Path) -> None:
    f64 = np.linspace(-1.0, 1.0, 60).reshape(3, 4, 5)
    b = f64 > 0.1
    out_f = load_volume(save_volume(Volume(f64, np.eye(4)), tmp_path / "f.nrrd"))
    out_b = load_volume(save_volume(Volume(b, np.eye(4)), tmp_path / "b.nii.gz"))
    assert out_f.array.dtype == np.float32
    np.testing.assert_array_equal(out_f.array, f64.astype(np.float32))
    assert out_b.array.dtype == np.uint8
    np.testing.assert_array_equal(out_b.array, b.astype(np.uint8))


# --------------------------------------------------------------------------- geometry round trips


@pytest.mark.parametrize("kind", sorted(AFFINES))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_affine_bitwise_when_float32_representable(tmp_path: Path, kind: str, suffix: str) -> None:
    affine = _as_float32(AFFINES[kind])
    out = load_volume(save_volume(Volume(_sample(np.int16), affine), tmp_path / f"v{suffix}"))
    assert np.array_equal(out.affine, affine)
    hdr = nib.load(str(tmp_path / f"v{suffix}")).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    qform = hdr.get_qform()
    np.testing.assert_allclose(qform, affine, rtol=0, atol=1e-4)  # qform and sform agree


@pytest.mark.parametrize("kind", ["oblique", "permuted_flipped", "oblique_permuted_flipped"])
def test_nifti_affine_within_float32_precision(tmp_path: Path, kind: str) -> None:
    affine = AFFINES[kind]
    assert not np.array_equal(_as_float32(affine), affine)  # the test needs a float64-only affine
    out = load_volume(save_volume(Volume(_sample(np.float32), affine), tmp_path / "v.nii.gz"))
    assert np.max(np.abs(out.affine - affine)) <= 1e-5


def test_nifti_sheared_affine_keeps_sform_and_drops_qform(tmp_path: Path) -> None:
    affine = _as_float32(AFFINES["oblique"])
    affine[:3, 1] += 0.25 * affine[:3, 0]  # shear j towards i
    affine = _as_float32(affine)
    out = load_volume(save_volume(Volume(_sample(np.float32), affine), tmp_path / "s.nii"))
    assert np.array_equal(out.affine, affine)
    hdr = nib.load(str(tmp_path / "s.nii")).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 0
    np.testing.assert_array_equal(hdr.get_sform(), affine)


@pytest.mark.parametrize("kind", sorted(AFFINES))
@pytest.mark.parametrize("suffix", ITK_SUFFIXES)
def test_itk_formats_affine_roundtrip(tmp_path: Path, kind: str, suffix: str) -> None:
    affine = AFFINES[kind]
    out = load_volume(save_volume(Volume(_sample(np.float32), affine), tmp_path / f"v{suffix}"))
    assert np.max(np.abs(out.affine - affine)) <= 1e-9


def _header_fields(text: str, sep: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break
        if sep in line and not line.startswith("#"):
            key, value = line.split(sep, 1)
            fields[key.strip()] = value.strip()
    return fields


def test_nrrd_header_stores_lps(tmp_path: Path) -> None:
    affine = AFFINES["oblique_permuted_flipped"]
    save_volume(Volume(_sample(np.float32), affine), tmp_path / "v.nhdr", description="synthetic T2")
    fields = _header_fields((tmp_path / "v.nhdr").read_text(), ": ")
    assert fields["space"] == "left-posterior-superior"
    assert fields["sizes"] == "7 6 5"
    vectors = [[float(x) for x in v.strip("()").split(",")] for v in fields["space directions"].split()]
    origin = [float(x) for x in fields["space origin"].strip("()").split(",")]
    lps = _ijk_lps(affine)
    np.testing.assert_allclose(np.array(vectors).T, lps[:3, :3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(origin, lps[:3, 3], rtol=0, atol=1e-12)
    assert fields["content"] == "synthetic T2"


def test_metaimage_header_stores_lps(tmp_path: Path) -> None:
    affine = AFFINES["oblique"]
    save_volume(Volume(_sample(np.float32), affine), tmp_path / "v.mhd")
    fields = _header_fields((tmp_path / "v.mhd").read_text(), " = ")
    direction = np.array([float(x) for x in fields["TransformMatrix"].split()]).reshape(3, 3).T
    spacing = np.array([float(x) for x in fields["ElementSpacing"].split()])
    offset = np.array([float(x) for x in fields["Offset"].split()])
    lps = _ijk_lps(affine)
    np.testing.assert_allclose(direction * spacing, lps[:3, :3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(offset, lps[:3, 3], rtol=0, atol=1e-12)


def test_nifti_and_nrrd_of_one_image_agree(tmp_path: Path) -> None:
    """Our NIfTI (nibabel, RAS) and NRRD (SimpleITK, LPS) paths must describe one image."""
    affine = _as_float32(AFFINES["oblique_permuted_flipped"])
    vol = Volume(_sample(np.int16), affine)
    a = load_volume(save_volume(vol, tmp_path / "v.nii.gz"))
    b = load_volume(save_volume(vol, tmp_path / "v.nrrd"))
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, rtol=0, atol=1e-9)
    # ITK's own NIfTI reader converts RAS->LPS itself: it must see what our NRRD stores.
    itk_nifti = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    itk_nrrd = sitk.ReadImage(str(tmp_path / "v.nrrd"))
    np.testing.assert_allclose(itk_nifti.GetOrigin(), itk_nrrd.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(itk_nifti.GetDirection(), itk_nrrd.GetDirection(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(itk_nifti.GetSpacing(), itk_nrrd.GetSpacing(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk_nifti), sitk.GetArrayFromImage(itk_nrrd))


def test_files_from_independent_writers_load_alike(tmp_path: Path) -> None:
    """A nibabel-written NIfTI and a SimpleITK-written NRRD of one image load identically."""
    affine = _as_float32(AFFINES["oblique"])
    kji = _sample(np.int16)
    nib.save(nib.Nifti1Image(np.transpose(kji, (2, 1, 0)), affine), str(tmp_path / "ind.nii"))
    lps = _ijk_lps(affine)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(kji)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(image, str(tmp_path / "ind.nrrd"))
    for name in ("ind.nii", "ind.nrrd"):
        out = load_volume(tmp_path / name)
        np.testing.assert_array_equal(out.array, kji)
        np.testing.assert_allclose(out.affine, affine, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- nibabel fixture


def test_anatomical_fixture_matches_independent_nibabel_read() -> None:
    ref = nib.load(str(ANATOMICAL))
    ref_data = np.asarray(ref.dataobj)
    assert ref_data.dtype.byteorder == ">"  # the fixture really is big-endian
    vol = load_volume(ANATOMICAL)
    assert vol.array.dtype == np.int16 and vol.array.dtype.isnative
    assert vol.array.shape == (25, 41, 33)
    np.testing.assert_array_equal(vol.array, np.transpose(ref_data, (2, 1, 0)))
    np.testing.assert_array_equal(vol.affine, ref.affine)
    np.testing.assert_array_equal(vol.affine[:3, 3], [32.0, -40.0, -16.0])
    assert vol.affine[0, 0] < 0 < vol.affine[1, 1] and vol.affine[2, 2] > 0  # LAS


def test_anatomical_fixture_agrees_with_simpleitk_conventions() -> None:
    vol = load_volume(ANATOMICAL)
    image = sitk.ReadImage(str(ANATOMICAL))
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(vol.affine, _sitk_affine_ras(image), rtol=0, atol=1e-5)


def test_loaded_array_does_not_alias_the_file(tmp_path: Path) -> None:
    p = tmp_path / "a.nii"  # uncompressed: nibabel would memory-map it by default
    data = _sample(np.float32)
    save_volume(Volume(data, np.eye(4)), p)
    first = load_volume(p)
    owner = first.array
    while owner is not None:
        assert not isinstance(owner, np.memmap)
        owner = getattr(owner, "base", None)
    offset = int(nib.load(str(p)).dataobj.offset)
    with open(p, "r+b") as fh:  # change the voxels in place, same inode
        fh.seek(offset)
        fh.write(np.full(data.size, 7.0, dtype="<f4").tobytes())
    np.testing.assert_array_equal(first.array, data)
    first.array[...] = 0.0
    np.testing.assert_array_equal(load_volume(p).array, np.full(data.shape, 7.0, np.float32))
    np.testing.assert_array_equal(load_volume(p).array, load_volume(p).array)


# --------------------------------------------------------------------------- saving leaves inputs alone


@pytest.mark.parametrize("suffix", (*FILE_SUFFIXES, ""))
def test_save_does_not_modify_the_volume(tmp_path: Path, suffix: str) -> None:
    base = _sample(np.int16, shape=(6, 6, 14)).astype(">i2")  # big-endian
    view = base[::-1, :, ::2]  # non-contiguous, reversed
    view.setflags(write=False)
    before = view.copy()
    vol = Volume(view, AFFINES["permuted_flipped"])
    affine_before = vol.affine.copy()
    out = load_volume(save_volume(vol, tmp_path / f"v{suffix}" if suffix else tmp_path / "series"))
    assert vol.array is view and view.dtype == np.dtype(">i2") and not view.flags.writeable
    np.testing.assert_array_equal(view, before)
    np.testing.assert_array_equal(vol.affine, affine_before)
    np.testing.assert_array_equal(out.array, before.astype(np.int16))
    assert out.array.dtype.isnative


def test_descriptions_are_stored(tmp_path: Path) -> None:
    vol = Volume(_sample(np.float32), np.eye(4))
    save_volume(vol, tmp_path / "d.nii.gz", description="ScoreFusion SR x2")
    assert nib.load(str(tmp_path / "d.nii.gz")).header["descrip"].item() == b"ScoreFusion SR x2"
    save_volume(vol, tmp_path / "d.nrrd", description="ScoreFusion SR x2")
    assert sitk.ReadImage(str(tmp_path / "d.nrrd")).GetMetaData("NRRD_content") == "ScoreFusion SR x2"


# --------------------------------------------------------------------------- DICOM

_LONG_VRS = {"OB", "OW", "OF", "SQ", "UT", "UN", "OD", "OL", "UC", "UR", "OV", "SV", "UV"}


def _dicom_tags(path: Path) -> dict[tuple[int, int], bytes]:
    """A minimal explicit-VR little-endian parser, independent of SimpleITK/GDCM."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    pos, tags = 132, {}
    while pos < len(raw):
        group, elem = struct.unpack_from("<HH", raw, pos)
        vr = raw[pos + 4 : pos + 6].decode("ascii")
        if vr in _LONG_VRS:
            length, pos = struct.unpack_from("<I", raw, pos + 8)[0], pos + 12
        else:
            length, pos = struct.unpack_from("<H", raw, pos + 6)[0], pos + 8
        tags[(group, elem)] = raw[pos : pos + length]
        pos += length
    return tags


def _text(tags, group: int, elem: int) -> str:
    return tags[(group, elem)].decode("ascii").rstrip("\0 ")


def _numbers(tags, group: int, elem: int) -> np.ndarray:
    return np.array([float(x) for x in _text(tags, group, elem).split("\\")])


def test_dicom_series_tags_and_geometry(tmp_path: Path) -> None:
    affine = AFFINES["oblique"]  # right-handed
    data = _sample(np.float32)
    save_volume(Volume(data, affine), tmp_path / "series", description="synthetic FLAIR")
    files = sorted((tmp_path / "series").iterdir())
    assert len(files) == data.shape[0]
    lps = _ijk_lps(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    series_uids, sop_uids = set(), set()
    for k, f in enumerate(files):
        tags = _dicom_tags(f)
        assert _text(tags, 0x0008, 0x0060) == "MR"
        assert _text(tags, 0x0008, 0x0016) == "1.2.840.10008.5.1.4.1.1.4"
        assert _text(tags, 0x0008, 0x103E) == "synthetic FLAIR"
        assert int(_text(tags, 0x0020, 0x0013)) == k + 1
        np.testing.assert_allclose(_numbers(tags, 0x0020, 0x0032), lps[:3, 3] + k * lps[:3, 2], atol=1e-6)
        iop = _numbers(tags, 0x0020, 0x0037)
        np.testing.assert_allclose(iop, np.r_[lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]], atol=1e-9)
        np.testing.assert_allclose(_numbers(tags, 0x0028, 0x0030), [spacing[1], spacing[0]], atol=1e-9)
        assert float(_text(tags, 0x0018, 0x0050)) == pytest.approx(spacing[2], abs=1e-9)
        assert struct.unpack("<HH", tags[(0x0028, 0x0010)] + tags[(0x0028, 0x0011)]) == (6, 7)
        assert struct.unpack("<H", tags[(0x0028, 0x0103)])[0] == 1  # signed int16
        assert len(tags[(0x7FE0, 0x0010)]) == 6 * 7 * 2
        assert all(len(_text(tags, 0x0028, e)) <= 16 for e in (0x1052, 0x1053))
        slope = float(_text(tags, 0x0028, 0x1053))
        assert slope <= (data.max() - data.min()) / 65535 * (1 + 1e-6)
        series_uids.add(_text(tags, 0x0020, 0x000E))
        sop_uids.add(_text(tags, 0x0008, 0x0018))
    assert len(series_uids) == 1 and len(sop_uids) == len(files)
    out = load_volume(tmp_path / "series")
    assert np.max(np.abs(out.affine - affine)) <= 1e-4


@pytest.mark.parametrize("kind", ["permuted_flipped", "oblique_permuted_flipped", "las"])
def test_dicom_geometry_roundtrip(tmp_path: Path, kind: str) -> None:
    affine = AFFINES[kind]
    data = _sample(np.int16)
    out = load_volume(save_volume(Volume(data, affine), tmp_path / "series"))
    expected_affine, expected = affine.copy(), data
    if np.linalg.det(affine[:3, :3]) < 0:
        # Left-handed: readers sort slices along row x column, so k comes back reversed.
        nk = data.shape[0]
        expected_affine[:3, 3] = affine[:3, 3] + (nk - 1) * affine[:3, 2]
        expected_affine[:3, 2] = -affine[:3, 2]
        expected = data[::-1]
    assert np.max(np.abs(out.affine - expected_affine)) <= 1e-4
    np.testing.assert_array_equal(out.array, expected)


def test_dicom_refuses_sheared_grid(tmp_path: Path) -> None:
    affine = AFFINES["oblique"].copy()
    affine[:3, 2] += 0.3 * affine[:3, 0]  # gantry-tilt-like shear
    with pytest.raises(GeometryError, match="perpendicular"):
        save_volume(Volume(_sample(np.float32), affine), tmp_path / "series")
    assert list(tmp_path.iterdir()) == []


def test_dicom_refuses_non_finite(tmp_path: Path) -> None:
    data = _sample(np.float32)
    data[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        save_volume(Volume(data, np.eye(4)), tmp_path / "series")


def test_dicom_several_series_need_a_choice(tmp_path: Path) -> None:
    a, b = _sample(np.int16, seed=1), _sample(np.int16, seed=2)
    save_volume(Volume(a, AFFINES["oblique"]), tmp_path / "a")
    save_volume(Volume(b, AFFINES["oblique"]), tmp_path / "b")
    uid_a = _text(_dicom_tags(next((tmp_path / "a").iterdir())), 0x0020, 0x000E)
    uid_b = _text(_dicom_tags(next((tmp_path / "b").iterdir())), 0x0020, 0x000E)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for src in ("a", "b"):
        for f in (tmp_path / src).iterdir():
            (mixed / f"{src}_{f.name}").write_bytes(f.read_bytes())
    with pytest.raises(VolumeFileError) as err:
        load_volume(mixed)
    assert uid_a in str(err.value) and uid_b in str(err.value) and "series_uid" in str(err.value)
    np.testing.assert_array_equal(load_volume(mixed, series_uid=uid_b).array, b)
    np.testing.assert_array_equal(load_volume(mixed, series_uid=uid_a).array, a)
    with pytest.raises(VolumeFileError, match=uid_a):
        load_volume(mixed, series_uid="1.2.3.4")


def test_dicom_missing_slice_is_detected(tmp_path: Path) -> None:
    save_volume(Volume(_sample(np.int16), AFFINES["oblique"]), tmp_path / "series")
    (tmp_path / "series" / "IM00003.dcm").unlink()
    with pytest.raises(InputError, match="unevenly spaced"):
        load_volume(tmp_path / "series")


def test_dicom_bad_directories(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeFileError, match="no DICOM series"):
        load_volume(tmp_path / "empty")
    (tmp_path / "IM0001").write_bytes(b"\0" * 200)
    with pytest.raises(VolumeFileError, match="directory"):
        load_volume(tmp_path / "IM0001")


@pytest.mark.parametrize("victim", ["IM00002.dcm", "IM00005.dcm"])  # a middle and the last slice
def test_dicom_truncated_file_is_reported(tmp_path: Path, victim: str) -> None:
    """GDCM silently drops damaged files; a lost end slice would otherwise go unnoticed."""
    save_volume(Volume(_sample(np.int16), np.eye(4)), tmp_path / "series")
    path = tmp_path / "series" / victim
    path.write_bytes(path.read_bytes()[:-30])  # truncated pixel data
    with pytest.raises(VolumeFileError, match=victim):
        load_volume(tmp_path / "series")


def test_dicom_destination_must_be_new(tmp_path: Path) -> None:
    target = tmp_path / "series"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(VolumeFileError, match="already exists"):
        save_volume(Volume(_sample(np.int16), np.eye(4)), target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_series_uid_only_for_dicom(tmp_path: Path) -> None:
    p = save_volume(Volume(_sample(np.int16), np.eye(4)), tmp_path / "v.nii")
    with pytest.raises(InputError, match="DICOM"):
        load_volume(p, series_uid="1.2.3")


# --------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path: Path) -> None:
    for name in ("nope.nii.gz", "nope.nrrd", "nope_series"):
        with pytest.raises(VolumeFileError, match="no such"):
            load_volume(tmp_path / name)


def _valid_bytes(tmp_path: Path, suffix: str) -> bytes:
    vol = Volume(_sample(np.float32, shape=(8, 9, 10)), AFFINES["oblique"])
    p = save_volume(vol, tmp_path / f"valid{suffix}")
    return p.read_bytes()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated_half", "truncated_tail"])
def test_damaged_files_raise_volume_file_error(tmp_path: Path, suffix: str, damage: str) -> None:
    good = _valid_bytes(tmp_path, suffix)
    if damage == "empty":
        bad = b""
    elif damage == "garbage":
        bad = np.random.default_rng(7).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    elif damage == "truncated_half":
        bad = good[: len(good) // 2]
    else:
        bad = good[:-40]
    p = tmp_path / f"bad{suffix}"
    p.write_bytes(bad)
    with pytest.raises(VolumeFileError) as err:
        load_volume(p)
    assert p.name in str(err.value)


def test_truncated_gzip_stream_inside_nifti(tmp_path: Path) -> None:
    """A gzip body cut after an intact header: zlib/EOFError must not leak out."""
    raw = nib.Nifti1Image(_sample(np.float32, shape=(20, 20, 20)), np.eye(4))
    nib.save(raw, str(tmp_path / "plain.nii"))
    payload = gzip.compress((tmp_path / "plain.nii").read_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(payload[: len(payload) * 3 // 4])
    with pytest.raises(VolumeFileError, match="cut.nii.gz"):
        load_volume(tmp_path / "cut.nii.gz")


def test_detached_header_without_data_file(tmp_path: Path) -> None:
    for suffix, data_name in ((".nhdr", "v.raw.gz"), (".mhd", "v.zraw")):
        save_volume(Volume(_sample(np.float32), np.eye(4)), tmp_path / f"v{suffix}")
        (tmp_path / data_name).unlink()
        with pytest.raises(VolumeFileError, match=f"v\\{suffix}"):
            load_volume(tmp_path / f"v{suffix}")


@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 6, 2), (4, 5, 6, 1, 3)])
def test_non_3d_nifti_is_input_error(tmp_path: Path, shape) -> None:
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(tmp_path / "x.nii.gz"))
    with pytest.raises(InputError, match="3D volume is needed"):
        load_volume(tmp_path / "x.nii.gz")


def test_non_3d_itk_images_are_input_errors(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(tmp_path / "two.nrrd"))
    four = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False)
    sitk.WriteImage(four, str(tmp_path / "four.nrrd"))
    rgb = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.float32), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    for name in ("two.nrrd", "four.nrrd", "rgb.mha"):
        with pytest.raises(InputError):
            load_volume(tmp_path / name)


def test_trailing_singleton_dimensions_are_squeezed(tmp_path: Path) -> None:
    data = _sample(np.int16)  # (k, j, i)
    affine = _as_float32(AFFINES["las"])
    nib.save(nib.Nifti1Image(np.transpose(data, (2, 1, 0))[..., None], affine), str(tmp_path / "t.nii"))
    out = load_volume(tmp_path / "t.nii")
    np.testing.assert_array_equal(out.array, data)
    np.testing.assert_array_equal(out.affine, affine)
    image = sitk.GetImageFromArray(data[None], isVector=False)  # 4D (i, j, k, 1)
    sitk.WriteImage(image, str(tmp_path / "t.nrrd"))
    out = load_volume(tmp_path / "t.nrrd")
    np.testing.assert_array_equal(out.array, data)
    np.testing.assert_allclose(out.affine, np.diag([-1.0, -1.0, 1.0, 1.0]), atol=0)  # ITK identity is LPS


# --------------------------------------------------------------------------- atomic writes


def _listing(directory: Path) -> dict[str, bytes | None]:
    """Every entry (hidden ones included) with its bytes; directories map to None."""
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("suffix", FILE_SUFFIXES)
def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path: Path, suffix: str, monkeypatch) -> None:
    target = tmp_path / f"out{suffix}"
    old = Volume(_sample(np.float32, seed=11), AFFINES["oblique"])
    save_volume(old, target)
    before = _listing(tmp_path)

    def failing_writer(*args, **kwargs):
        # Leave a partial file behind under the name the writer was given, then fail.
        Path(args[1]).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    if suffix.startswith(".nii"):
        monkeypatch.setattr(nib, "save", failing_writer)
    else:
        monkeypatch.setattr(sitk, "WriteImage", failing_writer)
    with pytest.raises(OSError):
        save_volume(Volume(_sample(np.float32, seed=12), AFFINES["las"]), target)
    assert _listing(tmp_path) == before
    monkeypatch.undo()
    np.testing.assert_array_equal(load_volume(target).array, old.array)


def test_failed_write_of_new_file_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def failing_writer(image, name, *args):
        Path(name).write_bytes(b"partial")
        raise RuntimeError("ITK ERROR: disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_writer)
    with pytest.raises(VolumeFileError, match="disk full"):
        save_volume(Volume(_sample(np.float32), np.eye(4)), tmp_path / "new.mha")
    assert list(tmp_path.iterdir()) == []


def test_failed_dicom_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    real = dicom_io._slice_file

    def failing(common, k, *args):
        if k == 2:
            raise OSError(28, "No space left on device")
        return real(common, k, *args)

    monkeypatch.setattr(dicom_io, "_slice_file", failing)
    with pytest.raises(OSError):
        save_volume(Volume(_sample(np.int16), np.eye(4)), tmp_path / "series")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_cleans_up(tmp_path: Path, monkeypatch) -> None:
    def interrupted(img, name, *args, **kwargs):
        Path(name).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_volume(Volume(_sample(np.float32), np.eye(4)), tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))
