"""Evaluation: paper split, metrics equal to a direct computation, outputs, refusals, CLI, peak memory."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest

from bundle_fixtures import make_random_bundle
from ScoreFusionLib.bundle import read_manifest, sha256_file, write_manifest
from ScoreFusionLib.cli.main import main
from ScoreFusionLib.data import load_case, load_cases
from ScoreFusionLib.data.task import TaskSpec
from ScoreFusionLib.degradation import AveragePool
from ScoreFusionLib.errors import DatasetError, InputError
from ScoreFusionLib.evaluation import EvaluationOptions, evaluate
from ScoreFusionLib.interpolation import upsample_volume
from ScoreFusionLib.metrics import mmd_linear, volume_metrics
from ScoreFusionLib.peak_memory import PeakMemory
from ScoreFusionLib.simulator import write_cohort

GRID = (24, 24, 16)
SR_TASK = TaskSpec(kind="sr", inputs=[], target="t2f", degradation=AveragePool(2))
N_CASES = 5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "sim"
    write_cohort(folder, N_CASES, seed=5, spacing=4.0, deform=False)
    return folder


@pytest.fixture(scope="module")
def sr_grid_bundle(tmp_path_factory):
    """An SR x2 bundle of t2f that records its training grid, as trained bundles do."""
    grid = {"shape_ijk": list(GRID), "spacing": [4.0, 4.0, 4.0], "orientation": "RAS", "source": "centre crop/pad"}
    return make_random_bundle(tmp_path_factory.mktemp("evalb") / "bundle", SR_TASK, grid=grid)


def _ids(cohort):
    return sorted(r.case_id for r in load_cases(cohort))


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_interpolation_metrics_equal_a_direct_computation(cohort, tmp_path):
    out = tmp_path / "out"
    report = evaluate(EvaluationOptions(data=cohort, methods="nearest,trilinear,bspline", task=SR_TASK, grid=GRID,
                                        val_fraction=0.4, out=out))
    test_ids = _ids(cohort)[3:]  # int(0.6 * 5) = 3 train cases, the last 2 held out
    rows = _read_csv(out / "per_case.csv")
    assert [(r["case_id"], r["method"]) for r in rows] == [
        (c, m) for m in ("nearest", "trilinear", "bspline") for c in test_ids]
    records = {r.case_id: r for r in load_cases(cohort)}
    for method in ("nearest", "trilinear", "bspline"):
        results, truths = [], []
        for case_id in test_ids:
            truth = load_case(records[case_id], ["t2f"], grid_shape_ijk=GRID, reorient=True).volumes["t2f"]
            result = upsample_volume(AveragePool(2).degrade_volume(truth), 2, method)
            expected = volume_metrics(result.array, truth.array)
            row = next(r for r in rows if r["case_id"] == case_id and r["method"] == method)
            for col, key in (("psnr", "psnr"), ("ssim", "ssim"), ("psnr_fg", "psnr_foreground"),
                             ("ssim_fg", "ssim_foreground")):
                assert float(row[col]) == pytest.approx(expected[key], rel=1e-12)
            results.append(result.array)
            truths.append(truth.array)
        entry = report.summary["methods"][method]
        assert entry["mmd"] == pytest.approx(mmd_linear(results, truths), rel=1e-12)
        for col in ("psnr", "ssim", "psnr_fg", "ssim_fg", "seconds", "peak_mib"):
            values = [float(r[col]) for r in rows if r["method"] == method]
            assert entry[col]["mean"] == pytest.approx(np.mean(values), rel=1e-9)
            assert entry[col]["std"] == pytest.approx(np.std(values), rel=1e-9, abs=1e-12)
        assert entry["n_cases"] == 2 and entry["memory"] == "cpu-rss-increase"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"]["case_ids"] == test_ids and summary["simulated_data"] is True
    assert "simulated" in summary["note"] and summary["bundle"] is None
    assert (out / "summary.md").read_text() == report.markdown


def test_the_test_split_is_the_paper_held_out_part(cohort):
    ids = _ids(cohort)
    opts = {"data": cohort, "methods": ["nearest"], "task": SR_TASK, "grid": GRID}
    assert evaluate(EvaluationOptions(**opts)).summary["split"]["case_ids"] == ids[4:]  # int(0.8 * 5) = 4
    train = evaluate(EvaluationOptions(**opts, split="train", limit=2)).summary["split"]["case_ids"]
    assert train == ids[:2]


def test_cli_runs_model_and_interpolation_methods_side_by_side(cohort, sr_grid_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["evaluate", "--data", str(cohort), "--model", str(sr_grid_bundle), "--task", "sr",
                 "--methods", "trilinear,tpdm", "--steps", "2", "--samples", "2", "--device", "cpu",
                 "--val-fraction", "0.4", "--limit", "1", "--save-volumes", "--quiet", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method | PSNR | SSIM | PSNR fg | SSIM fg | MMD | s/case | peak MiB |" in printed
    assert "| trilinear |" in printed and "| tpdm |" in printed and "±" in printed
    rows = _read_csv(out / "per_case.csv")
    case = _ids(cohort)[3]
    assert [(r["case_id"], r["method"], r["steps"]) for r in rows] == [
        (case, "trilinear", ""), (case, "tpdm", "2")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bundle"]["manifest_sha256"] == sha256_file(sr_grid_bundle / "manifest.json")
    assert summary["grid"] == {"shape_ijk": list(GRID), "source": "bundle", "orientation": "RAS"}
    assert summary["configuration"]["samples"] == 2 and summary["methods"]["tpdm"]["steps"] == 2
    assert summary["methods"]["trilinear"]["steps"] is None
    saved = sorted(p.name for p in (out / "volumes").iterdir())
    assert saved == [f"{case}_{m}.nii.gz" for m in ("tpdm", "trilinear")]


def test_mt_evaluation_synthesises_and_refuses_interpolation(cohort, mt_bundle):
    report = evaluate(EvaluationOptions(data=cohort, bundle=mt_bundle, methods=["single"], grid=GRID, steps=2,
                                        device="cpu"))
    assert [r["method"] for r in report.rows] == ["single"]
    assert np.isfinite(report.rows[0]["psnr"]) and report.summary["task"]["kind"] == "mt"
    with pytest.raises(InputError, match="interpolation baseline for super-resolution"):
        evaluate(EvaluationOptions(data=cohort, bundle=mt_bundle, methods=["average", "trilinear"], grid=GRID))


def test_bad_methods_and_options_fail_before_anything_is_written(cohort, sr_grid_bundle, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="unknown method.*cubic.*score-fusion"):
        evaluate(EvaluationOptions(data=cohort, methods="trilinear,cubic", task=SR_TASK, out=out))
    with pytest.raises(InputError, match="unknown sampler"):
        evaluate(EvaluationOptions(data=cohort, bundle=sr_grid_bundle, methods="average", sampler="euler", out=out))
    with pytest.raises(InputError, match="tile size"):  # handed to SamplingOptions, which checks it
        evaluate(EvaluationOptions(data=cohort, bundle=sr_grid_bundle, methods="average", tile_size=4, out=out))
    with pytest.raises(InputError, match="trained on the grid"):
        evaluate(EvaluationOptions(data=cohort, bundle=sr_grid_bundle, methods="trilinear", grid=(16, 16, 16)))
    assert not out.exists()


def test_cli_refusals(cohort, sr_grid_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    base = ["evaluate", "--data", str(cohort), "--quiet", "--out", str(out)]
    no_model = [*base, "--task", "sr", "--target", "t2f", "--factor", "2", "--grid", "24", "24", "16"]
    assert main([*no_model, "--methods", "nearest"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main([*no_model, "--methods", "nearest,average", "--overwrite"]) == 2
    assert "give a bundle (--model)" in capsys.readouterr().err
    assert main([*base, "--methods", "nearest", "--overwrite"]) == 2
    assert "--task sr --target C --factor N" in capsys.readouterr().err
    assert main([*base, "--model", str(sr_grid_bundle), "--task", "mt", "--methods", "average"]) == 2
    assert "a 'sr' model" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main([*no_model, "--methods", "nearest", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "per_case.csv", "summary.json", "summary.md"]


def test_test_cases_used_in_training_are_refused(cohort, sr_grid_bundle, tmp_path):
    leaky = make_random_bundle(tmp_path / "leaky", SR_TASK, planes=("axial",), grid={"shape_ijk": list(GRID)})
    manifest = read_manifest(leaky)
    manifest.training = {"train_case_ids": _ids(cohort)}  # trained on every case
    write_manifest(leaky, manifest)
    with pytest.raises(DatasetError, match="used to train the bundle"):
        evaluate(EvaluationOptions(data=cohort, bundle=leaky, methods="trilinear"))


def test_peak_memory_sees_a_large_allocation_on_the_cpu():
    with PeakMemory() as kept:
        block = np.ones(25_000_000)  # 200 MB, touched page by page
    with PeakMemory() as freed:
        short_lived = np.ones(25_000_000)
        time.sleep(0.05)  # the polling thread sees it before it goes
        del short_lived
    assert block.nbytes == 200_000_000
    assert kept.kind == freed.kind == "cpu-rss-increase"
    assert kept.peak_mib >= 150 and freed.peak_mib >= 150
    assert kept.peak_bytes < 400e6


def test_synthesis_is_scored_in_the_ground_truths_normalised_frame(cohort, mt_bundle, monkeypatch):
    """A perfect synthesiser (the normalised target, mapped through the reference input's range as
    translation does) must score a near-infinite PSNR, whatever the two contrasts' ranges."""
    import ScoreFusionLib.translate as translate
    from ScoreFusionLib.intensity import fit_normalization
    from ScoreFusionLib.volume import Volume

    spec = TaskSpec.from_dict(read_manifest(mt_bundle).task)
    perfect = {}
    for record in load_cases(cohort):
        loaded = load_case(record, spec.contrasts, grid_shape_ijk=GRID, reorient=True)
        ref, truth = loaded.volumes[spec.inputs[0]], loaded.volumes[spec.target]
        out = fit_normalization(ref.array).invert(fit_normalization(truth.array).apply(truth.array))
        perfect[ref.array.tobytes()] = Volume(out.astype(np.float32), truth.affine)

    def fake(inputs, bundle_dir, options=None, progress=None):
        return translate.TranslationResult(perfect[inputs[spec.inputs[0]].array.tobytes()], {})

    monkeypatch.setattr(translate, "synthesize", fake)
    report = evaluate(EvaluationOptions(data=cohort, bundle=mt_bundle, methods=["average"], grid=GRID, steps=2,
                                        device="cpu"))
    assert all(r["psnr"] > 60 for r in report.rows), [r["psnr"] for r in report.rows]
