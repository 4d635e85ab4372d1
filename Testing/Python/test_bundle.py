"""Bundle loading refuses anything but complete, verified safetensors weights."""

from __future__ import annotations

import json

import pytest
import torch

from bundle_fixtures import make_random_bundle
from ScoreFusionLib.bundle import (
    BundleError,
    load_plane_models,
    load_weights,
    read_manifest,
    save_weights,
    sha256_file,
)
from ScoreFusionLib.data.task import TaskSpec
from ScoreFusionLib.degradation import AveragePool


@pytest.fixture
def bundle(tmp_path):
    spec = TaskSpec(kind="sr", inputs=[], target="t1n", degradation=AveragePool(2))
    return make_random_bundle(tmp_path / "b", spec, planes=("axial", "sagittal"))


def test_round_trip_loads_the_saved_weights(bundle):
    manifest, models = load_plane_models(bundle)
    assert set(models) == {"axial", "sagittal"}
    saved = load_weights(bundle / manifest.planes["axial"].file, "ema")
    for key, value in models["axial"].state_dict().items():
        assert torch.equal(value, saved[key])
    assert not models["axial"].training
    assert manifest.task["degradation"] == {"type": "average_pool", "factors": [2, 2, 2]}


def test_corrupted_weights_fail_the_checksum(bundle):
    path = bundle / "plane-axial.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupted or was replaced"):
        load_plane_models(bundle)


def test_truncated_file_without_checksum_is_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {"ema": {"a": torch.zeros(100)}})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(BundleError, match="cannot read weight file"):
        load_weights(path, "ema")


def test_missing_extra_and_misshapen_tensors_are_named(bundle):
    manifest = read_manifest(bundle)
    entry = manifest.planes["axial"]
    state = load_weights(bundle / entry.file, "ema")
    first = next(iter(state))
    # missing tensor
    partial = dict(state)
    partial.pop(first)
    _rewrite(bundle, entry.file, partial)
    with pytest.raises(BundleError, match="1 missing tensors"):
        load_plane_models(bundle, ["axial"])
    # wrong shape
    bad = dict(state)
    bad[first] = torch.zeros(3, 3)
    _rewrite(bundle, entry.file, bad)
    with pytest.raises(BundleError, match="has shape"):
        load_plane_models(bundle, ["axial"])
    # wrong dtype
    bad = dict(state)
    bad[first] = state[first].double()
    _rewrite(bundle, entry.file, bad)
    with pytest.raises(BundleError, match="dtype"):
        load_plane_models(bundle, ["axial"])
    # extra tensor
    extra = dict(state)
    extra["surplus.weight"] = torch.zeros(1)
    _rewrite(bundle, entry.file, extra)
    with pytest.raises(BundleError, match="1 unexpected tensors"):
        load_plane_models(bundle, ["axial"])


def _rewrite(bundle, name, state):
    """Replace a weight file and update its checksum, so only the content check can object."""
    sha = save_weights(bundle / name, {"raw": state, "ema": state})
    manifest_path = bundle / "manifest.json"
    data = json.loads(manifest_path.read_text())
    for entry in data["planes"].values():
        if entry["file"] == name:
            entry["sha256"] = sha
    manifest_path.write_text(json.dumps(data))
    assert sha == sha256_file(bundle / name)


def test_manifest_problems_are_specific(bundle, tmp_path):
    with pytest.raises(BundleError, match="manifest.json not found"):
        read_manifest(tmp_path)
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(BundleError, match="format version 99"):
        read_manifest(bundle)
    path.write_text(json.dumps({**data, "format": "something-else"}))
    with pytest.raises(BundleError, match="not a ScoreFusion bundle"):
        read_manifest(bundle)
    path.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundle)
    broken = dict(data)
    del broken["planes"]
    path.write_text(json.dumps(broken))
    with pytest.raises(BundleError, match="malformed field"):
        read_manifest(bundle)


def test_unknown_plane_and_weight_set(bundle):
    with pytest.raises(BundleError, match="no coronal model"):
        load_plane_models(bundle, ["coronal"])
    with pytest.raises(BundleError, match="unknown weight set"):
        save_weights(bundle / "x.safetensors", {"best": {"a": torch.zeros(1)}})
    assert not (bundle / "x.safetensors").exists()


def test_missing_weight_file(bundle):
    (bundle / "plane-sagittal.safetensors").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_plane_models(bundle)
