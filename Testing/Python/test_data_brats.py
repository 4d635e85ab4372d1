"""Case discovery, manifests, splits and case loading (data.md section 4, method.md 7.1)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brats_fixtures import (
    SHAPE_IJK,
    affine_1mm,
    case_file,
    image_kji,
    make_case,
    seg_kji,
    write_nifti,
)
from ScoreFusionLib.data import (
    CaseRecord,
    canonical_contrast,
    canonical_contrasts,
    discover_cases,
    load_case,
    load_cases,
    load_manifest,
    read_id_list,
    split_cases,
    write_manifest,
)
from ScoreFusionLib.errors import DatasetError, GeometryError, InputError

# -- contrast names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alias, name",
    [("t1", "t1n"), ("T1w", "t1n"), ("t1n", "t1n"), ("t1ce", "t1c"), ("T1C", "t1c"), ("t2", "t2w"),
     ("T2w", "t2w"), ("FLAIR", "t2f"), ("t2f", "t2f"), ("t2-flair", "t2f"), ("pd", "pdw"), ("PDw", "pdw"),
     ("seg", "seg")],
)
def test_canonical_contrast_aliases(alias, name):
    assert canonical_contrast(alias) == name


def test_canonical_contrast_rejects_unknown_and_duplicates():
    with pytest.raises(InputError, match="unknown contrast"):
        canonical_contrast("t3")
    with pytest.raises(InputError, match="more than once"):
        canonical_contrasts(["t1ce", "t1c"])


# -- discovery ------------------------------------------------------------------------------


def test_brats2021_names_map_exactly(tmp_path):
    make_case(tmp_path, "brats2021")
    (rec,) = discover_cases(tmp_path)
    assert rec.case_id == "BraTS2021_00000"
    assert rec.scheme == "brats2021"
    assert rec.label_convention == "brats2021"
    assert not rec.simulated
    assert rec.missing == ()
    # The t1 trap: t1 -> t1n and t1ce -> t1c, never crossed.
    assert rec.paths["t1n"].name == "BraTS2021_00000_t1.nii.gz"
    assert rec.paths["t1c"].name == "BraTS2021_00000_t1ce.nii.gz"
    assert rec.paths["t2w"].name == "BraTS2021_00000_t2.nii.gz"
    assert rec.paths["t2f"].name == "BraTS2021_00000_flair.nii.gz"
    assert rec.has_seg and rec.contrasts == ("t1n", "t1c", "t2w", "t2f")


@pytest.mark.parametrize("case_id", ["BraTS-GLI-00000-000", "BraTS-MEN-00012-001", "BraTS-PED-00003-000",
                                     "BraTS-MET-00100-000", "BraTS-SSA-00007-000"])
def test_brats2023_cohorts(tmp_path, case_id):
    make_case(tmp_path, "brats2023", case_id=case_id)
    (rec,) = discover_cases(tmp_path)
    assert rec.scheme == "brats2023" and rec.label_convention == "brats2023"
    assert rec.paths["t1n"].name == f"{case_id}-t1n.nii.gz"
    assert rec.paths["t1c"].name == f"{case_id}-t1c.nii.gz"
    assert set(rec.paths) == {"t1n", "t1c", "t2w", "t2f", "seg"}


def test_brats2021_t1_only_is_not_t1ce(tmp_path):
    # Only t1ce present: t1n must be reported missing, not filled with the t1ce file.
    make_case(tmp_path, "brats2021", contrasts=["t1c"], seg=False)
    (rec,) = discover_cases(tmp_path)
    assert set(rec.paths) == {"t1c"}
    assert rec.missing == ("t1n", "t2w", "t2f", "seg")


def test_foreign_suffixes_are_strays(tmp_path):
    # 2023 suffixes inside a 2021 folder (and vice versa) are not matched.
    folder = make_case(tmp_path, "brats2021", contrasts=["t2f"], seg=False)
    write_nifti(folder / "BraTS2021_00000_t1n.nii.gz", image_kji(1))
    folder23 = make_case(tmp_path, "brats2023", contrasts=["t2f"], seg=False)
    write_nifti(folder23 / "BraTS-GLI-00000-000-t1.nii.gz", image_kji(1))
    write_nifti(folder23 / "BraTS-GLI-00000-000-t1ce.nii.gz", image_kji(1))
    recs = {r.case_id: r for r in discover_cases(tmp_path)}
    assert "t1n" not in recs["BraTS2021_00000"].paths
    assert "BraTS2021_00000_t1n.nii.gz" in recs["BraTS2021_00000"].strays
    assert set(recs["BraTS-GLI-00000-000"].paths) == {"t2f"}


def test_case_insensitive_and_plain_nii(tmp_path):
    folder = tmp_path / "BraTS-GLI-00001-000"
    write_nifti(folder / "brats-gli-00001-000-T1N.NII.GZ", image_kji(0))
    write_nifti(folder / "BraTS-GLI-00001-000-t2f.nii", image_kji(1))
    (rec,) = discover_cases(tmp_path)
    assert set(rec.paths) == {"t1n", "t2f"}
    assert rec.paths["t2f"].suffix == ".nii"


def test_simulated_case_with_pdw_and_sidecar(tmp_path):
    make_case(tmp_path, "simulated", sidecar={"seed": 1, "version": "0.1.0"})
    (rec,) = discover_cases(tmp_path)
    assert rec.scheme == "simulated" and rec.simulated
    assert rec.label_convention == "brats2023"
    assert set(rec.paths) == {"t1n", "t1c", "t2w", "t2f", "pdw", "seg"}
    assert rec.sidecar is not None and rec.sidecar.name == "ScoreFusionSim-00001.json"
    assert rec.strays == ()


def test_simulated_sidecar_label_convention(tmp_path):
    make_case(tmp_path, "simulated", sidecar={"label_convention": "brats2021"})
    (rec,) = discover_cases(tmp_path)
    assert rec.label_convention == "brats2021"
    make_case(tmp_path, "simulated", case_id="ScoreFusionSim-00002", sidecar={"label_convention": "x"})
    with pytest.raises(DatasetError, match="unknown label convention"):
        discover_cases(tmp_path)


def test_missing_contrasts_and_seg_are_reported_not_raised(tmp_path):
    make_case(tmp_path, "brats2023", contrasts=["t1n", "t2w", "t2f"], seg=False)
    (rec,) = discover_cases(tmp_path)
    assert rec.missing == ("t1c", "seg")
    assert not rec.has_seg
    with pytest.raises(DatasetError, match="BraTS-GLI-00000-000.*'t1c'"):
        rec.path("t1ce")


def test_strays_are_ignored(tmp_path):
    folder = make_case(tmp_path, "brats2021")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "notes.txt").write_text("x")
    (folder / "BraTS2021_00000.json").write_text("{}")
    write_nifti(folder / "BraTS2021_00000_t1_old.nii.gz", image_kji(3))
    write_nifti(folder / "BraTS2021_00001_t1.nii.gz", image_kji(3))
    (folder / "sub").mkdir()
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "__MACOSX").mkdir()
    (rec,) = discover_cases(tmp_path)
    assert set(rec.paths) == {"t1n", "t1c", "t2w", "t2f", "seg"}
    assert rec.paths["t1n"].name == "BraTS2021_00000_t1.nii.gz"
    assert ".DS_Store" in rec.strays and "BraTS2021_00000_t1_old.nii.gz" in rec.strays


def test_duplicate_files_raise(tmp_path):
    folder = make_case(tmp_path, "brats2021", contrasts=["t1n"], seg=False)
    write_nifti(folder / "BraTS2021_00000_t1.nii", image_kji(0))
    with pytest.raises(DatasetError, match="two files for 't1n'"):
        discover_cases(tmp_path)


def test_duplicate_files_differing_in_case_raise(tmp_path):
    folder = make_case(tmp_path, "brats2023", contrasts=["t2f"], seg=False)
    write_nifti(folder / "BraTS-GLI-00000-000-T2F.nii.gz", image_kji(0))
    if len(list(folder.iterdir())) < 2:  # case-insensitive file system
        pytest.skip("file system folds case")
    with pytest.raises(DatasetError, match="two files"):
        discover_cases(tmp_path)


def test_root_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        discover_cases(tmp_path / "nope")
    with pytest.raises(DatasetError, match="is empty"):
        discover_cases(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no case folders"):
        discover_cases(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        discover_cases(tmp_path / "readme.txt")


def test_single_case_folder_as_root_is_explained(tmp_path):
    folder = make_case(tmp_path, "brats2021")
    with pytest.raises(DatasetError, match="single case folder"):
        discover_cases(folder)


def test_mixed_schemes_sorted(tmp_path):
    make_case(tmp_path, "simulated")
    make_case(tmp_path, "brats2021", case_id="BraTS2021_00002")
    make_case(tmp_path, "brats2021", case_id="BraTS2021_00001")
    make_case(tmp_path, "brats2023")
    recs = discover_cases(tmp_path)
    assert [r.case_id for r in recs] == sorted(r.case_id for r in recs)
    assert [r.scheme for r in recs] == ["brats2023", "brats2021", "brats2021", "simulated"]


# -- loading --------------------------------------------------------------------------------


def _record(tmp_path, scheme="brats2023", **kw) -> CaseRecord:
    make_case(tmp_path, scheme, **kw)
    return discover_cases(tmp_path)[0]


def test_load_case_native_grid(tmp_path):
    rec = _record(tmp_path)
    case = load_case(rec, ["t1c", "flair"], grid_shape_ijk=None, seg=True)
    assert set(case.volumes) == {"t1c", "t2f"}
    assert case.volumes["t2f"].shape_ijk == SHAPE_IJK
    np.testing.assert_array_equal(case.volumes["t1c"].array, image_kji(1))
    np.testing.assert_array_equal(case.seg.array, seg_kji())
    np.testing.assert_array_equal(case.affine, affine_1mm())
    assert case.label_convention == "brats2023"


def test_load_case_centre_crop_pad(tmp_path):
    rec = _record(tmp_path, contrasts=["t2f"], seg_values=(0, 1, 2, 3))
    folder = rec.folder
    # Give the image a non-zero background so the pad value (its minimum) is distinguishable.
    img = image_kji(7, background=5.0)
    write_nifti(case_file(folder, "brats2023", "t2f"), img)
    target = (8, 12, 6)  # i cropped 12->8 (start 2), j padded 10->12 (start -1), k cropped 8->6 (start 1)
    case = load_case(rec, ["t2f"], grid_shape_ijk=target, seg=True)
    out = case.volumes["t2f"].array
    assert out.shape == (6, 12, 8)
    expected = np.full((6, 12, 8), img.min(), dtype=np.float32)
    expected[:, 1:11, :] = img[1:7, :, 2:10]
    np.testing.assert_array_equal(out, expected)
    seg_expected = np.zeros((6, 12, 8), dtype=np.uint8)
    seg_expected[:, 1:11, :] = seg_kji((0, 1, 2, 3))[1:7, :, 2:10]
    np.testing.assert_array_equal(case.seg.array, seg_expected)
    # Kept voxels stay at their RAS position: new voxel (0,0,0) is old voxel (2,-1,1).
    np.testing.assert_allclose(case.affine[:3, 3], affine_1mm()[:3, 3] + np.array([2.0, -1.0, 1.0]))
    assert case.original_shape_ijk == SHAPE_IJK


def test_load_case_default_is_paper_grid(tmp_path):
    rec = _record(tmp_path, contrasts=["t2f"], seg=False)
    case = load_case(rec, ["t2f"])
    assert case.volumes["t2f"].shape_ijk == (192, 192, 152)


def test_load_case_reorient(tmp_path):
    las = affine_1mm()
    las[0, 0] = -1.0
    rec = _record(tmp_path, contrasts=["t2f", "t1n"], seg=False, affine=las)
    case = load_case(rec, ["t2f"], grid_shape_ijk=None, reorient=True)
    np.testing.assert_array_equal(case.volumes["t2f"].array, image_kji(0)[:, :, ::-1])
    assert case.affine[0, 0] == 1.0
    assert case.reorientation is not None and case.reorientation.flips == (True, False, False)
    np.testing.assert_array_equal(case.original_affine, las)


def test_load_case_missing_contrast_names_case_and_contrast(tmp_path):
    rec = _record(tmp_path, contrasts=["t1n", "t2f"], seg=False)
    with pytest.raises(DatasetError, match="BraTS-GLI-00000-000 has no 't1c'"):
        load_case(rec, ["t1ce", "t2f"], grid_shape_ijk=None)
    with pytest.raises(DatasetError, match="no 'seg'"):
        load_case(rec, ["t2f"], grid_shape_ijk=None, seg=True)


def test_load_case_shape_mismatch(tmp_path):
    rec = _record(tmp_path, contrasts=["t1n", "t2f"], seg=False)
    write_nifti(rec.paths["t2f"], image_kji(0, shape_ijk=(12, 10, 9)))
    with pytest.raises(GeometryError, match="BraTS-GLI-00000-000-t2f.nii.gz has shape"):
        load_case(rec, ["t1n", "t2f"], grid_shape_ijk=None)


def test_load_case_affine_tolerance(tmp_path):
    rec = _record(tmp_path, contrasts=["t1n", "t2f"], seg=False)
    shifted = affine_1mm()
    shifted[1, 3] += 5e-4  # within 1e-3 mm: accepted
    write_nifti(rec.paths["t2f"], image_kji(1), shifted)
    load_case(rec, ["t1n", "t2f"], grid_shape_ijk=None)
    shifted[1, 3] += 0.01
    write_nifti(rec.paths["t2f"], image_kji(1), shifted)
    with pytest.raises(GeometryError, match="t2f.nii.gz and .*t1n.nii.gz have different IJK->RAS"):
        load_case(rec, ["t1n", "t2f"], grid_shape_ijk=None)


def test_load_case_seg_grid_checked(tmp_path):
    rec = _record(tmp_path, contrasts=["t2f"])
    write_nifti(rec.paths["seg"], seg_kji(shape_ijk=(12, 10, 6)))
    with pytest.raises(GeometryError, match="seg"):
        load_case(rec, ["t2f"], grid_shape_ijk=None, seg=True)


def test_load_case_nan_volume(tmp_path):
    rec = _record(tmp_path, contrasts=["t2f"], seg=False)
    img = image_kji(0)
    img[3, 3, 3] = np.nan
    write_nifti(rec.paths["t2f"], img)
    with pytest.raises(InputError, match="NaN"):
        load_case(rec, ["t2f"], grid_shape_ijk=None)


@pytest.mark.parametrize(
    "scheme, values, ok",
    [
        ("brats2021", (0, 1, 2, 4), True),  # 4 = enhancing tumour
        ("brats2021", (0, 1, 3), False),  # 3 is unused in 2021
        ("brats2023", (0, 1, 2, 3, 4), True),  # 4 = resection cavity
        ("brats2023", (0, 5), False),
        ("simulated", (0, 3, 4), True),
    ],
)
def test_label_validation_by_convention(tmp_path, scheme, values, ok):
    rec = _record(tmp_path, scheme, contrasts=["t2f"], seg_values=values)
    if ok:
        case = load_case(rec, ["t2f"], grid_shape_ijk=None, seg=True)
        assert set(np.unique(case.seg.array)) == set(values)
    else:
        with pytest.raises(InputError, match="not part of the"):
            load_case(rec, ["t2f"], grid_shape_ijk=None, seg=True)


def test_label_4_under_simulated_brats2021_sidecar(tmp_path):
    rec = _record(tmp_path, "simulated", contrasts=["t2f"], seg_values=(0, 3),
                  sidecar={"label_convention": "brats2021"})
    with pytest.raises(InputError, match="brats2021"):
        load_case(rec, ["t2f"], grid_shape_ijk=None, seg=True)


def test_fractional_seg_rejected(tmp_path):
    rec = _record(tmp_path, contrasts=["t2f"])
    write_nifti(rec.paths["seg"], seg_kji().astype(np.float32) + 0.5)
    with pytest.raises(InputError, match="non-integer"):
        load_case(rec, ["t2f"], grid_shape_ijk=None, seg=True)


# -- manifests ------------------------------------------------------------------------------


def _images(tmp_path):
    d = tmp_path / "imgs"
    return {
        "a_flair": write_nifti(d / "a_flair.nii.gz", image_kji(0)),
        "a_t1c": write_nifti(d / "a_t1c.nii.gz", image_kji(1)),
        "a_seg": write_nifti(d / "a_seg.nii.gz", seg_kji((0, 1, 4))),
        "b_flair": write_nifti(d / "b_flair.nii.gz", image_kji(2)),
    }


def test_csv_manifest(tmp_path):
    files = _images(tmp_path)
    csv = tmp_path / "cases.csv"
    csv.write_text(
        "case_id,flair,T1ce,seg\n"
        f"subjA,imgs/a_flair.nii.gz,{files['a_t1c']},imgs/a_seg.nii.gz\n"
        "subjB,imgs/b_flair.nii.gz,,\n"
        "\n",
        encoding="utf-8",
    )
    a, b = load_manifest(csv, label_convention="brats2021")
    assert a.case_id == "subjA" and a.scheme == "manifest"
    assert a.paths == {"t1c": files["a_t1c"], "t2f": files["a_flair"], "seg": files["a_seg"]}
    assert a.label_convention == "brats2021"
    assert b.missing == ("t1c", "seg") and set(b.paths) == {"t2f"}
    case = load_case(a, ["t2f", "t1c"], grid_shape_ijk=None, seg=True)
    assert set(np.unique(case.seg.array)) == {0, 1, 4}


def test_json_manifest_equals_csv(tmp_path):
    files = _images(tmp_path)
    (tmp_path / "cases.csv").write_text(
        "case_id,t2f,t1c,seg,label_convention\n"
        "subjA,imgs/a_flair.nii.gz,imgs/a_t1c.nii.gz,imgs/a_seg.nii.gz,brats2023\n"
        "subjB,imgs/b_flair.nii.gz,,,\n",
        encoding="utf-8",
    )
    entries = [
        {"case_id": "subjA", "images": {"flair": "imgs/a_flair.nii.gz", "t1c": str(files["a_t1c"])},
         "seg": "imgs/a_seg.nii.gz", "label_convention": "brats2023"},
        {"case_id": "subjB", "images": {"t2f": "imgs/b_flair.nii.gz"}},
    ]
    (tmp_path / "cases.json").write_text(json.dumps(entries), encoding="utf-8")
    from_csv = load_manifest(tmp_path / "cases.csv")
    from_json = load_manifest(tmp_path / "cases.json")
    assert from_csv == from_json
    assert load_cases(tmp_path / "cases.json") == from_json


def test_manifest_brats_ids_imply_convention(tmp_path):
    files = _images(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps([
        {"case_id": "BraTS2021_00007", "images": {"t2f": str(files["a_flair"])}, "seg": str(files["a_seg"])},
    ]), encoding="utf-8")
    (rec,) = load_manifest(tmp_path / "m.json")
    assert rec.scheme == "brats2021" and rec.label_convention == "brats2021"


@pytest.mark.parametrize(
    "text, message",
    [
        ("case_id,flair,t5\nA,imgs/a_flair.nii.gz,x\n", "unknown column 't5'"),
        ("case_id,flair\nA,imgs/missing.nii.gz\n", "case A 't2f' file .*missing.nii.gz does not exist"),
        ("case_id,flair\nA,imgs/a_flair.nii.gz\nA,imgs/b_flair.nii.gz\n", "duplicate case_id 'A'"),
        ("case_id,flair,t2f\nA,imgs/a_flair.nii.gz,imgs/a_flair.nii.gz\n", "more than once"),
        ("id,flair\nA,imgs/a_flair.nii.gz\n", "first column must be 'case_id'"),
        ("case_id,flair\n", "lists no cases"),
        ("case_id,flair,seg\nA,imgs/a_flair.nii.gz,imgs/a_seg.nii.gz\n", "no label convention"),
    ],
)
def test_csv_manifest_errors(tmp_path, text, message):
    _images(tmp_path)
    (tmp_path / "m.csv").write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        load_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"case_id": "A", "images": {"t9": "imgs/a_flair.nii.gz"}}], "unknown contrast"),
        ([{"case_id": "A", "images": {"t2f": "imgs/a_flair.nii.gz"}, "sg": "x"}], "unknown key"),
        ([{"case_id": "A", "images": {"t2f": "nope.nii.gz"}}], "does not exist"),
        ([{"case_id": "A", "images": {"t2f": "imgs/a_flair.nii.gz"}}] * 2, "duplicate case_id"),
        ({"no": "list"}, "list of cases"),
        ([{"images": {}}], "case_id"),
    ],
)
def test_json_manifest_errors(tmp_path, entries, message):
    _images(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        load_manifest(tmp_path / "m.json")


def test_write_manifest_round_trip(tmp_path):
    make_case(tmp_path / "data", "brats2021", seg_values=(0, 4))
    make_case(tmp_path / "data", "simulated", sidecar={"label_convention": "brats2021"})
    recs = discover_cases(tmp_path / "data")
    back = load_manifest(write_manifest(recs, tmp_path / "frozen.json"))
    assert [r.case_id for r in back] == [r.case_id for r in recs]
    for r, b in zip(recs, back):
        assert b.paths == {c: p.resolve() for c, p in r.paths.items()}
        assert (b.scheme, b.label_convention, b.simulated) == (r.scheme, r.label_convention, r.simulated)


# -- splits ---------------------------------------------------------------------------------


def _fake_cases(ids):
    return [CaseRecord(case_id=i, scheme="brats2021", paths={}) for i in ids]


def test_paper_split_rule():
    ids = [f"BraTS2021_{n:05d}" for n in range(10)]
    shuffled = [ids[i] for i in np.random.default_rng(0).permutation(10)]
    split = split_cases(_fake_cases(shuffled))
    assert split.train_ids == ids[:8] and split.test_ids == ids[8:]
    # Deterministic whatever the input order.
    assert split_cases(_fake_cases(ids)).test_ids == split.test_ids
    # BraTS 2021: 1251 cases -> 1000 / 251.
    big = split_cases(_fake_cases([f"BraTS2021_{n:05d}" for n in range(1251)]))
    assert len(big.train) == 1000 and len(big.test) == 251


def test_list_split():
    cases = _fake_cases(["c", "a", "b", "d"])
    s = split_cases(cases, "lists", train_ids=["c", "a"], test_ids=["d"])
    assert s.train_ids == ["c", "a"] and s.test_ids == ["d"]
    s = split_cases(cases, "lists", test_ids=["b"])
    assert s.train_ids == ["a", "c", "d"] and s.test_ids == ["b"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "lists", "train_ids": ["a", "zz"]}, "unknown case id"),
        ({"mode": "lists", "train_ids": ["a", "b"], "test_ids": ["b"]}, "both train_ids and test_ids"),
        ({"mode": "lists", "train_ids": ["a", "a"]}, "more than once"),
        ({"mode": "lists"}, "needs train_ids"),
        ({"mode": "random"}, "unknown split mode"),
        ({"mode": "paper", "train_fraction": 0.0}, "train_fraction"),
        ({"mode": "paper", "train_ids": ["a"]}, "only used with mode='lists'"),
    ],
)
def test_split_errors(kwargs, message):
    with pytest.raises(DatasetError, match=message):
        split_cases(_fake_cases(["a", "b", "c"]), **kwargs)


def test_split_duplicate_case_ids():
    with pytest.raises(DatasetError, match="more than once"):
        split_cases(_fake_cases(["a", "a", "b"]))


def test_read_id_list(tmp_path):
    p = tmp_path / "ids.txt"
    p.write_text("# test cases\nBraTS2021_00001\n\n  BraTS2021_00003  # note\n", encoding="utf-8")
    assert read_id_list(p) == ["BraTS2021_00001", "BraTS2021_00003"]


def test_load_cases_dispatch_and_no_torch_import(tmp_path):
    import subprocess
    import sys

    make_case(tmp_path / "data", "brats2021")
    assert [r.case_id for r in load_cases(tmp_path / "data")] == ["BraTS2021_00000"]
    with pytest.raises(DatasetError, match="neither a dataset folder nor a manifest"):
        load_cases(tmp_path / "missing")
    code = "import sys, ScoreFusionLib.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
