"""The translation pipeline: exact output geometry, data consistency, failures, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bundle_fixtures import blob, make_random_bundle
from ScoreFusionLib.cli.main import main
from ScoreFusionLib.data.task import TaskSpec
from ScoreFusionLib.degradation import AveragePool, ThickSlice
from ScoreFusionLib.errors import GeometryError, InputError
from ScoreFusionLib.geometry import super_resolution_grid
from ScoreFusionLib.translate import SamplingOptions, super_resolve, synthesize
from ScoreFusionLib.volume import Volume
from ScoreFusionLib.volume_io import load_volume, save_volume

FAST = SamplingOptions(method="average", sampler="ddim", steps=3, seed=0, device="cpu")


# LAS-like matrix with a permutation: the pipeline must reorient and undo exactly.
PERMUTED = np.array([[0.0, -2.0, 0.0, 40.0], [0.0, 0.0, 2.0, -60.0], [-2.0, 0.0, 0.0, 25.0], [0, 0, 0, 1]])


def test_super_resolution_grid_and_data_consistency(sr_bundle):
    rng = np.random.default_rng(0)
    lr = Volume(blob((6, 5, 7), rng), PERMUTED)
    before = lr.array.copy()
    result = super_resolve(lr, sr_bundle, FAST, factor=2)
    shape, affine = super_resolution_grid(lr.shape_ijk, lr.affine, 2)
    assert result.volume.shape_ijk == shape
    np.testing.assert_allclose(result.volume.affine, affine, atol=1e-12)
    # re-degrading the output gives the input back (intensity units)
    np.testing.assert_allclose(AveragePool(2).degrade(result.volume.array.astype(np.float64)), lr.array,
                               rtol=1e-5, atol=1e-3)
    # the network did something: the output is not just the nearest-neighbour lift
    lifted = AveragePool(2).lift(lr.array.astype(np.float64))
    assert np.abs(result.volume.array - lifted).max() > 1e-3
    np.testing.assert_array_equal(lr.array, before)
    assert result.provenance["data_consistency"] is True
    assert result.provenance["steps"] == 3


def test_without_consistency_the_measurement_is_not_enforced(sr_bundle):
    rng = np.random.default_rng(1)
    lr = Volume(blob((6, 6, 6), rng), np.diag([2.0, 2.0, 2.0, 1.0]))
    opts = SamplingOptions(**{**FAST.__dict__, "consistency": False})
    out = super_resolve(lr, sr_bundle, opts).volume
    assert np.abs(AveragePool(2).degrade(out.array.astype(np.float64)) - lr.array).max() > 1e-2


def test_same_seed_same_output_and_tpdm_provenance(sr_bundle):
    rng = np.random.default_rng(2)
    lr = Volume(blob((4, 6, 4), rng), np.eye(4))
    opts = SamplingOptions(method="tpdm", sampler="ddpm", steps=4, seed=3, device="cpu")
    a = super_resolve(lr, sr_bundle, opts)
    b = super_resolve(lr, sr_bundle, opts)
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    assert len(a.provenance["planes_per_step"]) == 4
    c = super_resolve(lr, sr_bundle, SamplingOptions(**{**opts.__dict__, "seed": 4}))
    assert not np.array_equal(a.volume.array, c.volume.array)


def test_factor_and_spacing_must_match_the_bundle(sr_bundle):
    lr = Volume(blob((4, 4, 4), np.random.default_rng(3)), np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(InputError, match=r"super-resolves by \(2, 2, 2\)"):
        super_resolve(lr, sr_bundle, FAST, factor=4)
    with pytest.raises(GeometryError, match="whole numbers"):
        super_resolve(lr, sr_bundle, FAST, spacing=(0.7, 1.0, 1.0))
    out = super_resolve(lr, sr_bundle, FAST, spacing=(1.0, 1.0, 1.0)).volume
    np.testing.assert_allclose(out.spacing, [1.0, 1.0, 1.0])


def test_synthesis_keeps_the_input_grid_bitwise(mt_bundle):
    rng = np.random.default_rng(4)
    affine = np.array([[0.0, 0.0, -1.1, 10.0], [0.9, 0.1, 0.0, -5.0], [0.0, -1.2, 0.05, 3.0], [0, 0, 0, 1]])
    t1 = Volume(blob((8, 6, 10), rng), affine)
    t2 = Volume(blob((8, 6, 10), rng, offset=3.0), affine)
    result = synthesize({"t1": t1, "T2w": t2}, mt_bundle, FAST)
    assert result.volume.array.shape == t1.array.shape
    assert np.array_equal(result.volume.affine, t1.affine)
    assert np.isfinite(result.volume.array).all()


def test_bad_inputs_are_rejected(mt_bundle, sr_bundle):
    rng = np.random.default_rng(5)
    t1 = Volume(blob((8, 8, 8), rng), np.eye(4))
    t2 = Volume(blob((8, 8, 8), rng), np.eye(4))
    with pytest.raises(InputError, match="missing"):
        synthesize({"t1n": t1}, mt_bundle, FAST)
    with pytest.raises(InputError, match="does not use"):
        synthesize({"t1n": t1, "t2w": t2, "pdw": t2}, mt_bundle, FAST)
    shifted = Volume(t2.array, np.diag([1.0, 1.0, 1.0, 1.0]) + np.array([[0, 0, 0, 5.0]] * 3 + [[0, 0, 0, 0]]))
    with pytest.raises(GeometryError, match="different IJK->RAS"):
        synthesize({"t1n": t1, "t2w": shifted}, mt_bundle, FAST)
    nan = t2.array.copy()
    nan[2, 2, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        synthesize({"t1n": t1, "t2w": Volume(nan, np.eye(4))}, mt_bundle, FAST)
    with pytest.raises(InputError, match="constant"):
        super_resolve(Volume(np.ones((4, 4, 4), np.float32), np.eye(4)), sr_bundle, FAST)
    with pytest.raises(InputError, match="synthesises"):
        super_resolve(t1, mt_bundle, FAST)
    with pytest.raises(InputError, match="unknown method"):
        synthesize({"t1n": t1, "t2w": t2}, mt_bundle, SamplingOptions(method="score-fusion-typo"))


def test_thick_slice_bundle_restores_the_measured_slices(tmp_path):
    spec = TaskSpec(kind="sr", inputs=[], target="t2w", degradation=ThickSlice(axis=2, factor=4, profile="box"))
    bundle = make_random_bundle(tmp_path / "thick", spec, planes=("coronal", "sagittal"))
    lr = Volume(blob((3, 8, 8), np.random.default_rng(6)), np.diag([1.0, 1.0, 4.0, 1.0]))
    out = super_resolve(lr, bundle, FAST).volume
    assert out.shape_ijk == (8, 8, 12)
    np.testing.assert_allclose(out.spacing, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(ThickSlice(axis=2, factor=4, profile="box").degrade(out.array.astype(np.float64)),
                               lr.array, rtol=1e-5, atol=1e-3)


def test_cli_writes_volume_and_provenance_atomically(sr_bundle, tmp_path):
    lr = Volume(blob((6, 6, 6), np.random.default_rng(7)), PERMUTED)
    src = save_volume(lr, tmp_path / "lr.nii.gz")
    out = tmp_path / "out" / "sr.nii.gz"
    code = main(["super-resolve", str(src), "-o", str(out), "--model", str(sr_bundle), "--steps", "2",
                 "--device", "cpu", "--no-progress", "--factor", "2"])
    assert code == 0
    vol = load_volume(out)
    shape, affine = super_resolution_grid(lr.shape_ijk, lr.affine, 2)
    assert vol.shape_ijk == shape
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    meta = json.loads((tmp_path / "out" / "sr.json").read_text())
    assert meta["method"] == "average" and meta["steps"] == 2 and len(meta["plane_weights"]) == 3

    bad = tmp_path / "bad" / "sr.nii.gz"
    code = main(["super-resolve", str(src), "-o", str(bad), "--model", str(sr_bundle), "--factor", "3",
                 "--device", "cpu", "--no-progress"])
    assert code == 2
    assert not bad.exists() and not (tmp_path / "bad" / "sr.json").exists()
    code = main(["super-resolve", str(tmp_path / "missing.nii.gz"), "-o", str(bad), "--model", str(sr_bundle)])
    assert code == 2 and not bad.exists()


def test_thick_slice_model_refuses_a_different_slice_direction(tmp_path):
    spec = TaskSpec(kind="sr", inputs=[], target="t2w", degradation=ThickSlice(axis=2, factor=4, profile="box"))
    bundle = make_random_bundle(tmp_path / "thick", spec, planes=("coronal", "sagittal"))
    coronal_thick = Volume(blob((8, 3, 8), np.random.default_rng(8)), np.diag([1.0, 4.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="thickest along posterior-anterior"):
        super_resolve(coronal_thick, bundle, FAST)
    # an axial acquisition stored with permuted, flipped axes is recognised after reorientation
    permuted = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0, 0, 0, 1]])
    lr = Volume(blob((8, 8, 3), np.random.default_rng(9)), permuted)
    out = super_resolve(lr, bundle, FAST).volume
    assert out.shape_ijk == (12, 8, 8)
    np.testing.assert_allclose(out.spacing, [1.0, 1.0, 1.0])


def test_both_bundle_uses_the_extra_contrast_on_the_sr_grid(tmp_path):
    spec = TaskSpec(kind="both", inputs=["t1c"], target="t2f", degradation=AveragePool(2))
    bundle = make_random_bundle(tmp_path / "both", spec)
    rng = np.random.default_rng(10)
    hr_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    t1c = Volume(blob((8, 8, 12), rng), hr_affine)
    flair_hr = Volume(blob((8, 8, 12), rng, offset=2.0), hr_affine)
    lr = AveragePool(2).degrade_volume(flair_hr)
    out = super_resolve(lr, bundle, FAST, extra_inputs={"t1ce": t1c}).volume
    np.testing.assert_allclose(out.affine, hr_affine, atol=1e-12)
    np.testing.assert_allclose(AveragePool(2).degrade(out.array.astype(np.float64)), lr.array, rtol=1e-5, atol=1e-3)
    off_grid = Volume(blob((8, 8, 12), rng), np.diag([1.0, 1.0, 1.5, 1.0]))
    with pytest.raises(InputError, match="super-resolved grid"):
        super_resolve(lr, bundle, FAST, extra_inputs={"t1c": off_grid})
    with pytest.raises(InputError, match="missing"):
        super_resolve(lr, bundle, FAST)


def test_synthesize_cli(mt_bundle, tmp_path):
    rng = np.random.default_rng(11)
    affine = np.array([[-1.0, 0.0, 0.0, 90.0], [0.0, 1.0, 0.0, -120.0], [0.0, 0.0, 1.0, -60.0], [0, 0, 0, 1]])
    t1 = save_volume(Volume(blob((8, 6, 10), rng), affine), tmp_path / "t1.nii.gz")
    t2 = save_volume(Volume(blob((8, 6, 10), rng, offset=1.0), affine), tmp_path / "t2.nrrd")
    out = tmp_path / "flair.nii.gz"
    argv = ["synthesize", "--input", f"t1={t1}", "--input", f"T2={t2}", "--target", "flair", "-o", str(out),
            "--model", str(mt_bundle), "--steps", "2", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    vol = load_volume(out)
    assert vol.array.shape == (8, 6, 10)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    meta = json.loads((tmp_path / "flair.json").read_text())
    assert meta["task"]["target"] == "t2f" and meta["data_consistency"] is False
    wrong = tmp_path / "wrong.nii.gz"
    assert main([*argv[:6], "t1n", "-o", str(wrong), *argv[9:]]) == 2
    assert not wrong.exists()


def test_anisotropic_pooling_model_refuses_an_input_thick_along_another_axis(tmp_path):
    spec = TaskSpec(kind="sr", inputs=[], target="t1n", degradation=AveragePool((1, 1, 2)))
    bundle = make_random_bundle(tmp_path / "aniso", spec)
    thick_i = Volume(blob((8, 8, 8), np.random.default_rng(12)), np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="thickest along inferior-superior; its spacing"):
        super_resolve(thick_i, bundle, FAST)


def test_padded_thick_slice_run_stays_consistent_with_every_measured_slice(tmp_path):
    # 5 measured slices x 3 = 15 high-resolution slices, padded to 24 for the networks: the
    # Gaussian profile of the last slice must not treat the padding as measured.
    op = ThickSlice(axis=2, factor=3)
    spec = TaskSpec(kind="sr", inputs=[], target="t2w", degradation=op)
    bundle = make_random_bundle(tmp_path / "thick3", spec, planes=("coronal", "sagittal"))
    lr = Volume(blob((5, 8, 8), np.random.default_rng(13)), np.diag([1.0, 1.0, 3.0, 1.0]))
    out = super_resolve(lr, bundle, FAST).volume
    assert out.shape_ijk == (8, 8, 15)
    np.testing.assert_allclose(op.degrade(out.array.astype(np.float64)), lr.array, rtol=1e-5, atol=2e-3)


def test_padding_keeps_the_coordinates_of_real_voxels():
    from ScoreFusionLib.data.coords import coordinate_channels
    from ScoreFusionLib.translate import _extended_coordinates

    real = coordinate_channels((6, 5, 7))
    padded = _extended_coordinates((6, 5, 7), (8, 8, 8))
    np.testing.assert_allclose(padded[:, :6, :5, :7], real, atol=1e-7)
    np.testing.assert_allclose(padded[2, 7, 0, 0], 2 * 7 / 6 - 1, atol=1e-6)


def test_voxel_size_unlike_training_is_reported(tmp_path):
    spec = TaskSpec(kind="sr", inputs=[], target="t1n", degradation=AveragePool(2))
    bundle = make_random_bundle(tmp_path / "grid", spec, grid={"shape_ijk": [96, 112, 96],
                                                                "spacing": [1.0, 1.0, 1.0], "orientation": "RAS"})
    same = Volume(blob((6, 6, 6), np.random.default_rng(14)), np.diag([2.0, 2.0, 2.0, 1.0]))
    coarse = Volume(same.array, np.diag([4.0, 4.0, 4.0, 1.0]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        super_resolve(same, bundle, FAST)
    with pytest.warns(UserWarning, match=r"trained on \(1.0, 1.0, 1.0\) mm"):
        result = super_resolve(coarse, bundle, FAST)
    assert any("trained on" in note for note in result.provenance["notes"])
