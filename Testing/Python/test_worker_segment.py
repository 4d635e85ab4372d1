"""Segmentation jobs: the job folder's ``segment`` kind and the real worker running a random segmenter bundle.

The worker runs the library's segmenter (SegResNet, sliding windows) in the same job-folder protocol as
translations: progress per window, cancel file, atomic ``output.npz`` with the uint8 label map on the input
grid, one-line errors with exit 2, out-of-memory with exit 3. The bundle has seeded random weights
(``segmenter_fixtures``): the labels mean nothing, but every step of the real pipeline runs.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from test_worker import AFFINE, no_output, run_worker, stream_worker, worker_env

from bundle_fixtures import blob
from ScoreFusionLib import protocol, worker
from ScoreFusionLib.errors import InputError
from ScoreFusionLib.jobio import (
    CANCEL_FILE,
    INPUT_FILE,
    JOB_FILE,
    OUTPUT_FILE,
    OUTPUT_JSON,
    JobSettings,
    SegmentJobSettings,
    read_job,
    read_output,
    read_segmentation,
    write_job,
    write_output,
    write_segmentation,
)
from ScoreFusionLib.segmentation.inference import segment, window_count
from ScoreFusionLib.volume import Volume
from segmenter_fixtures import make_random_segmenter, tumour_volumes

CONTRASTS = ["t1n", "t1c", "t2w", "t2f"]
ROI = 16


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return make_random_segmenter(tmp_path_factory.mktemp("segmenter") / "bundle", seed=3, roi=ROI)


def case(shape_kji=(20, 24, 22), affine=AFFINE):
    """The four contrasts of a synthetic tumour on a permuted, flipped 2 mm grid (reoriented to RAS inside)."""
    volumes, _ = tumour_volumes(shape_kji)
    return {name: Volume(v.array, affine) for name, v in volumes.items()}


def segment_job(folder, segmenter, volumes=None, **settings):
    volumes = case() if volumes is None else volumes
    write_job(folder, volumes, {"kind": "segment", "contrasts": list(volumes), "segmenter": str(segmenter),
                                "device": "cpu", **settings})
    return volumes


def in_process(job):
    """``worker.py run`` in this process (the same code path, without a second torch start-up)."""
    buf = io.StringIO()
    code = worker.main(["run", "--job", str(job)], stream=buf)
    return code, [protocol.parse_line(line) for line in buf.getvalue().splitlines()]


def assert_one_line_error(code, events, kind, message):
    assert code == protocol.EXIT_FOR_KIND[kind]
    error = events[-1]
    assert error["event"] == "error" and error["kind"] == kind, events[-3:]
    assert message in error["msg"] and "\n" not in error["msg"]
    assert "result" not in [e["event"] for e in events]


# -- the job folder ----------------------------------------------------------------------------
def test_a_job_json_without_kind_is_a_translation_job_and_segment_jobs_round_trip(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    np.savez(old / INPUT_FILE, t1n=np.ones((2, 2, 2), np.float32), ijk_to_ras=np.eye(4))
    (old / JOB_FILE).write_text(json.dumps({"task": "super_resolve", "contrasts": ["t1n"], "bundle": "b"}))
    assert read_job(old).settings == JobSettings(task="super_resolve", contrasts=["t1n"], bundle="b")
    new = tmp_path / "new"
    segment_job(new, "default", label_convention="brats2021", probabilities=True)
    job = read_job(new)
    assert job.settings == SegmentJobSettings(contrasts=CONTRASTS, segmenter="default", device="cpu",
                                              label_convention="brats2021", probabilities=True)
    assert json.loads((new / JOB_FILE).read_text())["kind"] == "segment"
    np.testing.assert_array_equal(job.volumes["t2f"].affine, AFFINE)


@pytest.mark.parametrize("settings, message", [
    ({"kind": "register", "contrasts": ["t1n"]}, "unknown job kind 'register'"),
    ({"kind": "segment", "contrasts": ["t1n"], "label_convention": "brats2024"}, "'label_convention' must be null"),
    ({"kind": "segment", "contrasts": ["t1n"], "steps": 3}, r"unknown keys \['steps'\]"),
    ({"kind": "segment", "contrasts": ["t1n"], "overlap": 1.0}, "'overlap' must be null or a number"),
    ({"kind": "segment", "contrasts": ["t1n"], "segmenter": ""}, "'segmenter' must be"),
    ({"kind": "segment", "contrasts": []}, "non-empty list"),
    ({"kind": "translate", "contrasts": ["t1n"], "bundle": "b"}, r"missing the keys \['task'\]"),
])
def test_bad_segment_settings_are_refused_before_anything_is_written(tmp_path, settings, message):
    with pytest.raises(InputError, match=message):
        write_job(tmp_path, {"t1n": Volume(np.ones((2, 2, 2), np.float32), np.eye(4))}, settings)
    assert list(tmp_path.iterdir()) == []


def test_segmentation_output_is_checked_before_it_is_written_and_read_back_exactly(tmp_path):
    labels = Volume(np.array([0, 1, 2, 3] * 6, np.int64).reshape(2, 3, 4), AFFINE)
    prob = Volume(np.full((2, 3, 4), 0.25, np.float32), AFFINE)
    with pytest.raises(InputError, match="on the label map's grid"):
        write_segmentation(tmp_path, labels, {"WT": Volume(prob.array, np.eye(4))})
    with pytest.raises(InputError, match=r"label values \[3\] are not part of the brats2021"):
        write_segmentation(tmp_path, labels, provenance={"label_convention": "brats2021"})
    with pytest.raises(InputError, match="labels in 0..255"):
        write_segmentation(tmp_path, Volume(labels.array + 300, AFFINE))
    assert list(tmp_path.iterdir()) == []
    write_segmentation(tmp_path, labels, {"WT": prob}, {"label_convention": "brats2023"})
    out = read_segmentation(tmp_path)
    assert out.labels.array.dtype == np.uint8 and out.label_convention == "brats2023"
    np.testing.assert_array_equal(out.labels.array, labels.array)
    np.testing.assert_array_equal(out.labels.affine, AFFINE)
    assert list(out.probabilities) == ["WT"]
    np.testing.assert_array_equal(out.probabilities["WT"].array, prob.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([OUTPUT_FILE, OUTPUT_JSON])  # no temporaries
    with pytest.raises(InputError, match="must hold 'array'"):  # not mistaken for a translation
        read_output(tmp_path)
    write_output(tmp_path, prob)
    with pytest.raises(InputError, match="segmentation job's output"):
        read_segmentation(tmp_path)


# -- the real worker -----------------------------------------------------------------------------
def test_worker_segments_onto_the_input_grid_with_window_progress(tmp_path, segmenter):
    job = tmp_path / "job"
    volumes = segment_job(job, segmenter, probabilities=True)
    proc, events = run_worker(job)
    assert proc.returncode == 0, proc.stderr
    assert events[0]["event"] == "hello" and events[0]["device"] == "cpu"
    assert [e["name"] for e in events if e["event"] == "stage"] == list(protocol.RUN_STAGES)
    progress = [e for e in events if e["event"] == "progress"]
    # windows over the RAS-reoriented (i, j, k) = (22, 24, 20) -> (k, j, i) = (22, 20, 24) grid, overlap 0.5
    total = window_count((22, 20, 24), (ROI,) * 3, 0.5)
    assert total > 1 and [p["step"] for p in progress] == list(range(1, total + 1))
    assert all(p["total"] == total for p in progress)
    assert events[-1] == {"event": "result", "path": OUTPUT_FILE}

    out = read_segmentation(job)
    assert out.labels.array.dtype == np.uint8 and out.labels.array.shape == (20, 24, 22)
    np.testing.assert_array_equal(out.labels.affine, AFFINE)  # the input's matrix, bit for bit
    expected = segment(volumes, segmenter, device="cpu")  # the library in this process, same weights
    np.testing.assert_array_equal(out.labels.array, expected.labels.array)
    assert set(np.unique(out.labels.array).tolist()) <= {0, 1, 2, 3}
    assert out.label_convention == "brats2023"  # no convention in the job: the segmenter's own
    assert sorted(out.probabilities) == ["ET", "TC", "WT"]
    for region, volume in out.probabilities.items():
        np.testing.assert_allclose(volume.array, expected.probabilities[region].array, atol=1e-6)
        np.testing.assert_array_equal(volume.affine, AFFINE)
    assert out.provenance["segmenter"]["weights_sha256"] == expected.manifest.weights_sha256
    assert out.provenance["job"]["kind"] == "segment" and out.provenance["segmenter_id"] == "bundle"


def test_a_label_convention_in_the_job_overrides_the_segmenters(tmp_path, segmenter):
    job = tmp_path / "job"
    volumes = segment_job(job, segmenter, label_convention="brats2021")
    code, events = in_process(job)
    assert code == 0, events[-3:]
    out = read_segmentation(job)
    assert out.label_convention == "brats2021" and out.probabilities == {}
    ours = segment(volumes, segmenter, device="cpu").labels.array  # brats2023: ET is 3
    np.testing.assert_array_equal(out.labels.array, np.where(ours == 3, 4, ours))


def test_synthesized_inputs_get_the_real_inputs_zero_background(tmp_path, segmenter):
    volumes = case()
    head = volumes["t1n"].array != 0
    volumes["t2f"] = Volume(np.where(head, volumes["t2f"].array, 40.0).astype(np.float32), AFFINE)  # "air" at 40
    job = tmp_path / "job"
    segment_job(job, segmenter, volumes=volumes, synthesized=["t2f"])
    code, events = in_process(job)
    assert code == 0, events[-3:]
    masked = {**volumes, "t2f": Volume(np.where(head, volumes["t2f"].array, 0.0).astype(np.float32), AFFINE)}
    labels = read_segmentation(job).labels.array
    np.testing.assert_array_equal(labels, segment(masked, segmenter, device="cpu").labels.array)
    assert np.any(labels != segment(volumes, segmenter, device="cpu").labels.array)  # the mask mattered
    with pytest.raises(InputError, match="at least one input must be real"):
        segment_job(tmp_path / "all", segmenter, synthesized=CONTRASTS)


def test_worker_cancels_a_segmentation_between_windows_and_writes_nothing(tmp_path, segmenter):
    job = tmp_path / "job"
    segment_job(job, segmenter, volumes=case((40, 40, 40)))  # 4 x 4 x 4 windows

    def cancel_at_first_window(event):
        if event["event"] == "progress" and not (job / CANCEL_FILE).exists():
            (job / CANCEL_FILE).touch()

    code, events = stream_worker(["run", "--job", job], worker_env(), cancel_at_first_window)
    assert code == protocol.EXIT_CANCELLED
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "cancelled"
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps[0] == 1 and len(steps) <= 3 and steps[-1] < 64
    assert no_output(job)


def write_raw(folder, arrays, settings):
    folder.mkdir(parents=True)
    np.savez(folder / INPUT_FILE, **arrays)
    (folder / JOB_FILE).write_text(json.dumps({"kind": "segment", "device": "cpu", **settings}))


def test_bad_inputs_are_one_line_errors_and_leave_no_output(tmp_path, segmenter):
    missing = tmp_path / "missing"
    three = {name: volume for name, volume in case().items() if name != "t2f"}
    segment_job(missing, segmenter, volumes=three)
    assert_one_line_error(*in_process(missing), "input", "missing: t2f")
    assert no_output(missing)

    mismatched = tmp_path / "mismatched"  # write_job refuses this, so the folder is written by hand
    arrays = {name: blob((8, 8, 8), np.random.default_rng(i)) for i, name in enumerate(CONTRASTS)}
    arrays["t2f"] = blob((8, 8, 9), np.random.default_rng(9))
    write_raw(mismatched, {**arrays, "ijk_to_ras": AFFINE}, {"contrasts": CONTRASTS, "segmenter": str(segmenter)})
    assert_one_line_error(*in_process(mismatched), "input", "share one grid")
    assert no_output(mismatched)

    nan = tmp_path / "nan"
    arrays = {name: np.ones((8, 8, 8), np.float32) for name in CONTRASTS}
    arrays["t1c"][1, 2, 3] = np.nan
    write_raw(nan, {**arrays, "ijk_to_ras": AFFINE}, {"contrasts": CONTRASTS, "segmenter": str(segmenter)})
    assert_one_line_error(*in_process(nan), "input", "NaN")
    assert no_output(nan)


def test_a_missing_or_wrong_segmenter_is_a_weights_error(tmp_path, sr_bundle):
    for name, spec, message in [("nowhere", tmp_path / "no-such-segmenter", "not found"),
                                ("translation", sr_bundle, "not a segmenter bundle")]:
        job = tmp_path / name
        segment_job(job, spec, volumes=case((8, 8, 8)))
        code, events = in_process(job)
        assert_one_line_error(code, events, "weights", message)
        assert events[-1]["hint"] and "progress" not in [e["event"] for e in events]
        assert no_output(job)


def test_out_of_memory_during_a_segmentation_exits_3_with_its_own_hint(tmp_path, segmenter, monkeypatch):
    job = tmp_path / "job"
    segment_job(job, segmenter, volumes=case((16, 16, 16)))
    monkeypatch.setenv(worker.FAKE_OOM_ENV, "1")
    code, events = in_process(job)
    assert_one_line_error(code, events, "oom", "out of memory")
    assert events[-1]["hint"] == worker.SEGMENT_OOM_HINT
    assert no_output(job)
