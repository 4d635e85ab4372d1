"""Score-fusion through the translation pipeline and the CLI: method choice, weight checks, samples."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bundle_fixtures import add_fuser, blob
from ScoreFusionLib.bundle import BundleError, read_manifest, write_manifest
from ScoreFusionLib.cli.main import main
from ScoreFusionLib.degradation import AveragePool
from ScoreFusionLib.errors import InputError
from ScoreFusionLib.translate import SamplingOptions, super_resolve, synthesize
from ScoreFusionLib.volume import Volume
from ScoreFusionLib.volume_io import load_volume, save_volume

LR_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def options(**kw) -> SamplingOptions:
    base = {"sampler": "ddpm", "steps": 3, "seed": 0, "device": "cpu", "time_grid": "logsnr"}
    return SamplingOptions(**{**base, **kw})


@pytest.fixture
def fused_bundle(sr_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(sr_bundle, bundle)
    return add_fuser(bundle)


@pytest.fixture
def lr_volume():
    return Volume(blob((8, 6, 8), np.random.default_rng(4)), LR_AFFINE)


def test_a_fresh_fuser_samples_like_the_plane_average(fused_bundle, lr_volume):
    fused = super_resolve(lr_volume, fused_bundle, options(method="score-fusion"))
    average = super_resolve(lr_volume, fused_bundle, options(method="average"))
    assert fused.provenance["method"] == "score-fusion"
    assert fused.provenance["fuser_sha256"] == read_manifest(fused_bundle).fuser["sha256"]
    spread = float(np.ptp(average.volume.array))
    assert np.abs(fused.volume.array - average.volume.array).max() <= 1e-4 * spread
    np.testing.assert_allclose(AveragePool(2).degrade(fused.volume.array.astype(np.float64)), lr_volume.array,
                               rtol=1e-5, atol=1e-3)


def test_auto_picks_score_fusion_only_when_the_bundle_has_a_fuser(sr_bundle, fused_bundle, lr_volume):
    assert super_resolve(lr_volume, fused_bundle, options()).provenance["method"] == "score-fusion"
    assert super_resolve(lr_volume, sr_bundle, options()).provenance["method"] == "average"
    with pytest.raises(InputError, match="has no trained fuser"):
        super_resolve(lr_volume, sr_bundle, options(method="score-fusion"))


def test_tiled_and_untiled_fresh_fuser_give_the_same_volume(fused_bundle, lr_volume):
    untiled = super_resolve(lr_volume, fused_bundle, options(method="score-fusion"))
    tiled = super_resolve(lr_volume, fused_bundle, options(method="score-fusion", tile_size=8))
    assert tiled.provenance["tile_size"] == 8 and untiled.provenance["tile_size"] == 16
    spread = float(np.ptp(untiled.volume.array))
    np.testing.assert_allclose(tiled.volume.array, untiled.volume.array, atol=1e-4 * spread)


def test_a_fuser_refuses_plane_weights_it_was_not_trained_with(fused_bundle, lr_volume):
    with pytest.raises(BundleError, match="trained with the 'ema' plane weights"):
        super_resolve(lr_volume, fused_bundle, options(method="score-fusion", weights="raw"))
    manifest = read_manifest(fused_bundle)
    manifest.fuser["plane_sha256"]["axial"] = "0" * 64
    write_manifest(fused_bundle, manifest)
    with pytest.raises(BundleError, match="axial plane model changed after the fuser was trained"):
        super_resolve(lr_volume, fused_bundle, options(method="score-fusion"))


def test_a_corrupted_fuser_file_is_refused(fused_bundle, lr_volume):
    path = fused_bundle / "fuser-crops.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match="corrupted or was replaced"):
        super_resolve(lr_volume, fused_bundle, options(method="score-fusion"))


def test_several_samples_give_their_mean_and_standard_deviation(fused_bundle, lr_volume):
    both = super_resolve(lr_volume, fused_bundle, options(method="average", samples=2, seed=5))
    one = [super_resolve(lr_volume, fused_bundle, options(method="average", seed=s)).volume.array for s in (5, 6)]
    np.testing.assert_allclose(both.volume.array, (one[0] + one[1]) / 2, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(both.uncertainty.array, np.abs(one[0] - one[1]) / np.sqrt(2), rtol=1e-4, atol=1e-3)
    assert both.uncertainty.same_grid(both.volume)
    assert float(both.uncertainty.array.max()) > 0
    assert both.provenance["samples"] == 2
    assert super_resolve(lr_volume, fused_bundle, options(method="average")).uncertainty is None


def test_cli_writes_an_uncertainty_map_and_refuses_one_without_samples(fused_bundle, lr_volume, tmp_path):
    src = tmp_path / "lr.nii.gz"
    save_volume(lr_volume, src)
    out, unc = tmp_path / "sr.nii.gz", tmp_path / "sd.nii.gz"
    common = ["super-resolve", str(src), "-o", str(out), "--model", str(fused_bundle), "--steps", "2",
              "--device", "cpu", "--no-progress"]
    assert main([*common, "--uncertainty", str(unc)]) == 2
    assert not out.exists() and not unc.exists() and not (tmp_path / "sr.json").exists()
    assert main([*common, "--samples", "2", "--uncertainty", str(unc), "--tile-size", "8"]) == 0
    sd = load_volume(unc)
    assert sd.same_grid(load_volume(out))
    provenance = json.loads((tmp_path / "sr.json").read_text())
    assert provenance["method"] == "score-fusion" and provenance["samples"] == 2 and provenance["tile_size"] == 8


@pytest.mark.parametrize("bad, message", [({"tile_size": 4}, "tile size"), ({"samples": 0}, "samples"),
                                          ({"max_memory_gb": -1.0}, "memory bound"), ({"amp": "fp8"}, "mixed")])
def test_bad_sampling_options_are_refused(fused_bundle, lr_volume, bad, message):
    with pytest.raises(InputError, match=message):
        super_resolve(lr_volume, fused_bundle, options(**bad))


def test_dual_condition_planes_are_fused_with_every_condition_as_fuser_input(mt_bundle, tmp_path):
    """Route B: 2.5D planes taking t1n and t2w, and a 3-plane fuser whose input holds both conditions."""
    bundle = tmp_path / "mt"
    shutil.copytree(mt_bundle, bundle)
    add_fuser(bundle, aligned=True, random_seed=3)
    assert read_manifest(bundle).fuser["config"]["in_channels"] == 1 + 2 + 3 + 1 + 3
    rng = np.random.default_rng(7)
    t1, t2 = (Volume(blob((9, 10, 11), rng, offset=o), np.diag([1.0, 1.2, 1.5, 1.0])) for o in (0.0, 3.0))
    fused = synthesize({"t1n": t1, "t2w": t2}, bundle, options(method="score-fusion", tile_size=8))
    average = synthesize({"t1n": t1, "t2w": t2}, bundle, options(method="average"))
    assert fused.volume.same_grid(t1) and np.array_equal(fused.volume.affine, t1.affine)
    assert np.isfinite(fused.volume.array).all()
    # a randomised fuser really changes the estimate (the test would catch score-fusion silently averaging)
    assert np.abs(fused.volume.array - average.volume.array).max() > 1e-3 * float(np.ptp(average.volume.array))
