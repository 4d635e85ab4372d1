"""``scorefusion demo`` end to end on the embedded default models (reduced: 2 sampling steps).

The full demo (``make demo``) uses each model's registry defaults; CI runs this reduced version,
which exercises every file, sidecar, metric and figure the full one writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ScoreFusionLib import __version__
from ScoreFusionLib.cli.main import main
from ScoreFusionLib.demo import DemoOptions, run_demo
from ScoreFusionLib.metrics import volume_metrics
from ScoreFusionLib.registry import load_registry
from ScoreFusionLib.volume_io import load_volume

EXPECTED = {
    "sr4": {"input_lowres", "ground_truth", "trilinear", "average", "score-fusion"},
    "flair": {"input_t1n", "ground_truth", "linear-map", "average", "score-fusion"},
}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scorefusion-home")


@pytest.fixture(scope="module")
def demo_run(home, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    mp = pytest.MonkeyPatch()
    mp.setenv("SCOREFUSION_HOME", str(home))
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(["demo", "--out", str(out), "--steps", "2", "--device", "cpu"])
    finally:
        mp.undo()
    return rc, out, stdout.getvalue(), stderr.getvalue()


def test_demo_writes_every_output_with_its_sidecar(demo_run):
    rc, out, stdout, _ = demo_run
    assert rc == 0, stdout
    registry = load_registry()
    for task, names in EXPECTED.items():
        written = {p.name[: -len(".nii.gz")] for p in (out / task).glob("*.nii.gz")}
        assert written == names
        truth = load_volume(out / task / "ground_truth.nii.gz")
        for name in names:
            sidecar = json.loads((out / task / f"{name}.json").read_text())
            assert sidecar["package_version"] == __version__
            assert sidecar["model"]["id"] == registry.get({"sr4": "t1-sr4-iso", "flair": "t1-to-flair"}[task]).id
            assert sidecar["model"]["sha256"] == registry.get(sidecar["model"]["id"]).sha256
            assert len(sidecar["model"]["manifest_sha256"]) == 64
            if name in ("average", "score-fusion"):
                assert (sidecar["method"], sidecar["sampler"], sidecar["steps"], sidecar["seed"]) == (
                    name, registry.get(sidecar["model"]["id"]).sampling.get("sampler", "ddpm"), 2, 0)
                assert sidecar["run"]["method"] == name
            if name != "input_lowres":  # every result lies exactly on the ground truth's grid
                assert load_volume(out / task / f"{name}.nii.gz").same_grid(truth)
    low = load_volume(out / "sr4" / "input_lowres.nii.gz")
    assert np.allclose(low.spacing, 4 * truth.spacing)  # real 8 mm voxels, not a resampled copy


def test_demo_summary_and_printed_table_agree(demo_run):
    rc, out, stdout, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == set(EXPECTED)
    for task, names in EXPECTED.items():
        methods = summary["tasks"][task]["methods"]
        assert set(methods) == names - {"input_lowres", "input_t1n", "ground_truth"}
        for method, row in methods.items():
            assert math.isfinite(row["psnr"]) and -1 <= row["ssim"] <= 1 and row["seconds"] >= 0
            assert f"{task:<7} {method:<14} {row['psnr']:>8.2f} {row['ssim']:>7.4f}" in stdout
    # the numbers describe the files: re-score the written volumes that are scored as they are
    for task, method in (("sr4", "trilinear"), ("sr4", "average"), ("sr4", "score-fusion"), ("flair", "linear-map")):
        truth = load_volume(out / task / "ground_truth.nii.gz").array
        result = load_volume(out / task / f"{method}.nii.gz").array
        metrics = volume_metrics(result, truth)
        assert summary["tasks"][task]["methods"][method]["psnr"] == pytest.approx(metrics["psnr"], abs=1e-3)
        assert summary["tasks"][task]["methods"][method]["ssim"] == pytest.approx(metrics["ssim"], abs=1e-4)
    assert str(out) in stdout and "comparison.png" in stdout


def test_demo_segments_the_tumour_with_every_flair_source(demo_run):
    from ScoreFusionLib.metrics import region_dice

    rc, out, stdout, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    seg = summary["segmentation"]
    sources = ["real", "zero-filled", "average", "score-fusion"]
    assert list(seg["sources"]) == sources and seg["label_convention"] == "brats2023"
    assert seg["segmenter"]["id"] == "tumour-seg-sim" and len(seg["segmenter"]["weights_sha256"]) == 64
    written = {p.name[: -len(".nii.gz")] for p in (out / "segment").glob("*.nii.gz")}
    assert written == {f"labels_{s}" for s in sources} | {"labels_ground_truth"}
    truth = load_volume(out / "segment" / "labels_ground_truth.nii.gz")
    flair_truth = load_volume(out / "flair" / "ground_truth.nii.gz")
    assert truth.same_grid(flair_truth) and (truth.array == 3).any()  # the case has an enhancing tumour
    for source in sources:
        labels = load_volume(out / "segment" / f"labels_{source}.nii.gz")
        assert labels.same_grid(truth)
        dice = region_dice(labels.array.astype(np.uint8), truth.array.astype(np.uint8), "brats2023")
        assert seg["sources"][source]["dice"] == pytest.approx(dice, abs=1e-4), source
        sidecar = json.loads((out / "segment" / f"labels_{source}.json").read_text())
        assert sidecar["flair_source"] == source and sidecar["dice"] == seg["sources"][source]["dice"]
        row = seg["sources"][source]["dice"]
        assert f"{source:<14} {row['WT']:>8.3f} {row['TC']:>8.3f} {row['ET']:>8.3f}" in stdout
    # the shipped segmenter finds the tumour of this unseen case from the real contrasts
    assert seg["sources"]["real"]["dice"]["WT"] > 0.7


def test_demo_comparison_image_shows_every_column_and_plane(demo_run):
    _, out, _, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    with Image.open(out / "comparison.png") as png:
        assert png.format == "PNG"
        assert png.size == (summary["comparison_png"]["width"], summary["comparison_png"]["height"])
        pixels = np.asarray(png.convert("RGB"))
    # two tasks x (3 planes x (image row + error row)) of 2x-zoomed 2 mm slices, five columns
    assert pixels.shape[0] > 2 * 6 * 2 * 72 and pixels.shape[1] > 5 * 2 * 72
    assert (pixels[..., 0] > pixels[..., 2] + 50).any()  # the red-yellow error maps are there


def test_demo_refuses_an_existing_folder_and_leaves_it(tmp_path, home, monkeypatch):
    monkeypatch.setenv("SCOREFUSION_HOME", str(home))
    out = tmp_path / "demo_output"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["demo", "--out", str(out), "--steps", "1"]) == 2
    assert "already exists" in err.getvalue()
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cancelled_demo_leaves_nothing(tmp_path, home, monkeypatch):
    monkeypatch.setenv("SCOREFUSION_HOME", str(home))
    out = tmp_path / "demo_output"

    def cancel(label, total):
        def update(done, total_steps):
            raise KeyboardInterrupt

        return update

    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoOptions(out=out, steps=2, device="cpu"), progress=cancel)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling


def test_demo_refuses_zero_steps_before_any_work(tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert "--steps must be at least 1" in err.getvalue()
    assert not (tmp_path / "d").exists()
