"""Segmentation core: region coding, segmenter bundles, preprocessing and sliding-window inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segmenter_fixtures import make_random_segmenter, tumour_volumes

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from ScoreFusionLib.bundle import BundleError, load_weights  # noqa: E402
from ScoreFusionLib.errors import GeometryError, InputError  # noqa: E402
from ScoreFusionLib.labels import CONVENTIONS  # noqa: E402
from ScoreFusionLib.segmentation import inference  # noqa: E402
from ScoreFusionLib.segmentation.defaults import resolve_segmenter  # noqa: E402
from ScoreFusionLib.segmentation.inference import segment, window_count  # noqa: E402
from ScoreFusionLib.segmentation.model_bundle import (  # noqa: E402
    load_segmenter,
    read_segmenter_manifest,
    validate_segmenter_bundle,
)
from ScoreFusionLib.segmentation.network import SegmenterNetwork  # noqa: E402
from ScoreFusionLib.segmentation.preprocess import normalize_nonzero, zero_outside_head  # noqa: E402
from ScoreFusionLib.segmentation.regions import labels_to_regions, regions_to_labels  # noqa: E402
from ScoreFusionLib.volume import Volume  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_segmenter(tmp_path_factory.mktemp("seg") / "bundle")


# -- regions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_labels_round_trip_through_regions_exactly(convention):
    rng = np.random.default_rng(0)
    values = [0, *(v for c, v in CONVENTIONS[convention].items() if c != "resection_cavity")]
    labels = rng.choice(values, size=(6, 7, 8)).astype(np.uint8)
    regions = labels_to_regions(labels, convention)
    assert regions.shape == (3, 6, 7, 8) and regions.dtype == bool
    np.testing.assert_array_equal(regions_to_labels(regions, convention), labels)


def test_decoding_enforces_nesting_and_convention():
    tc, wt, et = (np.zeros((1, 1, 4), bool) for _ in range(3))
    et[..., 0] = True  # ET alone -> still enhancing
    tc[..., 1] = True  # TC without WT -> necrotic
    wt[..., 2] = True  # WT only -> oedema
    regions = np.stack([tc, wt, et])
    assert regions_to_labels(regions, "brats2023").ravel().tolist() == [3, 1, 2, 0]
    assert regions_to_labels(regions, "brats2021").ravel().tolist() == [4, 1, 2, 0]
    with pytest.raises(InputError, match="boolean region masks"):
        regions_to_labels(regions.astype(np.uint8), "brats2023")


# -- bundles ------------------------------------------------------------------------------------


def test_bundle_round_trip_and_loading(bundle):
    manifest = validate_segmenter_bundle(bundle)
    assert manifest.channels == ("t1n", "t1c", "t2w", "t2f")
    loaded = load_segmenter(bundle)
    assert not loaded.network.training
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["format"] == "scorefusion-segmenter" and data["outputs"]["regions"] == ["TC", "WT", "ET"]
    assert read_segmenter_manifest(bundle).to_dict()["weights"] == data["weights"]


def _copy(bundle: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "copy"
    shutil.copytree(bundle, dest)
    return dest


def _edit(bundle: Path, **fields) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    for key, value in fields.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: (b / "segmenter.safetensors").write_bytes((b / "segmenter.safetensors").read_bytes()[:-100]),
         "truncated|corrupted"),
        (lambda b: (b / "segmenter.safetensors").unlink(), "missing"),
        (lambda b: _edit(b, weights__sha256="0" * 64), "corrupted or was replaced"),
        (lambda b: _edit(b, network__init_filters=16), "the network expects"),
        (lambda b: _edit(b, network__blocks_down=[1, 2]), "does not fit the network"),
        (lambda b: _edit(b, format="scorefusion-bundle"), "not a ScoreFusion segmenter manifest"),
        (lambda b: _edit(b, format_version=99), "format version 99"),
        (lambda b: _edit(b, channels=["t1n", "t1n", "t2w", "t2f"]), "different contrasts"),
        (lambda b: _edit(b, layout="xyz"), "unknown tensor layout"),
        (lambda b: _edit(b, label_convention="brats2099"), "unknown label convention"),
        (lambda b: _edit(b, inference__roi_size_ijk=[15, 16, 16]), "multiples of 2"),
        (lambda b: _edit(b, weights__file="../escape.safetensors"), "plain file name"),
        (lambda b: (b / "manifest.json").write_text("{"), "not valid JSON"),
    ],
)
def test_damaged_bundles_are_refused_with_a_specific_message(bundle, tmp_path, damage, message):
    copy = _copy(bundle, tmp_path)
    damage(copy)
    with pytest.raises((BundleError, InputError), match=message):
        load_segmenter(copy)


def test_resolve_segmenter_refuses_translation_bundles_and_missing_folders(tmp_path):
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "manifest.json").write_text(json.dumps({"format": "scorefusion-bundle"}))
    with pytest.raises(BundleError, match="not a segmenter bundle"):
        resolve_segmenter(tmp_path / "tb")
    with pytest.raises(BundleError, match="not found"):
        resolve_segmenter(tmp_path / "nothing")


def test_network_configuration_is_checked():
    with pytest.raises(InputError, match="multiple of 8"):
        SegmenterNetwork(init_filters=12)
    with pytest.raises(InputError, match="one more down level"):
        SegmenterNetwork(blocks_down=(1, 2), blocks_up=(1, 1))
    assert SegmenterNetwork.preset("monai-brats").divisor == 8


# -- preprocessing ----------------------------------------------------------------------------


def test_nonzero_normalisation_keeps_zeros_and_standardises_the_rest():
    rng = np.random.default_rng(1)
    stack = np.zeros((2, 5, 6, 7), np.float32)
    stack[0, 1:4, 1:5, 1:6] = rng.normal(300, 40, (3, 4, 5))
    out = normalize_nonzero(stack)
    inside = stack[0] != 0
    assert np.all(out[0][~inside] == 0) and np.all(out[1] == 0)  # an all-zero channel stays zero
    assert abs(out[0][inside].mean()) < 1e-5 and abs(out[0][inside].std() - 1) < 1e-4


def test_zero_outside_head_uses_the_real_inputs_background():
    volumes, _ = tumour_volumes()
    synthetic = volumes["t2f"].with_array(volumes["t2f"].array + 50)  # a nonzero background
    masked = zero_outside_head(synthetic, [volumes["t1n"], volumes["t2w"]])
    head = (volumes["t1n"].array != 0) | (volumes["t2w"].array != 0)
    np.testing.assert_array_equal(masked.array[~head], 0)
    np.testing.assert_array_equal(masked.array[head], synthetic.array[head])


# -- inference -----------------------------------------------------------------------------------


def test_segment_returns_labels_and_probabilities_on_the_input_grid(bundle):
    volumes, _ = tumour_volumes()
    before = {n: v.array.copy() for n, v in volumes.items()}
    calls = []
    result = segment(volumes, bundle, device="cpu", progress=lambda d, t: calls.append((d, t)))
    assert result.labels.same_grid(volumes["t1n"]) and result.labels.array.dtype == np.uint8
    assert set(np.unique(result.labels.array)) <= {0, 1, 2, 3}
    for region, p in result.probabilities.items():
        assert p.same_grid(volumes["t1n"]) and 0 <= p.array.min() and p.array.max() <= 1, region
    # the labels are exactly the thresholded probabilities decoded
    regions = np.stack([result.probabilities[r].array >= 0.5 for r in ("TC", "WT", "ET")])
    np.testing.assert_array_equal(result.labels.array, regions_to_labels(regions, "brats2023"))
    total = window_count((20, 24, 22), (16, 16, 16), 0.5)
    assert calls == [(i, total) for i in range(1, total + 1)] and total == 8
    for name, array in before.items():
        np.testing.assert_array_equal(volumes[name].array, array)  # inputs untouched
    assert result.provenance()["label_convention"] == "brats2023"


def test_label_convention_override_recodes_enhancing(bundle, monkeypatch):
    volumes, truth = tumour_volumes()
    fake = labels_to_regions(truth, "brats2023").astype(np.float32)
    monkeypatch.setattr(inference, "predict_probabilities", lambda *a, **k: fake)
    labels23 = segment(volumes, bundle, device="cpu").labels.array
    labels21 = segment(volumes, bundle, device="cpu", label_convention="brats2021").labels.array
    np.testing.assert_array_equal(labels23, truth)
    np.testing.assert_array_equal(labels21 == 4, truth == 3)
    with pytest.raises(InputError, match="unknown label convention"):
        segment(volumes, bundle, device="cpu", label_convention="brats1999")


def test_non_ras_inputs_give_the_reoriented_result_exactly(bundle):
    volumes, _ = tumour_volumes()
    ras = segment(volumes, bundle, device="cpu")
    # the same head stored flipped along i and with i and k swapped (an LPS-like file)
    perm = np.array([[0, 0, -2, 0], [0, 2, 0, 0], [2, 0, 0, 0], [0, 0, 0, 1.0]])
    n_i = volumes["t1n"].array.shape[2]
    perm[0, 3] = 2.0 * (n_i - 1)

    def to_file(v: Volume) -> Volume:
        arr = np.transpose(v.array[:, :, ::-1], (2, 1, 0))  # k <-> i swap after flipping i
        return Volume(np.ascontiguousarray(arr), perm)

    flipped = {n: to_file(v) for n, v in volumes.items()}
    result = segment(flipped, bundle, device="cpu")
    assert result.labels.same_grid(flipped["t1n"])
    np.testing.assert_array_equal(result.labels.array, to_file(ras.labels).array)


def test_other_voxel_sizes_are_resampled_and_mapped_back(bundle):
    volumes, _ = tumour_volumes(shape_kji=(30, 36, 32), spacing=1.0)
    result = segment(volumes, bundle, device="cpu")
    assert result.labels.same_grid(volumes["t1n"])


def test_zero_filled_channel_is_accepted(bundle):
    volumes, _ = tumour_volumes()
    volumes["t2f"] = volumes["t2f"].with_array(np.zeros_like(volumes["t2f"].array))
    assert segment(volumes, bundle, device="cpu").labels.same_grid(volumes["t1n"])


def test_bad_inputs_get_specific_errors(bundle):
    volumes, _ = tumour_volumes()
    with pytest.raises(InputError, match="missing: t2f"):
        segment({n: v for n, v in volumes.items() if n != "t2f"}, bundle, device="cpu")
    shifted = dict(volumes, t2w=Volume(volumes["t2w"].array, np.diag([2.0, 2.0, 2.1, 1.0])))
    with pytest.raises(GeometryError, match="different IJK->RAS"):
        segment(shifted, bundle, device="cpu")
    bad = volumes["t1c"].array.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        segment(dict(volumes, t1c=volumes["t1c"].with_array(bad)), bundle, device="cpu")
    with pytest.raises(InputError, match="given twice"):
        segment({**volumes, "flair": volumes["t2f"]}, bundle, device="cpu")
    with pytest.raises(InputError, match="overlap"):
        segment(volumes, bundle, device="cpu", overlap=1.0)


def test_the_default_segmenter_is_shipped_valid_and_shares_the_translation_models_split(tmp_path, monkeypatch):
    from ScoreFusionLib.bundle import read_manifest
    from ScoreFusionLib.registry import resolve_model

    monkeypatch.setenv("SCOREFUSION_HOME", str(tmp_path))  # the embedded models are unpacked here
    from ScoreFusionLib.segmentation.defaults import default_segmenter_path

    assert default_segmenter_path().stat().st_size < 6 * 2**20
    path = resolve_segmenter("default")
    assert path.is_relative_to(tmp_path) and resolve_segmenter("tumour-seg-sim") == path  # unpacked once
    manifest = validate_segmenter_bundle(path)
    assert manifest.model["id"] == "tumour-seg-sim" and (path / manifest.model["card"]).is_file()
    assert set(load_weights(path / manifest.weights_file, "ema")) and not _has_raw(path / manifest.weights_file)
    assert manifest.channels == ("t1n", "t1c", "t2w", "t2f") and manifest.label_convention == "brats2023"
    assert min(manifest.metrics["held_out_dice"].values()) > 0.85
    translation = read_manifest(resolve_model("t1-to-flair")).training
    assert manifest.training["train_case_ids"] == translation["train_case_ids"]
    assert not set(manifest.metrics["held_out_cases"]) & set(translation["train_case_ids"])


def _has_raw(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("raw/") for k in f.keys())


def test_packing_keeps_the_ema_weights_is_reproducible_and_unpacks_validated(bundle, tmp_path, monkeypatch, capsys):
    from ScoreFusionLib.cli.main import main
    from ScoreFusionLib.segmentation.packing import pack_segmenter

    monkeypatch.setenv("SCOREFUSION_HOME", str(tmp_path / "home"))
    sha = pack_segmenter(bundle, tmp_path / "a.zip")
    assert main(["models", "pack", str(bundle), "--out", str(tmp_path / "b.zip")]) == 0
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes() and sha in capsys.readouterr().out
    unpacked = resolve_segmenter(tmp_path / "a.zip")
    assert unpacked.parent.name == "archives" and unpacked.name == sha
    assert not _has_raw(unpacked / "segmenter.safetensors")
    for key, value in load_weights(bundle / "segmenter.safetensors", "ema").items():
        assert torch.equal(load_weights(unpacked / "segmenter.safetensors", "ema")[key], value)
    volumes, _ = tumour_volumes()
    np.testing.assert_array_equal(segment(volumes, unpacked, device="cpu").labels.array,
                                  segment(volumes, bundle, device="cpu").labels.array)
    # segmenters are not registry models; a translation zip is not a segmenter
    assert main(["models", "pack", str(bundle), "--out", str(tmp_path / "c.zip"), "--registry", "r.json"]) == 2
    assert "segmenters are not registry models" in capsys.readouterr().err and not (tmp_path / "c.zip").exists()
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="neither a segmenter bundle folder nor a bundle .zip"):
        resolve_segmenter(tmp_path / "junk.zip")
