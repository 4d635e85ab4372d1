"""The embedded default models: what ships, and the quality bar they must clear on unseen volumes.

* Every registry model marked ``embedded`` has its archive in ``Resources/``, matching the
  registry's sha256 and size, a model card, and a bundle that unpacks and validates; all of them
  together stay within 30 MB.
* Quality (issue 5), on volumes no model was trained on, with the registry's default sampling:
  Score-Fusion super-resolution x4 beats trilinear interpolation by at least 1 dB PSNR on the
  real ICBM152 T1 under a deformation, bias field and noise from an unseen simulator seed, and on
  the real Colin27 T1 (an anatomy no model saw); each synthesis model beats the best linear
  intensity mapping of its inputs (an oracle least-squares fit against the truth) on a simulated
  case from an unseen seed. Synthesised intensities have no unit, so the model output gets the
  same oracle treatment, the best affine intensity map onto the truth, before it is scored
  (``*_calibrated``): the comparison is of structure, not of units.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ScoreFusionLib.bundle import sha256_file
from ScoreFusionLib.bundle_validation import inspect_bundle
from ScoreFusionLib.demo.compare import LINEAR_MAP, compare_super_resolution, compare_synthesis, registry_sampling
from ScoreFusionLib.demo.inputs import COLIN27_BRAIN, colin27_t1, simulated_contrasts
from ScoreFusionLib.registry import load_registry, resolve_model
from ScoreFusionLib.volume_io import load_volume

MAX_TOTAL_BYTES = 30 * 1024 * 1024
HELD_OUT_SEED = 99  # the training cohorts use seeds 11 (T1 anatomy) and 12 (contrasts with tumours)
SYNTHESIS_SEED = 2026

REGISTRY = load_registry()

# Colin27 comes from Debian's mricron-data, which the Makefile installs where apt is usable:
# off CI a missing copy skips these tests; under CI=true it must be there.
needs_colin27 = pytest.mark.skipif(
    not os.path.exists(COLIN27_BRAIN) and os.environ.get("CI") != "true",
    reason=f"{COLIN27_BRAIN} is missing: apt-get install mricron-data",
)
EMBEDDED = [e for e in REGISTRY if e.embedded]


@pytest.fixture(scope="module", autouse=True)
def cache_home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SCOREFUSION_HOME", str(tmp_path_factory.mktemp("home")))
    yield
    mp.undo()


def test_the_four_default_models_are_embedded_within_30_mb():
    assert {e.id for e in EMBEDDED} == {"t1-sr4-iso", "t1-thick4-axial", "t1-to-flair", "t1-t2-to-flair"}
    total = 0
    for entry in EMBEDDED:
        archive = Path(entry.location())
        assert archive.is_file(), f"{entry.id}: {archive} is missing"
        assert archive.stat().st_size == entry.size
        assert sha256_file(archive) == entry.sha256
        total += entry.size
    print(f"embedded models: {total / 2**20:.1f} MiB in total")
    assert total <= MAX_TOTAL_BYTES


@pytest.mark.parametrize("entry", EMBEDDED, ids=lambda e: e.id)
def test_each_default_model_unpacks_validates_and_has_its_card(entry):
    bundle = resolve_model(entry.id)
    report = inspect_bundle(bundle)
    assert report.model["id"] == entry.id and report.model["version"] == entry.version
    assert report.manifest.task["kind"] == entry.task and report.manifest.task["target"] == entry.target
    assert all(set(sets) == {"ema"} for sets in report.weight_sets.values())  # packed without raw weights
    card = (bundle / report.model["card"]).read_text(encoding="utf-8")
    assert entry.card_path().read_text(encoding="utf-8") == card
    for heading in ("## Training data", "## Training command", "## Measured", "## Limits"):
        assert heading in card, f"{entry.id}: the model card lacks {heading!r}"
    with zipfile.ZipFile(Path(entry.location())) as archive:
        manifest = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("manifest.json"))))
    assert "not for clinical use" in manifest["intended_use"].lower()


def _options(entry):
    return lambda method: registry_sampling(entry, method, seed=0, device="cpu")


@pytest.mark.slow
def test_super_resolution_beats_trilinear_by_1db_on_an_unseen_volume():
    entry = REGISTRY.get("t1-sr4-iso")
    bundle = resolve_model(entry.id)
    grid = json.loads((bundle / "manifest.json").read_text())["grid"]
    truth = simulated_contrasts(grid["shape_ijk"], grid["spacing"][0], seed=HELD_OUT_SEED, t1_source="icbm")[0]["t1n"]
    _, runs = compare_super_resolution(truth, bundle, ["trilinear", "score-fusion"], _options(entry))
    gain = runs["score-fusion"].metrics["psnr"] - runs["trilinear"].metrics["psnr"]
    print(f"SR x4, unseen deformed ICBM T1: trilinear {runs['trilinear'].metrics}, "
          f"score-fusion {runs['score-fusion'].metrics}")
    assert gain >= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("model_id", ["t1-to-flair", "t1-t2-to-flair"])
def test_synthesis_beats_the_best_linear_mapping_on_an_unseen_case(model_id):
    entry = REGISTRY.get(model_id)
    bundle = resolve_model(entry.id)
    grid = json.loads((bundle / "manifest.json").read_text())["grid"]
    images = simulated_contrasts(grid["shape_ijk"], grid["spacing"][0], seed=SYNTHESIS_SEED)[0]
    runs = compare_synthesis(images, bundle, [LINEAR_MAP, "auto"], _options(entry))
    print(f"{model_id}, unseen simulated case: linear map {runs[LINEAR_MAP].metrics}, model {runs['auto'].metrics}")
    model, linear = runs["auto"].metrics, runs[LINEAR_MAP].metrics
    assert model["psnr_calibrated"] > linear["psnr_calibrated"]
    assert model["ssim_calibrated"] > linear["ssim_calibrated"]


@needs_colin27
def test_colin27_is_block_averaged_onto_the_model_grid_around_its_brain():
    source = load_volume(COLIN27_BRAIN)
    volume = colin27_t1((72, 88, 72), 2.0)
    assert volume.shape_ijk == (72, 88, 72)
    assert np.allclose(volume.spacing, 2.0)
    # voxel (i, j, k) of the 2 mm grid is the mean of the 2x2x2 source voxels whose centres it covers
    for ijk in [(36, 44, 36), (20, 60, 30), (50, 30, 45)]:
        centre = volume.affine @ np.array([*ijk, 1.0])
        first = np.rint(np.linalg.solve(source.affine, centre)[:3] - 0.5).astype(int)  # lower source voxel
        block = source.array[first[2]:first[2] + 2, first[1]:first[1] + 2, first[0]:first[0] + 2]
        assert volume.array[ijk[2], ijk[1], ijk[0]] == pytest.approx(float(block.mean()), rel=1e-5, abs=1e-4)
    # the crop is centred on the brain: its centre lies within one 2 mm voxel of the centre of the
    # source brain's bounding box, in world coordinates
    brain_kji = np.argwhere(source.array > 0)
    brain_centre_ijk = (brain_kji.min(axis=0) + brain_kji.max(axis=0))[::-1] / 2.0
    brain_centre = (source.affine @ np.array([*brain_centre_ijk, 1.0]))[:3]
    crop_centre = (volume.affine @ np.array([*((np.array(volume.shape_ijk) - 1) / 2.0), 1.0]))[:3]
    assert np.all(np.abs(crop_centre - brain_centre) <= 2.0)


@pytest.mark.slow
@needs_colin27
def test_super_resolution_beats_trilinear_by_1db_on_colin27():
    """Real anatomy no model saw (Colin27, brain-extracted, 2 mm)."""
    entry = REGISTRY.get("t1-sr4-iso")
    bundle = resolve_model(entry.id)
    truth = colin27_t1((72, 88, 72), 2.0)
    _, runs = compare_super_resolution(truth, bundle, ["trilinear", "score-fusion"], _options(entry))
    print(f"SR x4, Colin27: trilinear {runs['trilinear'].metrics}, score-fusion {runs['score-fusion'].metrics}")
    assert runs["score-fusion"].metrics["psnr"] - runs["trilinear"].metrics["psnr"] >= 1.0
