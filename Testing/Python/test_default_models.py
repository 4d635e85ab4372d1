"""The embedded default models: what ships, and the quality bar they must clear on unseen volumes.

* Every registry model marked ``embedded`` has its archive in ``Resources/``, matching the
  registry's sha256 and size, a model card, and a bundle that unpacks and validates; all of them
  together stay within 30 MB.
* Quality (issue 5), on volumes no model was trained on, with the registry's default sampling:
  Score-Fusion super-resolution x4 beats trilinear interpolation by at least 1 dB PSNR on the real ICBM152 T1
  under a deformation, bias field and noise from an unseen simulator seed; each synthesis model
  beats the best linear intensity mapping of its inputs (an oracle least-squares fit against the
  truth) on a simulated case from an unseen seed. Synthesised intensities have no unit, so the
  model output gets the same oracle treatment, the best affine intensity map onto the truth,
  before it is scored (``*_calibrated``): the comparison is of structure, not of units.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from ScoreFusionLib.bundle import sha256_file
from ScoreFusionLib.bundle_validation import inspect_bundle
from ScoreFusionLib.demo.compare import LINEAR_MAP, compare_super_resolution, compare_synthesis, registry_sampling
from ScoreFusionLib.demo.inputs import simulated_contrasts
from ScoreFusionLib.registry import load_registry, resolve_model

MAX_TOTAL_BYTES = 30 * 1024 * 1024
HELD_OUT_SEED = 99  # the training cohorts use seeds 11 (T1 anatomy) and 12 (contrasts with tumours)
SYNTHESIS_SEED = 2026

REGISTRY = load_registry()
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
