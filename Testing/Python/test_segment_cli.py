"""``scorefusion segment``: labels on the input grid, refusals that write nothing, synthesis of a missing contrast,
and the label convention chosen from BraTS file names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bundle_fixtures import make_random_bundle
from segmenter_fixtures import make_random_segmenter, tumour_volumes

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from ScoreFusionLib.cli import segment_cmd  # noqa: E402
from ScoreFusionLib.cli.main import main as scorefusion  # noqa: E402
from ScoreFusionLib.cli.segment_cmd import detect_label_convention  # noqa: E402
from ScoreFusionLib.data.task import TaskSpec  # noqa: E402
from ScoreFusionLib.errors import InputError, VolumeFileError  # noqa: E402
from ScoreFusionLib.segmentation import inference  # noqa: E402
from ScoreFusionLib.segmentation.inference import segment  # noqa: E402
from ScoreFusionLib.segmentation.model_bundle import read_segmenter_manifest  # noqa: E402
from ScoreFusionLib.volume import Volume  # noqa: E402
from ScoreFusionLib.volume_io import load_volume, save_volume  # noqa: E402

#: LPS-like (i -> left, k -> posterior) with j and k permuted, 2 mm: nothing about it is RAS.
LPS_PERMUTED = np.array([[-2.0, 0.0, 0.0, 90.0], [0.0, 0.0, -2.0, 110.0], [0.0, 2.0, 0.0, -60.0], [0, 0, 0, 1]])
FLAGS = {"t1n": "--t1", "t1c": "--t1ce", "t2w": "--t2", "t2f": "--flair"}
PLAIN = {"t1n": "t1.nii.gz", "t1c": "t1ce.nii.gz", "t2w": "t2.nii.gz", "t2f": "flair.nii.gz"}


@pytest.fixture(scope="module")
def seg2023(tmp_path_factory) -> Path:
    return make_random_segmenter(tmp_path_factory.mktemp("seg") / "b2023", convention="brats2023")


@pytest.fixture(scope="module")
def seg2021(tmp_path_factory) -> Path:
    return make_random_segmenter(tmp_path_factory.mktemp("seg") / "b2021", seed=1, convention="brats2021")


def write_case(folder: Path, names: dict[str, str] = PLAIN, affine: np.ndarray = LPS_PERMUTED,
               contrasts=("t1n", "t1c", "t2w", "t2f"), seed: int = 0) -> dict[str, Path]:
    """The four tumour contrasts saved under ``names`` with ``affine``; contrast -> file."""
    volumes, _ = tumour_volumes(shape_kji=(20, 24, 22), spacing=2.0, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    return {c: save_volume(Volume(volumes[c].array, affine), folder / names[c]) for c in contrasts}


def main(args: list[str]) -> int:
    """``scorefusion segment ARGS`` through the real command-line entry point."""
    return scorefusion(["segment", *args])


def argv(files: dict[str, Path], output: Path, *extra: str) -> list[str]:
    args = [item for c, path in files.items() for item in (FLAGS[c], str(path))]
    return [*args, "-o", str(output), "--device", "cpu", *extra]


def fake_probabilities(segmenter, stack, spacing_ijk, overlap=None, sw_batch_size=1, progress=None):
    """Nested TC/WT/ET spheres in the middle of the RAS stack (a segmenter that surely finds enhancing tumour)."""
    shape = stack.shape[1:]
    grid = np.indices(shape)
    r = np.sqrt(sum((g - (n - 1) / 2) ** 2 for g, n in zip(grid, shape)))
    tc, wt, et = (r < 4).astype(np.float32), (r < 6).astype(np.float32), (r < 2).astype(np.float32)
    if progress is not None:
        progress(1, 1)
    return np.stack([tc, wt, et]) * 0.9 + 0.05


# -- the label map and its geometry ------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_labels_lie_on_the_input_grid_and_match_the_library(seg2023, tmp_path, suffix):
    files = write_case(tmp_path / "case")
    out = tmp_path / "out" / f"seg{suffix}"
    probs = tmp_path / "probs"
    assert main(argv(files, out, "--model", str(seg2023), "--probabilities", str(probs), "--quiet")) == 0

    reference = load_volume(files["t1n"])
    labels = load_volume(out)
    assert labels.array.dtype == np.uint8
    assert labels.array.shape == reference.array.shape
    if suffix == ".nii.gz":
        assert np.array_equal(labels.affine, reference.affine)  # bit-identical geometry
    else:  # NRRD goes through LPS and back: exact up to float rounding
        np.testing.assert_allclose(labels.affine, reference.affine, rtol=0, atol=1e-9)
    expected = segment({c: load_volume(p) for c, p in files.items()}, seg2023, device="cpu")
    np.testing.assert_array_equal(labels.array, expected.labels.array)
    for region, volume in expected.probabilities.items():
        written = load_volume(probs / f"{region}.nii.gz")
        assert np.array_equal(written.affine, reference.affine)
        np.testing.assert_allclose(written.array, volume.array, rtol=0, atol=1e-6)

    sidecar = json.loads((tmp_path / "out" / "seg.json").read_text())
    manifest = read_segmenter_manifest(seg2023)
    assert sidecar["segmenter"]["weights_sha256"] == manifest.weights_sha256
    assert sidecar["segmenter"]["path"] == str(seg2023.resolve())
    assert sidecar["inputs"]["t2f"]["flag"] == "--flair"
    assert len(sidecar["inputs"]["t2f"]["sha256"]) == 64 and sidecar["inputs"]["t1n"]["file"] == str(files["t1n"])
    assert sidecar["label_convention"] == "brats2023"
    assert sidecar["label_convention_from"] == "auto: the segmenter's default"
    assert sidecar["synthesis"] is None
    assert "not for diagnosis" in sidecar["intended_use"]
    assert sidecar["seconds"]["total"] >= sidecar["seconds"]["segmentation"] > 0


# -- refusals: exit 2, one line, nothing written ------------------------------------------------


def _break(case: dict[str, Path], tmp_path: Path, how: str) -> tuple[dict[str, Path], str]:
    """Damage one input of a good case; returns the inputs to pass and what the message must say."""
    files = dict(case)
    if how == "nan":
        v = load_volume(files["t2f"])
        a = v.array.copy()
        a[3, 4, 5] = np.nan
        files["t2f"] = save_volume(v.with_array(a), tmp_path / "nan-flair.nii.gz")
        return files, r"--flair nan-flair\.nii\.gz contains 1 NaN"
    if how == "constant":
        v = load_volume(files["t2w"])
        files["t2w"] = save_volume(v.with_array(np.full(v.array.shape, 7, np.float32)), tmp_path / "flat.nii.gz")
        return files, r"--t2 flat\.nii\.gz is constant"
    if how == "grid":
        v = load_volume(files["t1c"])
        shifted = v.affine.copy()
        shifted[0, 3] += 4.0
        files["t1c"] = save_volume(Volume(v.array, shifted), tmp_path / "moved.nii.gz")
        return files, r"'--t1ce moved\.nii\.gz' and '--t1 t1\.nii\.gz' have different IJK->RAS"
    if how == "absent":
        del files["t2f"]
        return files, r"missing: --flair"
    if how == "no-file":
        files["t2w"] = tmp_path / "typo.nii.gz"
        return files, r"--t2: no such file"
    if how == "corrupt":
        files["t1n"] = tmp_path / "broken.nii.gz"
        files["t1n"].write_bytes(case["t1n"].read_bytes()[:200])
        return files, r"--t1: cannot read broken\.nii\.gz"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["nan", "constant", "grid", "absent", "no-file", "corrupt"])
def test_bad_inputs_exit_2_and_write_nothing(seg2023, tmp_path, capsys, how):
    files, message = _break(write_case(tmp_path / "case"), tmp_path, how)
    out = tmp_path / "out" / "seg.nii.gz"
    assert main(argv(files, out, "--model", str(seg2023), "--probabilities", str(tmp_path / "out" / "p"),
                     "--quiet")) == 2
    err = capsys.readouterr().err
    assert err.startswith("scorefusion segment: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_failed_write_removes_everything_this_run_wrote(seg2023, tmp_path, monkeypatch):
    import ScoreFusionLib.volume_io as volume_io

    files = write_case(tmp_path / "case")
    out = tmp_path / "out" / "seg.nii.gz"
    real_save = volume_io.save_volume

    def failing_save(volume, path, description=None):
        if Path(path) == out:  # the label map is written last: maps and sidecar already exist
            raise VolumeFileError("disk full")
        return real_save(volume, path, description)

    monkeypatch.setattr(volume_io, "save_volume", failing_save)
    assert main(argv(files, out, "--model", str(seg2023), "--probabilities", str(tmp_path / "out" / "p"),
                     "--quiet")) == 2
    assert not (tmp_path / "out").exists()


def test_outputs_must_not_collide_with_each_other_or_the_inputs(seg2023, tmp_path, capsys):
    files = write_case(tmp_path / "case")
    assert main(argv(files, files["t1n"], "--model", str(seg2023), "--quiet")) == 2
    assert "overwrite an input" in capsys.readouterr().err
    assert main(argv(files, tmp_path / "seg.dcm", "--model", str(seg2023), "--quiet")) == 2
    assert "write the label map as one of" in capsys.readouterr().err
    assert main(argv(files, tmp_path / "seg.nii", "--model", str(seg2023), "--overlap", "1.5")) == 2
    assert "--overlap" in capsys.readouterr().err
    assert not (tmp_path / "seg.nii").exists() and not (tmp_path / "seg.json").exists()


# -- synthesizing the missing contrast -----------------------------------------------------------


def test_synthesize_missing_flair_end_to_end(seg2023, mt_bundle, tmp_path):
    files = write_case(tmp_path / "case", contrasts=("t1n", "t1c", "t2w"))
    out = tmp_path / "out" / "seg.nii.gz"
    saved = tmp_path / "out" / "flair-syn.nii.gz"
    code = main(argv(files, out, "--model", str(seg2023), "--synthesize-missing", "flair",
                     "--translation-model", str(mt_bundle), "--method", "average", "--sampler", "ddim",
                     "--steps", "2", "--seed", "5", "--save-synthesized", str(saved), "--quiet"))
    assert code == 0
    given = {c: load_volume(p) for c, p in files.items()}
    synthesized = load_volume(saved)
    assert np.array_equal(synthesized.affine, given["t1n"].affine)
    outside = np.all([v.array == 0 for v in given.values()], axis=0)
    assert outside.any() and np.all(synthesized.array[outside] == 0)  # background of the real inputs
    assert np.abs(synthesized.array[~outside]).max() > 0
    # the label map is the segmentation of exactly the saved synthesized FLAIR with the real contrasts
    expected = segment({**given, "t2f": synthesized}, seg2023, device="cpu").labels
    labels = load_volume(out)
    np.testing.assert_array_equal(labels.array, expected.array)
    assert np.array_equal(labels.affine, given["t1n"].affine)

    sidecar = json.loads((tmp_path / "out" / "seg.json").read_text())
    synthesis = sidecar["synthesis"]
    assert synthesis["contrast"] == "t2f" and synthesis["translation_model"] == str(mt_bundle.resolve())
    assert (synthesis["method"], synthesis["sampler"], synthesis["steps"], synthesis["seed"]) == ("average", "ddim",
                                                                                                  2, 5)
    assert synthesis["zeroed_where_all_given_inputs_are_zero"] is True
    assert sidecar["seconds"]["synthesis"] > 0
    assert "t2f" not in sidecar["inputs"]
    assert json.loads((tmp_path / "out" / "flair-syn.json").read_text())["contrast"] == "t2f"


def test_synthesis_refuses_unsuitable_models_and_requests(seg2023, mt_bundle, sr_bundle, tmp_path, capsys):
    files = write_case(tmp_path / "case")
    three = {c: p for c, p in files.items() if c != "t2f"}
    wrong_target = make_random_bundle(tmp_path / "t1-to-t2", TaskSpec(kind="mt", inputs=["t1n"], target="t2w"),
                                      planes=("axial",))
    needs_pd = make_random_bundle(tmp_path / "pd-to-flair", TaskSpec(kind="mt", inputs=["pdw"], target="t2f"),
                                  planes=("axial",))
    out = tmp_path / "out" / "seg.nii.gz"
    cases = [
        (three, ["--synthesize-missing", "flair", "--translation-model", str(wrong_target)],
         "synthesizes t2w, not the missing t2f"),
        (three, ["--synthesize-missing", "flair", "--translation-model", str(sr_bundle)], "'sr' model"),
        (three, ["--synthesize-missing", "flair", "--translation-model", str(needs_pd)], "not given: pdw"),
        (files, ["--synthesize-missing", "flair", "--translation-model", str(mt_bundle)], "--flair is given"),
        (three, ["--synthesize-missing", "flair"], "needs --translation-model"),
        ({c: p for c, p in three.items() if c != "t2w"}, ["--synthesize-missing", "flair", "--translation-model",
                                                          str(mt_bundle)], "missing: --t2"),
        (files, ["--translation-model", str(mt_bundle)], "only used with --synthesize-missing"),
    ]
    for inputs, extra, message in cases:
        assert main(argv(inputs, out, "--model", str(seg2023), "--quiet", *extra)) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (message, err)
    assert not (tmp_path / "out").exists()


# -- label conventions ---------------------------------------------------------------------------


BRATS2021 = {c: f"BraTS2021_00017_{s}.nii.gz" for c, s in zip(PLAIN, ("t1", "t1ce", "t2", "flair"))}
BRATS2023 = {c: f"BraTS-GLI-00017-000-{c}.nii.gz" for c in PLAIN}


def test_auto_labels_follow_brats_file_names(seg2021, seg2023, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inference, "predict_probabilities", fake_probabilities)

    def run(names, model, *extra):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        files = write_case(folder, names)
        out = folder / "seg.nii.gz"
        assert main(argv(files, out, "--model", str(model), *extra)) == 0
        sidecar = json.loads((folder / "seg.json").read_text())
        return set(np.unique(load_volume(out).array).tolist()), sidecar

    values, sidecar = run(BRATS2021, seg2023)  # the model's own convention would put ET at 3
    assert values == {0, 1, 2, 4}
    assert sidecar["label_convention"] == "brats2021" and "BraTS2021_00017_" in sidecar["label_convention_from"]
    assert sidecar["labels"]["enhancing"] == 4
    assert "wrote" in capsys.readouterr().out  # without --quiet the command reports what it wrote

    values, sidecar = run(BRATS2023, seg2021)
    assert values == {0, 1, 2, 3} and sidecar["label_convention"] == "brats2023"
    values, sidecar = run(PLAIN, seg2021)  # no BraTS naming: the segmenter's convention
    assert values == {0, 1, 2, 4} and sidecar["label_convention_from"] == "auto: the segmenter's default"
    values, sidecar = run(BRATS2021, seg2021, "--labels", "brats2023")  # explicit beats the names
    assert values == {0, 1, 2, 3} and sidecar["label_convention_from"] == "--labels"

    mixed = {**BRATS2021, "t2f": BRATS2023["t2f"]}
    files = write_case(tmp_path / "mixed", mixed)
    assert main(argv(files, tmp_path / "mixed" / "seg.nii.gz", "--model", str(seg2021), "--quiet")) == 2
    assert "different label conventions" in capsys.readouterr().err
    assert not (tmp_path / "mixed" / "seg.nii.gz").exists()


def test_label_convention_detection_uses_the_dataset_naming_rules():
    assert detect_label_convention([Path("x/BraTS2021_00000_t1ce.nii.gz")]) == ("brats2021",
                                                                                 "BraTS2021_00000_t1ce.nii.gz")
    assert detect_label_convention([Path("t1.nii.gz"), Path("BraTS-MEN-00012-001-t2f.nii")])[0] == "brats2023"
    for name in ("t1.nii.gz", "BraTS2021_00000_t1n.nii.gz", "BraTS2021_00000-t1.nii.gz", "BraTS2021_00000_t1.nrrd",
                 "BraTS-GLI-00000-000_t1n.nii.gz"):
        assert detect_label_convention([Path(name)]) == (None, None), name
    with pytest.raises(InputError, match="different label conventions"):
        detect_label_convention([Path("BraTS2021_00000_t1.nii.gz"), Path("BraTS-GLI-00000-000-t1n.nii.gz")])


def test_synthesis_choices_match_the_translation_pipeline():
    from ScoreFusionLib import translate

    assert segment_cmd.METHODS == translate.METHODS and segment_cmd.SAMPLERS == translate.SAMPLERS
