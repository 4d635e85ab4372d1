"""The worker subprocess, its line protocol and the job folder (L1 in docs: real process, tiny bundle)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_worker_models import entry, installed_folders, registry_file, worker

from bundle_fixtures import blob
from ScoreFusionLib import protocol
from ScoreFusionLib.bundle import sha256_file
from ScoreFusionLib.errors import InputError
from ScoreFusionLib.geometry import super_resolution_grid
from ScoreFusionLib.jobio import (
    CANCEL_FILE,
    INPUT_FILE,
    JOB_FILE,
    OUTPUT_FILE,
    OUTPUT_JSON,
    JobSettings,
    read_job,
    read_output,
    read_uncertainty,
    write_job,
    write_output,
)
from ScoreFusionLib.volume import Volume

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "ScoreFusionLib" / "worker.py"
AFFINE = np.array([[0.0, -2.0, 0.0, 40.0], [0.0, 0.0, 2.0, -60.0], [-2.0, 0.0, 0.0, 25.0], [0, 0, 0, 1]])


# -- protocol --------------------------------------------------------------------------------
def test_protocol_round_trip():
    events = [
        protocol.hello("2.13.0", "cpu", pid=42),
        protocol.stage("sampling"),
        protocol.progress(3, 50, 2, 8, elapsed_s=12.3456, eta_s=41.0),
        protocol.log("a line"),
        protocol.warning("careful"),
        protocol.error("oom", "out of memory", "use the CPU"),
        protocol.result("output.npz"),
    ]
    for event in events:
        line = protocol.dumps(event)
        assert "\n" not in line
        assert protocol.parse_line(line + "\n") == event
    assert events[0]["protocol"] == protocol.PROTOCOL_VERSION
    assert events[2]["elapsed_s"] == 12.346
    buf = io.StringIO()
    protocol.emit(events[1], buf)
    assert buf.getvalue() == '{"event":"stage","name":"sampling"}\n'


def test_protocol_rejects_bad_events_and_nan_becomes_null():
    with pytest.raises(protocol.ProtocolError, match="unknown stage"):
        protocol.stage("thinking")
    with pytest.raises(protocol.ProtocolError, match="unknown error kind"):
        protocol.error("disk", "full")
    with pytest.raises(protocol.ProtocolError, match="1..total"):
        protocol.progress(0, 5)
    assert protocol.progress(1, 5, eta_s=float("nan"))["eta_s"] is None
    assert protocol.EXIT_FOR_KIND["weights"] == protocol.EXIT_INPUT == 2
    assert (protocol.EXIT_OK, protocol.EXIT_OOM, protocol.EXIT_CANCELLED) == (0, 3, 130)


@pytest.mark.parametrize("line", [
    "UserWarning: something from torch",
    "{not json",
    '{"no_event": 1}',
    '{"event": "mystery"}',
    "[1, 2]",
    "",
    "Traceback (most recent call last):",
])
def test_parse_line_is_tolerant(line):
    assert protocol.parse_line(line + "\n") == {"event": "log", "msg": line}


def test_parse_line_accepts_bytes_and_crlf():
    assert protocol.parse_line(b'{"event":"result","path":"o.npz"}\r\n') == {"event": "result", "path": "o.npz"}


def test_eta_skips_the_warm_up_step():
    eta = protocol.EtaEstimator(window=3, clock=lambda: 0.0)
    eta.step_done(now=10.0)  # warm-up: 10 s, ignored
    assert eta.eta(9) is None
    eta.step_done(now=11.0)
    assert eta.eta(8) == pytest.approx(8.0)
    eta.step_done(now=13.0)
    assert eta.eta(2) == pytest.approx(3.0)  # mean of 1 and 2 s
    for t in (14.0, 15.0, 16.0):  # the window keeps the last 3 steps only
        eta.step_done(now=t)
    assert eta.mean_step() == pytest.approx(1.0)
    assert eta.elapsed == pytest.approx(16.0)


# -- job folder ------------------------------------------------------------------------------
def _vol(shape=(4, 5, 6), seed=0, affine=AFFINE):
    return Volume(np.random.default_rng(seed).random(shape).astype(np.float32) * 100, affine)


SETTINGS = {"task": "synthesize", "contrasts": ["t1n", "t2w"], "bundle": "/nowhere", "steps": 3}


def test_job_round_trip(tmp_path):
    vols = {"t1n": _vol(seed=1), "t2w": _vol(seed=2)}
    write_job(tmp_path, vols, SETTINGS)
    job = read_job(tmp_path)
    assert job.settings == JobSettings(**SETTINGS)
    for name, vol in vols.items():
        assert job.volumes[name].array.dtype == np.float32
        np.testing.assert_array_equal(job.volumes[name].array, vol.array)
        np.testing.assert_array_equal(job.volumes[name].affine, AFFINE)
    assert json.loads((tmp_path / JOB_FILE).read_text())["format"] == "scorefusion-job"


def test_output_round_trip_keeps_its_own_matrix(tmp_path):
    out_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    write_output(tmp_path, _vol((8, 8, 8), affine=out_affine), {"x": np.float64(1.5), "arr": np.arange(2)})
    vol, prov = read_output(tmp_path)
    np.testing.assert_array_equal(vol.affine, out_affine)
    assert vol.array.shape == (8, 8, 8) and prov == {"x": 1.5, "arr": [0, 1]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([OUTPUT_FILE, OUTPUT_JSON])  # no temporaries


def test_uncertainty_is_written_on_the_output_grid_or_not_at_all(tmp_path):
    out_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    mean, std = _vol((8, 8, 8), seed=1, affine=out_affine), _vol((8, 8, 8), seed=2, affine=out_affine)
    with pytest.raises(InputError, match="on the output's grid"):
        write_output(tmp_path, mean, uncertainty=_vol((8, 8, 8), affine=np.eye(4)))
    with pytest.raises(InputError, match="on the output's grid"):
        write_output(tmp_path, mean, uncertainty=_vol((8, 8, 7), affine=out_affine))
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    write_output(tmp_path, mean)
    assert read_uncertainty(tmp_path) is None  # a one-sample run
    write_output(tmp_path, mean, uncertainty=std)
    got = read_uncertainty(tmp_path)
    np.testing.assert_array_equal(got.array, std.array)
    np.testing.assert_array_equal(got.affine, out_affine)
    np.testing.assert_array_equal(read_output(tmp_path)[0].array, mean.array)
    assert json.loads((tmp_path / OUTPUT_JSON).read_text())["uncertainty"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([OUTPUT_FILE, OUTPUT_JSON])


@pytest.mark.parametrize("uncertainty, message", [
    (np.ones((8, 8, 7), np.float32), "shape differs"),
    (np.full((8, 8, 8), np.inf, np.float32), "uncertainty"),
])
def test_a_damaged_uncertainty_map_is_an_input_error(tmp_path, uncertainty, message):
    np.savez(tmp_path / OUTPUT_FILE, array=np.ones((8, 8, 8), np.float32), ijk_to_ras=np.eye(4),
             uncertainty=uncertainty)
    with pytest.raises(InputError, match=message):
        read_uncertainty(tmp_path)


def _write_raw(folder, arrays, settings):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / INPUT_FILE, **arrays)
    (folder / JOB_FILE).write_text(json.dumps(settings))


GOOD = {"t1n": np.ones((4, 5, 6), np.float32), "ijk_to_ras": np.eye(4)}


@pytest.mark.parametrize("arrays, settings, message", [
    (GOOD, {"contrasts": ["t1n"], "bundle": "b"}, r"missing the keys \['task'\]"),
    (GOOD, {**SETTINGS, "task": "segment", "contrasts": ["t1n"]}, "unknown task 'segment'"),
    (GOOD, {**SETTINGS, "contrasts": ["t1n"], "colour": 1}, "unknown keys"),
    (GOOD, {**SETTINGS, "contrasts": ["t1n"], "steps": "many"}, "'steps' must be a whole number"),
    (GOOD, {**SETTINGS, "task": "super_resolve"}, "exactly one contrast"),
    (GOOD, SETTINGS, r"lacks the contrasts \['t2w'\]"),
    ({"t1n": np.ones((4, 5), np.float32), "ijk_to_ras": np.eye(4)}, {**SETTINGS, "contrasts": ["t1n"]},
     "must be a 3D"),
    ({"t1n": np.full((2, 2, 2), np.nan, np.float32), "ijk_to_ras": np.eye(4)}, {**SETTINGS, "contrasts": ["t1n"]},
     "8 NaN"),
    ({"t1n": np.ones((2, 2, 2), np.float32), "ijk_to_ras": np.eye(3)}, {**SETTINGS, "contrasts": ["t1n"]},
     "4x4"),
    ({"t1n": np.ones((2, 2, 2), np.float32)}, {**SETTINGS, "contrasts": ["t1n"]}, "no 'ijk_to_ras'"),
    ({"t1n": np.ones((2, 2, 2)), "t2w": np.ones((2, 2, 3)), "ijk_to_ras": np.eye(4)}, SETTINGS, "share one grid"),
    ({**GOOD, "ijk_to_ras": np.zeros((4, 4))}, {**SETTINGS, "contrasts": ["t1n"]}, "last row"),
])
def test_bad_jobs_are_input_errors(tmp_path, arrays, settings, message):
    _write_raw(tmp_path, arrays, settings)
    with pytest.raises(InputError, match=message):
        read_job(tmp_path)


def test_missing_files_and_bad_json(tmp_path):
    with pytest.raises(InputError, match="no job.json"):
        read_job(tmp_path)
    (tmp_path / JOB_FILE).write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        read_job(tmp_path)
    (tmp_path / JOB_FILE).write_text(json.dumps({**SETTINGS, "contrasts": ["t1n"]}))
    with pytest.raises(InputError, match="no input.npz"):
        read_job(tmp_path)


def test_write_job_refuses_mismatched_inputs(tmp_path):
    with pytest.raises(InputError, match="differ from the volumes"):
        write_job(tmp_path, {"t1n": _vol()}, SETTINGS)
    with pytest.raises(InputError, match="not on the grid"):
        write_job(tmp_path, {"t1n": _vol(), "t2w": _vol(affine=np.eye(4))}, SETTINGS)
    assert not (tmp_path / JOB_FILE).exists()


# -- the real worker subprocess --------------------------------------------------------------
def seeded_blob(shape_kji, seed=0):
    return blob(shape_kji, np.random.default_rng(seed))


def sr_job(folder, bundle, steps=3, lr=None, **extra):
    lr = lr if lr is not None else Volume(seeded_blob((8, 8, 8)), AFFINE)
    settings = {"task": "super_resolve", "contrasts": ["t1n"], "bundle": str(bundle), "sampler": "ddim",
                "steps": steps, "device": "cpu", **extra}
    write_job(folder, {"t1n": lr}, settings)
    return lr


def worker_env(**extra):
    """The test's environment for a worker: one thread, no GPU, no proxy, no registry override."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "-1", "NO_PROXY": "127.0.0.1,localhost"}
    for name in ("SCOREFUSION_FAKE_OOM", "SCOREFUSION_REGISTRY", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_worker(job, *args, env=None, module=False):
    entry = ["-m", "ScoreFusionLib.worker"] if module else [str(WORKER)]
    cmd = [sys.executable, *entry, "run", "--job", str(job), *args]
    # run from another folder, so the script has to find its package by itself
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or worker_env(), timeout=120,
                          cwd=REPO if module else job)
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout is pure protocol
    return proc, events


def stream_worker(args, env, on_event, timeout=60):
    """Run the worker, calling ``on_event`` on each event as it arrives; (exit code, events)."""
    proc = subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    events = []
    try:
        for line in proc.stdout:
            events.append(protocol.parse_line(line))
            on_event(events[-1])
        return proc.wait(timeout=timeout), events
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()


def names(events):
    return [e["event"] for e in events]


def no_output(job):
    return not (job / OUTPUT_FILE).exists() and not (job / OUTPUT_JSON).exists() and not [
        p for p in job.iterdir() if p.name.startswith(".")
    ]


def test_worker_super_resolves_onto_the_sr_grid(tmp_path, sr_bundle):
    job = tmp_path / "job"
    lr = sr_job(job, sr_bundle)
    proc, events = run_worker(job, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert events[0]["event"] == "hello" and events[0]["protocol"] == 1 and events[0]["device"] == "cpu"
    assert isinstance(events[0]["pid"], int) and events[0]["torch"]
    stages = [e["name"] for e in events if e["event"] == "stage"]
    assert stages == list(protocol.RUN_STAGES)
    progress = [e for e in events if e["event"] == "progress"]
    total = progress[0]["total"]
    assert [p["step"] for p in progress] == list(range(1, total + 1)) and total >= 3
    assert progress[0]["eta_s"] is None and progress[-1]["eta_s"] == 0.0
    assert names(events)[-1] == "result" and events[-1]["path"] == OUTPUT_FILE
    seq = names(events)
    assert seq.index("hello") < seq.index("stage") < seq.index("progress") < seq.index("result")
    vol, prov = read_output(job)
    shape, affine = super_resolution_grid(lr.shape_ijk, lr.affine, 2)
    assert vol.shape_ijk == shape
    np.testing.assert_allclose(vol.affine, affine, atol=1e-12)
    assert prov["job"]["task"] == "super_resolve" and prov["steps"] == 3


def test_worker_synthesis_keeps_the_input_matrix(tmp_path, mt_bundle):
    job = tmp_path / "job"
    vols = {"t1n": Volume(seeded_blob((8, 8, 8), 1), AFFINE), "t2w": Volume(seeded_blob((8, 8, 8), 2), AFFINE)}
    write_job(job, vols, {"task": "synthesize", "contrasts": ["t1n", "t2w"], "bundle": str(mt_bundle),
                          "sampler": "ddim", "steps": 2, "device": "cpu",
                          "bundle_sha256": sha256_file(mt_bundle / "manifest.json")})
    proc, events = run_worker(job, module=True)
    assert proc.returncode == 0, proc.stderr
    assert events[-1] == {"event": "result", "path": OUTPUT_FILE}
    vol, _ = read_output(job)
    assert vol.array.shape == (8, 8, 8)
    np.testing.assert_array_equal(vol.affine, AFFINE)


def test_worker_cancels_within_one_step(tmp_path, sr_bundle):
    job = tmp_path / "job"
    sr_job(job, sr_bundle, steps=20)
    def cancel_at_first_progress(event):
        if event["event"] == "progress" and not (job / CANCEL_FILE).exists():
            (job / CANCEL_FILE).touch()

    code, events = stream_worker(["run", "--job", job, "--device", "cpu"], worker_env(), cancel_at_first_progress)
    assert code == protocol.EXIT_CANCELLED
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "cancelled"
    steps = [e["step"] for e in events if e["event"] == "progress"]
    # the cancel file appears while step 2 runs (rarely 3 on a busy machine): the worker stops right after it
    assert steps[0] == 1 and len(steps) <= 3
    assert steps[-1] < next(e["total"] for e in events if e["event"] == "progress")
    assert "result" not in names(events)
    assert no_output(job)


def test_worker_rejects_nan_input(tmp_path, sr_bundle):
    job = tmp_path / "job"
    sr_job(job, sr_bundle)
    arrays = dict(np.load(job / INPUT_FILE))
    arrays["t1n"][0, 0, 0] = np.nan
    np.savez(job / INPUT_FILE, **arrays)
    proc, events = run_worker(job)
    assert proc.returncode == protocol.EXIT_INPUT
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "input" and "NaN" in events[-1]["msg"]
    assert no_output(job)


def test_worker_reports_missing_and_swapped_bundles_as_weights(tmp_path, sr_bundle):
    job = tmp_path / "missing"
    sr_job(job, tmp_path / "no-such-bundle")
    proc, events = run_worker(job)
    assert proc.returncode == protocol.EXIT_INPUT
    assert events[-1]["kind"] == "weights" and events[-1]["hint"]
    assert no_output(job)
    job = tmp_path / "swapped"
    sr_job(job, sr_bundle, bundle_sha256="0" * 64)
    proc, events = run_worker(job)
    assert proc.returncode == protocol.EXIT_INPUT
    assert events[-1]["kind"] == "weights" and "sha256" in events[-1]["msg"]


def test_worker_fake_oom(tmp_path, sr_bundle):
    job = tmp_path / "job"
    sr_job(job, sr_bundle)
    proc, events = run_worker(job, env=worker_env(SCOREFUSION_FAKE_OOM="1"))
    assert proc.returncode == protocol.EXIT_OOM
    err = events[-1]
    assert err["event"] == "error" and err["kind"] == "oom"
    assert "CPU" in err["hint"] and "slice" in err["hint"]
    assert "progress" not in names(events)
    assert no_output(job)


def test_worker_probe_prints_json():
    proc = subprocess.run([sys.executable, str(WORKER), "probe"], capture_output=True, text=True,
                          env=worker_env(), timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    import torch

    assert info["ok"] is True and info["torch"] == torch.__version__
    assert "cuda_build" in info and isinstance(info["devices"], list)


def test_worker_without_torch_says_so(tmp_path, monkeypatch):
    """probe and run report a missing torch instead of crashing (simulated in-process)."""
    from ScoreFusionLib import worker

    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    info = worker.probe()
    assert info["ok"] is False and info["torch"] is None and "torch" in info["error"]
    buf = io.StringIO()
    assert worker.main(["run", "--job", str(tmp_path)], stream=buf) == protocol.EXIT_INTERNAL
    events = [protocol.parse_line(line) for line in buf.getvalue().splitlines()]
    assert names(events) == ["hello", "error"] and "PyTorch" in events[1]["msg"]


def test_warnings_become_warning_events_in_process(tmp_path, sr_bundle):
    """An oblique input makes the pipeline warn; the warning travels as a protocol event."""
    from scipy.spatial.transform import Rotation

    from ScoreFusionLib import worker

    oblique = np.eye(4)
    oblique[:3, :3] = Rotation.from_euler("z", 30, degrees=True).as_matrix() * 2.0
    job = tmp_path / "job"
    sr_job(job, sr_bundle, steps=2, lr=Volume(seeded_blob((8, 8, 8)), oblique))
    buf = io.StringIO()
    assert worker.main(["run", "--job", str(job)], stream=buf) == protocol.EXIT_OK
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    warns = [e for e in events if e["event"] == "warning"]
    assert warns and "oblique" in warns[0]["msg"]
    assert events[-1]["event"] == "result"


# -- models named by id, fetch and import ------------------------------------------------------
@pytest.fixture
def env(tmp_path):
    """A worker environment with a private, empty cache (the shipped registry unless a test sets one)."""
    return worker_env(SCOREFUSION_HOME=str(tmp_path / "home"))


@pytest.fixture(scope="module")
def sr_zip(sr_bundle, tmp_path_factory):
    """The SR test bundle packed as a release archive (three tiny planes: several download chunks)."""
    from ScoreFusionLib.bundle_archive import pack_bundle

    out = tmp_path_factory.mktemp("zip") / "tiny-sr.zip"
    pack_bundle(sr_bundle, out)
    return out


def test_a_job_may_name_a_bundle_zip_and_its_manifest_sha256_is_checked(tmp_path, env, sr_zip):
    """The .zip is unpacked into the cache once; bundle_sha256 is checked on that unpacked folder."""
    import zipfile

    with zipfile.ZipFile(sr_zip) as z:
        manifest_sha = hashlib.sha256(z.read("manifest.json")).hexdigest()
    job = tmp_path / "good"
    sr_job(job, sr_zip, steps=2, bundle_sha256=manifest_sha)
    proc, events = run_worker(job, env=env)
    assert proc.returncode == protocol.EXIT_OK, proc.stderr
    assert read_output(job)[0].array.shape == (16, 16, 16)
    unpacked = sorted((Path(env["SCOREFUSION_HOME"]) / "archives").iterdir())
    assert [p.name for p in unpacked] == [sha256_file(sr_zip)] and (unpacked[0] / "manifest.json").is_file()
    job = tmp_path / "swapped"
    sr_job(job, sr_zip, steps=2, bundle_sha256="0" * 64)
    proc, events = run_worker(job, env=env)
    assert proc.returncode == protocol.EXIT_INPUT
    assert events[-1]["kind"] == "weights" and manifest_sha in events[-1]["msg"]
    assert no_output(job)


def test_a_job_naming_a_remote_model_that_is_not_installed_asks_for_the_download(tmp_path, env, sr_zip):
    env["SCOREFUSION_REGISTRY"] = str(registry_file(tmp_path, [
        entry("far-sr", "http://127.0.0.1:9/far-sr.zip", sr_zip.read_bytes())]))  # never contacted
    job = tmp_path / "job"
    sr_job(job, "far-sr@1.0.0", steps=2)
    proc, events = run_worker(job, env=env)
    assert proc.returncode == protocol.EXIT_INPUT
    assert events[-1]["kind"] == "weights" and "not installed; download it first" in events[-1]["msg"]
    assert "progress" not in names(events) and no_output(job)
    assert installed_folders(env) == []


def test_byte_progress_is_throttled_cancellable_and_ends_at_the_total(tmp_path):
    from ScoreFusionLib.worker import JobCancelled, _ByteProgress

    events = []
    total = 50_000
    progress = _ByteProgress(tmp_path / CANCEL_FILE, events.append)
    start = time.monotonic()
    for done in range(10, total + 1, 10):  # 5000 chunks, as fast as they come
        progress(done, total)
    elapsed = time.monotonic() - start
    steps = [e["step"] for e in events]
    assert 2 <= len(steps) <= 2 + elapsed / 0.1  # the first, at most one per 0.1 s, and the last
    assert steps == sorted(set(steps)) and steps[-1] == events[-1]["total"] == total
    assert events[-1]["eta_s"] == 0.0
    progress.finish(total)
    assert len(events) == len(steps)  # the final event went out already: no duplicate
    unknown_total = []
    progress_without_total = _ByteProgress(tmp_path / CANCEL_FILE, unknown_total.append)
    for done in range(10, total + 1, 10):
        progress_without_total(done, None)
    assert 1 <= len(unknown_total) <= 2 + (time.monotonic() - start) / 0.1  # throttled as well
    assert all(e["step"] == e["total"] for e in unknown_total)
    nothing_to_copy = _ByteProgress(tmp_path / CANCEL_FILE, events.append)
    nothing_to_copy.finish(1234)  # e.g. a complete .part from an earlier run: still one final event
    assert events[-1]["step"] == events[-1]["total"] == 1234
    (tmp_path / CANCEL_FILE).touch()
    with pytest.raises(JobCancelled, match="after 20 bytes"):
        progress(20, total)


def test_fetch_cancelled_mid_transfer_keeps_the_part_and_the_next_fetch_resumes(tmp_path, env, server, sr_zip):
    data = sr_zip.read_bytes()
    server.files["/tiny.zip"] = data
    server.faults["/tiny.zip"] = [("stall-body", 1.5)]  # 1000 bytes, a pause, then the rest
    env["SCOREFUSION_REGISTRY"] = str(registry_file(tmp_path, [entry("tiny-sr", server.url("/tiny.zip"), data)]))
    job = tmp_path / "fetch"  # created by the worker
    def cancel_once_transferring(event):
        if event == {"event": "stage", "name": "downloading"}:
            while not server.log:  # the transfer has started
                time.sleep(0.01)
            (job / CANCEL_FILE).touch()

    code, events = stream_worker(["fetch", "--id", "tiny-sr", "--job", job], env, cancel_once_transferring)
    assert code == protocol.EXIT_CANCELLED
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "cancelled" and events[-1]["hint"]
    assert "result" not in names(events) and installed_folders(env) == []
    parts = list(Path(env["SCOREFUSION_HOME"]).rglob("*.part"))
    assert len(parts) == 1
    kept = parts[0].stat().st_size
    assert 1000 <= kept < len(data)
    (job / CANCEL_FILE).unlink()
    proc, events = worker("fetch", "--id", "tiny-sr", "--job", job, env=env)
    assert proc.returncode == 0, proc.stderr
    assert server.log[-1]["headers"]["Range"] == f"bytes={kept}-"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[0]["step"] > kept and progress[-1]["step"] == progress[-1]["total"] == len(data)
    assert events[-1] == {"event": "result", "path": str(installed_folders(env)[0])}
    assert not list(Path(env["SCOREFUSION_HOME"]).rglob("*.part"))


def test_fetch_copies_a_shipped_embedded_model_and_models_marks_it_installed(env):
    """The shipped registry (Resources/models.json), an empty cache, no network: the smallest embedded model."""
    from ScoreFusionLib.registry import load_registry

    shipped = {e.id: e for e in load_registry()}
    model = min((e for e in shipped.values() if e.embedded), key=lambda e: e.size)
    before = {m["id"]: m for m in json.loads(worker("models", env=env)[0].stdout)["models"]}
    assert set(before) == set(shipped)
    assert all(m["embedded"] and not m["installed"] and m["installed_path"] is None for m in before.values())
    proc, events = worker("fetch", "--id", f"{model.id}@{model.version}", "--job", Path(env["SCOREFUSION_HOME"]).parent
                          / "fetch", env=env)
    assert proc.returncode == 0, proc.stderr
    assert names(events)[:2] == ["hello", "stage"] and events[1]["name"] == "downloading"
    progress = [e for e in events if e["event"] == "progress"]
    steps = [e["step"] for e in progress]
    assert steps == sorted(set(steps)) and steps[-1] == progress[-1]["total"] == model.size
    assert all(e["total"] == model.size for e in progress)
    final = Path(env["SCOREFUSION_HOME"]) / "models" / model.id / model.version
    assert events[-1] == {"event": "result", "path": str(final)} and (final / "manifest.json").is_file()
    after = {m["id"]: m for m in json.loads(worker("models", env=env)[0].stdout)["models"]}
    assert after[model.id]["installed"] is True and after[model.id]["installed_path"] == str(final)
    assert [i for i, m in after.items() if m["installed"]] == [model.id]


def test_import_of_a_tampered_bundle_folder_is_refused_with_the_reason(tmp_path, env, sr_bundle):
    import shutil

    env["SCOREFUSION_REGISTRY"] = str(registry_file(tmp_path, []))
    folder = tmp_path / "tampered"
    shutil.copytree(sr_bundle, folder)
    weights = sorted(folder.glob("*.safetensors"))[0]
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # a flipped bit in the tensor data: the header still reads, the sha256 does not match
    weights.write_bytes(bytes(raw))
    proc, events = worker("import", "--path", folder, "--job", tmp_path / "imp", env=env)
    assert proc.returncode == protocol.EXIT_INPUT
    assert names(events) == ["hello", "stage", "error"]
    assert events[-1]["kind"] == "weights" and f"weight file {weights.name}" in events[-1]["msg"]
    assert "corrupted or was replaced" in events[-1]["msg"]
    models = Path(env["SCOREFUSION_HOME"]) / "models"
    assert not models.exists() or list(models.rglob("*")) == []  # no staging folder left behind
