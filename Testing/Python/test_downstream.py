"""Downstream segmentation: each method feeds the segmenter what it claims, metrics equal a direct computation,
leakage and bad input are refused before any computation, outputs and the CLI."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from bundle_fixtures import add_fuser, make_random_bundle
from ScoreFusionLib.bundle import read_manifest, sha256_file, write_manifest
from ScoreFusionLib.cli.main import main
from ScoreFusionLib.data import load_case, load_cases
from ScoreFusionLib.data.task import TaskSpec
from ScoreFusionLib.errors import DatasetError, InputError
from ScoreFusionLib.labels import region_mask
from ScoreFusionLib.metrics import hd95, region_dice
from ScoreFusionLib.segmentation import downstream, inference
from ScoreFusionLib.segmentation.downstream import DownstreamOptions, evaluate_downstream, markdown_table, summarize
from segmenter_fixtures import make_random_segmenter, write_tumour_cases

CONTRASTS = ("t1n", "t1c", "t2w", "t2f")
NATIVE_KJI = (20, 24, 22)
#: The translation bundle's training grid (i, j, k): pads i (22 -> 24) with background, crops k (20 -> 16).
GRID = (24, 24, 16)
N_CASES = 5
VAL_FRACTION = 0.4  # int(0.6 * 5) = 3 training cases, the last 2 held out
MT_TASK = TaskSpec(kind="mt", inputs=["t1n", "t2w"], target="t2f")
ALL = ",".join(downstream.METHODS)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Simulated-layout labelled cases with a zero background around a box head (as skull-stripped MRI)."""
    return write_tumour_cases(tmp_path_factory.mktemp("downstream") / "sim", N_CASES, shape_kji=NATIVE_KJI)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random segmenter, and random t1n+t2w->t2f bundles recording GRID, without and with a fuser."""
    root = tmp_path_factory.mktemp("downstream-models")
    grid = {"shape_ijk": list(GRID), "spacing": [2.0, 2.0, 2.0], "orientation": "RAS"}
    plain = make_random_bundle(root / "mt", MT_TASK, neighbors=1, grid=grid)
    fused = add_fuser(make_random_bundle(root / "mt-fuser", MT_TASK, neighbors=1, grid=grid), random_seed=3)
    return {"segmenter": make_random_segmenter(root / "seg", spacing=2.0, roi=16), "plain": plain, "fused": fused}


def _test_ids(cohort):
    return sorted(r.case_id for r in load_cases(cohort))[3:]


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_run(cohort, models, tmp_path_factory):
    """All five methods on the two held-out cases, with spies on what the segmenter and synthesis receive."""
    import ScoreFusionLib.translate as translate

    seen, synthesised = [], []
    real_segment, real_synthesize = inference.segment, translate.synthesize

    def spy_segment(volumes, model, **kwargs):
        seen.append({"arrays": {c: v.array.copy() for c, v in volumes.items()},
                     "affines": {c: v.affine.copy() for c, v in volumes.items()}, "model": model})
        return real_segment(volumes, model, **kwargs)

    def spy_synthesize(inputs, bundle_dir, options=None, progress=None):
        result = real_synthesize(inputs, bundle_dir, options, progress)
        synthesised.append({"method": options.method, "steps": options.steps, "inputs": sorted(inputs),
                            "raw": result.volume.array.copy()})
        return result

    out = tmp_path_factory.mktemp("downstream-out") / "out"
    ticks = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "segment", spy_segment)
        mp.setattr(translate, "synthesize", spy_synthesize)
        report = evaluate_downstream(
            DownstreamOptions(data=cohort, missing="flair", translation_model=models["fused"],
                              segmenter=models["segmenter"], methods=ALL, val_fraction=VAL_FRACTION, steps=2,
                              device="cpu", out=out, save_volumes=True),
            progress=lambda done, total, label: ticks.append((done, total, label)))
    return {"report": report, "out": out, "seen": seen, "synthesised": synthesised, "ticks": ticks}


def _loaded(cohort, case_id):
    record = next(r for r in load_cases(cohort) if r.case_id == case_id)
    return load_case(record, CONTRASTS, grid_shape_ijk=GRID, seg=True, reorient=True)


def test_real_rows_equal_a_direct_segmentation_and_metrics(full_run, cohort, models):
    from ScoreFusionLib.segmentation.model_bundle import load_segmenter

    rows = full_run["report"].rows
    ids = _test_ids(cohort)
    assert [(r["case_id"], r["method"]) for r in rows] == [(c, m) for c in ids for m in downstream.METHODS]
    segmenter = load_segmenter(models["segmenter"], "cpu")
    for case_id in ids:
        loaded = _loaded(cohort, case_id)
        assert loaded.volumes["t1n"].shape_ijk == GRID  # the translation bundle's grid, not the native one
        labels = inference.segment(loaded.volumes, segmenter, device="cpu",
                                   label_convention=loaded.label_convention).labels.array
        truth = loaded.seg.array.astype(labels.dtype)
        expected = region_dice(labels, truth, loaded.label_convention)
        row = next(r for r in rows if r["case_id"] == case_id and r["method"] == "real")
        for region in ("WT", "TC", "ET"):
            assert row[f"dice_{region.lower()}"] == expected[region]
            distance = hd95(region_mask(labels, region, "brats2023"), region_mask(truth, region, "brats2023"),
                            loaded.seg.spacing)
            assert row[f"hd95_{region.lower()}"] == (distance if np.isfinite(distance) else None)


def test_each_method_feeds_the_segmenter_what_it_claims(full_run, cohort):
    seen, synthesised = full_run["seen"], full_run["synthesised"]
    ids = _test_ids(cohort)
    assert len(seen) == len(ids) * len(downstream.METHODS)
    assert len({id(call["model"]) for call in seen}) == 1  # the segmenter is loaded once and passed loaded
    assert [(s["method"], s["steps"], s["inputs"]) for s in synthesised] == [
        ("average", 2, ["t1n", "t2w"]), ("score-fusion", 2, ["t1n", "t2w"])] * len(ids)
    calls = iter(seen)
    synth = iter(synthesised)
    for case_id in ids:
        loaded = _loaded(cohort, case_id)
        real = {c: loaded.volumes[c].array for c in CONTRASTS}
        head = (real["t1n"] != 0) | (real["t1c"] != 0) | (real["t2w"] != 0)
        assert (~head).any() and head.any()
        for method in downstream.METHODS:
            call = next(calls)
            assert sorted(call["arrays"]) == sorted(CONTRASTS)
            for c in ("t1n", "t1c", "t2w"):  # the other channels are the real ones in every method
                np.testing.assert_array_equal(call["arrays"][c], real[c])
            fed = call["arrays"]["t2f"]
            np.testing.assert_array_equal(call["affines"]["t2f"], loaded.volumes["t2f"].affine)
            if method == "real":
                np.testing.assert_array_equal(fed, real["t2f"])
            elif method == "zero-filled":
                assert fed.shape == real["t2f"].shape and not fed.any()
            elif method == "other-contrast":  # the default stand-in for FLAIR is T2w
                np.testing.assert_array_equal(fed, real["t2w"])
            else:
                raw = next(synth)["raw"]
                assert np.abs(raw[~head]).max() > 0  # the synthesis has a non-zero background ...
                assert not fed[~head].any()  # ... which is cut away outside the head
                np.testing.assert_array_equal(fed[head], raw[head])  # and nothing inside is touched


def test_outputs_summary_and_progress(full_run, cohort, models):
    report, out = full_run["report"], full_run["out"]
    ids = _test_ids(cohort)
    rows = _read_csv(out / "per_case.csv")
    assert list(rows[0]) == list(downstream.CSV_COLUMNS) and len(rows) == len(report.rows)
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.md").read_text() == report.markdown
    assert summary["missing"] == "t2f" and summary["replacement"] == "t2w"
    assert summary["split"]["case_ids"] == ids and summary["split"]["val_fraction"] == VAL_FRACTION
    assert summary["simulated_data"] is True and "simulated" in summary["note"]
    assert summary["segmenter"]["manifest_sha256"] == sha256_file(models["segmenter"] / "manifest.json")
    assert summary["translation_model"]["manifest_sha256"] == sha256_file(models["fused"] / "manifest.json")
    assert summary["translation_model"]["task"]["target"] == "t2f"
    assert summary["sampling"] == {"steps": 2, "sampler": "ddpm", "time_grid": "default", "seed": 0,
                                   "same_seed_every_case": True}
    assert summary["grid"]["shape_ijk"] == list(GRID) and "protocol" in summary
    assert list(summary["methods"]) == list(downstream.METHODS)
    for method, entry in summary["methods"].items():
        mine = [r for r in report.rows if r["method"] == method]
        zero = [r for r in report.rows if r["method"] == "zero-filled"]
        assert entry["n_cases"] == len(ids)
        for region in ("WT", "TC", "ET"):
            key = f"dice_{region.lower()}"
            assert entry["dice"][region]["mean"] == pytest.approx(np.mean([r[key] for r in mine]), abs=1e-12)
            assert entry["dice"][region]["std"] == pytest.approx(np.std([r[key] for r in mine]), abs=1e-12)
            diffs = [a[key] - b[key] for a, b in zip(mine, zero)]
            assert entry["dice_minus_zero_filled"][region] == pytest.approx(np.mean(diffs), abs=1e-12)
            hd = [r[f"hd95_{region.lower()}"] for r in mine]
            assert entry["hd95"][region]["n_infinite"] == hd.count(None)
    assert summary["methods"]["zero-filled"]["dice_minus_zero_filled"] == {"WT": 0.0, "TC": 0.0, "ET": 0.0}
    assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(
        f"{c}_{m}.nii.gz" for c in ids for m in downstream.METHODS)
    ticks = full_run["ticks"]
    assert ticks[0] == (0, 10, f"{ids[0]} real") and ticks[-1] == (10, 10, "")


def test_infinite_hd95_is_null_counted_and_left_out_of_the_mean():
    base = {"dice_wt": 0.5, "dice_tc": 0.5, "dice_et": 0.5, "hd95_tc": 1.0, "hd95_et": 1.0, "seconds": 1.0}
    rows = [{**base, "case_id": "a", "method": "real", "hd95_wt": 2.0},
            {**base, "case_id": "b", "method": "real", "hd95_wt": None}]
    entry = summarize(rows, ["real"])["real"]
    assert entry["hd95"]["WT"] == {"mean": 2.0, "n_finite": 1, "n_infinite": 1}
    assert entry["dice_minus_zero_filled"] is None  # no zero-filled baseline to compare with
    summary = {"missing": "t2f", "split": {"name": "test", "case_ids": ["a", "b"]}, "simulated_data": False,
               "methods": {"real": entry}}
    table = markdown_table(summary)
    assert "| real | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 2.0 (1 inf) | 1.0 | 1.0 | 1.00 |" in table
    assert "ΔDice" not in table  # without a zero-filled run there is no difference to show
    csv_rows = list(csv.DictReader(downstream._rows_csv([{**r, "synthesis_seconds": 0.0, "steps": ""}
                                                          for r in rows]).splitlines()))
    assert [r["hd95_wt"] for r in csv_rows] == ["2.0", ""]  # infinite: an empty cell


def test_leaked_training_cases_are_refused(cohort, models, tmp_path):
    leaky = tmp_path / "leaky"
    shutil.copytree(models["plain"], leaky)
    manifest = read_manifest(leaky)
    manifest.training = {"train_case_ids": [_test_ids(cohort)[1]]}
    write_manifest(leaky, manifest)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=f"train the translation model \\({_test_ids(cohort)[1]}\\)"):
        evaluate_downstream(DownstreamOptions(data=cohort, missing="t2f", translation_model=leaky,
                                              segmenter=models["segmenter"], methods="real,average",
                                              val_fraction=VAL_FRACTION, out=out))
    seg = tmp_path / "seg"
    shutil.copytree(models["segmenter"], seg)
    data = json.loads((seg / "manifest.json").read_text())
    data["training"] = {"train_case_ids": _test_ids(cohort)}
    (seg / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="2 test case\\(s\\) were used to train the segmenter"):
        evaluate_downstream(DownstreamOptions(data=cohort, missing="t2f", segmenter=seg, methods="real",
                                              val_fraction=VAL_FRACTION, out=out))
    assert not out.exists()


@pytest.fixture
def no_computation(monkeypatch):
    """Make loading the segmenter, segmenting and synthesising fail loudly: refusals must come first."""
    import ScoreFusionLib.segmentation.model_bundle as model_bundle
    import ScoreFusionLib.translate as translate

    def forbidden(*args, **kwargs):
        raise AssertionError("computation started before the input was checked")

    for module, name in ((model_bundle, "load_segmenter"), (inference, "segment"), (translate, "synthesize")):
        monkeypatch.setattr(module, name, forbidden)


def test_bad_input_is_refused_before_any_computation(cohort, models, tmp_path, no_computation):
    sr_bundle = make_random_bundle(tmp_path / "sr", TaskSpec(kind="sr", inputs=[], target="t2f",
                                                              degradation=_pool()), planes=("axial",))
    t2w_bundle = make_random_bundle(tmp_path / "t2w", TaskSpec(kind="mt", inputs=["t1n"], target="t2w"),
                                    planes=("axial",))
    out = tmp_path / "out"
    base = {"data": cohort, "missing": "t2f", "segmenter": models["segmenter"], "out": out,
            "val_fraction": VAL_FRACTION}
    cases = [
        ({"methods": "real,blend"}, InputError, "unknown method\\(s\\) blend; use real, zero-filled"),
        ({"methods": "real,real"}, InputError, "name a method twice"),
        ({"methods": "other-contrast", "replacement": "flair"}, InputError, "must differ from the missing one"),
        ({"missing": "pdw", "methods": "real"}, InputError, "segmenter does not use pdw"),
        ({"missing": "t3"}, InputError, "unknown contrast 't3'"),
        ({"methods": "real,average"}, InputError, "give one \\(--translation-model\\)"),
        ({"methods": "average", "translation_model": t2w_bundle}, InputError, "synthesises t2w, not the missing"),
        ({"methods": "average", "translation_model": sr_bundle}, InputError, "a 'sr' model"),
        ({"methods": "score-fusion", "translation_model": models["plain"]}, InputError, "has no trained fuser"),
        ({"methods": "average", "translation_model": models["plain"], "sampler": "euler"}, InputError,
         "unknown sampler"),
        ({"methods": "real", "val_fraction": 0.0}, DatasetError, "test split .* is empty"),
        ({"methods": "real", "limit": 0}, InputError, "limit must be a positive integer"),
    ]
    for changes, error, message in cases:
        with pytest.raises(error, match=message):
            evaluate_downstream(DownstreamOptions(**{**base, **changes}))
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty; pass --overwrite"):
        evaluate_downstream(DownstreamOptions(**base, methods="real"))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _pool():
    from ScoreFusionLib.degradation import AveragePool

    return AveragePool(2)


def test_overwrite_replaces_a_previous_run(cohort, models, tmp_path):
    out = tmp_path / "out"
    options = {"data": cohort, "missing": "t2f", "segmenter": models["segmenter"], "val_fraction": VAL_FRACTION,
               "limit": 1, "device": "cpu", "out": out}
    evaluate_downstream(DownstreamOptions(**options, methods="real", save_volumes=True))
    case = _test_ids(cohort)[0]
    assert (out / "labels" / f"{case}_real.nii.gz").is_file()
    report = evaluate_downstream(DownstreamOptions(**options, methods="zero-filled,other-contrast", replacement="t1c",
                                                   overwrite=True))
    assert [r["method"] for r in _read_csv(out / "per_case.csv")] == ["zero-filled", "other-contrast"]
    assert not (out / "labels").exists() or not any((out / "labels").iterdir())  # no stale label maps
    assert report.summary["replacement"] == "t1c" and report.summary["translation_model"] is None
    assert report.summary["grid"] == {"shape_ijk": None, "source": "native", "orientation": "RAS"}


def test_cli_exit_codes_and_output(cohort, models, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["evaluate-downstream", "--data", str(cohort), "--segmenter", str(models["segmenter"]),
            "--val-fraction", str(VAL_FRACTION), "--device", "cpu", "--quiet", "--out", str(out)]
    assert main([*base, "--missing", "flair"]) == 2  # the default methods need a translation model
    err = capsys.readouterr().err
    assert err.startswith("scorefusion evaluate-downstream: error: ") and err.count("\n") == 1
    assert "--translation-model" in err
    assert main([*base, "--missing", "flair", "--methods", "real,zero-filled,other-contrast", "--limit", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| method | Dice WT | Dice TC | Dice ET | ΔDice WT vs zero-filled |" in printed
    assert "| real |" in printed and "| other-contrast |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing"] == "t2f" and summary["configuration"]["methods"] == [
        "real", "zero-filled", "other-contrast"]
    assert main([*base, "--missing", "t2f", "--methods", "real"]) == 2  # out is no longer empty
    assert "not empty" in capsys.readouterr().err
