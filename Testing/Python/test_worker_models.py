"""The worker's model handling: jobs naming a model id, several samples, and the fetch/import/models commands.

Every test runs the real worker subprocess with a private cache (``SCOREFUSION_HOME``) and a private
registry (``SCOREFUSION_REGISTRY``) whose remote entries point at the 127.0.0.1 test server.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundle_fixtures import blob, make_random_bundle
from ScoreFusionLib.bundle_archive import pack_bundle
from ScoreFusionLib.data.task import TaskSpec
from ScoreFusionLib.degradation import AveragePool
from ScoreFusionLib.errors import InputError
from ScoreFusionLib.jobio import OUTPUT_FILE, read_output, read_uncertainty, write_job
from ScoreFusionLib.translate import SamplingOptions, synthesize
from ScoreFusionLib.volume import Volume

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "ScoreFusionLib" / "worker.py"
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def sr_zip(tmp_path_factory):
    root = tmp_path_factory.mktemp("srzip")
    spec = TaskSpec(kind="sr", inputs=[], target="t1n", degradation=AveragePool(2))
    folder = make_random_bundle(root / "bundle", spec, planes=("axial",))
    pack_bundle(folder, root / "tiny-sr.zip")
    return root / "tiny-sr.zip"


def registry_file(folder: Path, entries: list[dict]) -> Path:
    path = folder / "models.json"
    path.write_text(json.dumps({"format": "scorefusion-registry", "format_version": 1, "models": entries}))
    return path


def entry(model_id: str, url: str, data: bytes, embedded: bool = False, **extra) -> dict:
    d = {"id": model_id, "title": f"{model_id} title", "task": "sr", "inputs": [], "target": "t1n",
         "version": "1.0.0", "url": url, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
         "license": "MIT", "description": "a test model", **extra}
    if embedded:
        d["embedded"] = True
    return d


@pytest.fixture
def env(tmp_path):
    """A private cache and no proxies; the registry is set per test."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "-1", "SCOREFUSION_HOME": str(tmp_path / "home"),
         "NO_PROXY": "127.0.0.1,localhost"}
    for name in ("SCOREFUSION_FAKE_OOM", "SCOREFUSION_REGISTRY", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                 "https_proxy", "ALL_PROXY", "all_proxy"):
        e.pop(name, None)
    return e


def worker(*args, env):
    proc = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=180)
    lines = proc.stdout.splitlines()
    return proc, [json.loads(line) for line in lines]


def installed_folders(env) -> list[Path]:
    models = Path(env["SCOREFUSION_HOME"]) / "models"
    return sorted(p for p in models.glob("*/*") if p.is_dir()) if models.exists() else []


def test_a_job_names_an_embedded_model_by_id(tmp_path, env, sr_zip):
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "tiny-sr.zip").write_bytes(sr_zip.read_bytes())
    env["SCOREFUSION_REGISTRY"] = str(registry_file(tmp_path / "reg", [
        entry("tiny-sr", "tiny-sr.zip", sr_zip.read_bytes(), embedded=True)]))
    job = tmp_path / "job"
    write_job(job, {"t1n": Volume(blob((8, 8, 8), np.random.default_rng(0)), AFFINE)},
              {"task": "super_resolve", "contrasts": ["t1n"], "bundle": "tiny-sr@1.0.0", "sampler": "ddim",
               "steps": 2, "device": "cpu"})
    proc, events = worker("run", "--job", job, env=env)
    assert proc.returncode == 0, proc.stderr
    assert events[-1] == {"event": "result", "path": OUTPUT_FILE}
    assert read_output(job)[0].array.shape == (16, 16, 16)
    assert read_uncertainty(job) is None  # one sample: no uncertainty map
    # installed into the cache on first use, without any network
    assert installed_folders(env) == [Path(env["SCOREFUSION_HOME"]) / "models" / "tiny-sr" / "1.0.0"]


def test_several_samples_give_their_mean_and_standard_deviation(tmp_path, env, mt_bundle):
    t1 = Volume(blob((8, 10, 8), np.random.default_rng(1)), AFFINE)
    t2 = Volume(blob((8, 10, 8), np.random.default_rng(2)), AFFINE)
    job = tmp_path / "job"
    write_job(job, {"t1n": t1, "t2w": t2},
              {"task": "synthesize", "contrasts": ["t1n", "t2w"], "bundle": str(mt_bundle), "sampler": "ddim",
               "steps": 2, "seed": 5, "samples": 2, "device": "cpu"})
    proc, events = worker("run", "--job", job, env=env)
    assert proc.returncode == 0, proc.stderr
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps == list(range(1, len(steps) + 1)) and events[[e["event"] for e in events].index("progress")][
        "total"] == len(steps)  # both samples' steps, counted as one run
    mean, _ = read_output(job)
    std = read_uncertainty(job)
    np.testing.assert_array_equal(std.affine, mean.affine)
    assert std.array.shape == mean.array.shape and std.array.max() > 0 and std.array.min() >= 0
    singles = [synthesize({"t1n": t1, "t2w": t2}, mt_bundle,
                          SamplingOptions(sampler="ddim", steps=2, seed=seed, device="cpu")).volume.array
               for seed in (5, 6)]
    np.testing.assert_allclose(mean.array, np.mean(singles, axis=0), atol=1e-4)
    np.testing.assert_allclose(std.array, np.std(singles, axis=0, ddof=1), atol=1e-4)


@pytest.mark.parametrize("field,value,message", [
    ("samples", 0, "'samples' must be a whole number in 1..64"),
    ("samples", 65, "'samples' must be a whole number in 1..64"),
    ("samples", True, "'samples'"),
    ("tile_size", 4, "'tile_size' must be null or a whole number of voxels >= 8"),
    ("max_memory_gb", -1.0, "'max_memory_gb' must be null or a positive number"),
    ("max_memory_gb", "lots", "'max_memory_gb'"),
])
def test_bad_sampling_settings_are_refused_before_anything_is_written(tmp_path, field, value, message):
    settings = {"task": "super_resolve", "contrasts": ["t1n"], "bundle": "x", field: value}
    with pytest.raises(InputError, match=message):
        write_job(tmp_path / "job", {"t1n": Volume(np.ones((4, 4, 4), np.float32), AFFINE)}, settings)
    assert not (tmp_path / "job").exists() or list((tmp_path / "job").iterdir()) == []


def test_a_raw_job_with_bad_samples_fails_with_exit_2_and_no_output(tmp_path, env, sr_bundle):
    job = tmp_path / "job"
    write_job(job, {"t1n": Volume(blob((8, 8, 8), np.random.default_rng(0)), AFFINE)},
              {"task": "super_resolve", "contrasts": ["t1n"], "bundle": str(sr_bundle)})
    settings = json.loads((job / "job.json").read_text())
    settings["samples"] = 0
    (job / "job.json").write_text(json.dumps(settings))
    proc, events = worker("run", "--job", job, env=env)
    assert proc.returncode == 2
    assert events[-1]["kind"] == "input" and "samples" in events[-1]["msg"]
    assert not (job / OUTPUT_FILE).exists()


def test_fetch_streams_progress_and_installs_the_verified_model(tmp_path, env, server, sr_zip):
    data = sr_zip.read_bytes()
    server.files["/tiny.zip"] = data
    env["SCOREFUSION_REGISTRY"] = str(registry_file(tmp_path, [entry("tiny-sr", server.url("/tiny.zip"), data)]))
    proc, events = worker("fetch", "--id", "tiny-sr@1.0.0", "--job", tmp_path / "fetch", env=env)
    assert proc.returncode == 0, proc.stderr
    kinds = [e["event"] for e in events]
    assert kinds[0] == "hello" and events[1] == {"event": "stage", "name": "downloading"}
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["step"] == progress[-1]["total"] == len(data)
    assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)
    final = Path(env["SCOREFUSION_HOME"]) / "models" / "tiny-sr" / "1.0.0"
    assert events[-1] == {"event": "result", "path": str(final)}
    assert (final / "manifest.json").is_file()
    listed = worker("models", env=env)[0]
    model = json.loads(listed.stdout)["models"][0]
    assert model["id"] == "tiny-sr" and model["installed"] and model["installed_path"] == str(final)


def test_fetch_with_a_wrong_checksum_leaves_the_cache_empty(tmp_path, env, server, sr_zip):
    data = sr_zip.read_bytes()
    server.files["/tiny.zip"] = data
    bad = entry("tiny-sr", server.url("/tiny.zip"), data)
    bad["sha256"] = "1" * 64
    env["SCOREFUSION_REGISTRY"] = str(registry_file(tmp_path, [bad]))
    proc, events = worker("fetch", "--id", "tiny-sr", "--job", tmp_path / "fetch", env=env)
    assert proc.returncode == 2
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "weights"
    assert "checksum mismatch" in events[-1]["msg"]
    assert installed_folders(env) == []
    assert [p for p in Path(env["SCOREFUSION_HOME"]).rglob("*") if p.is_file()] == []


def test_fetch_stops_on_the_cancel_file_and_installs_nothing(tmp_path, env, server, sr_zip):
    data = sr_zip.read_bytes()
    server.files["/tiny.zip"] = data
    env["SCOREFUSION_REGISTRY"] = str(registry_file(tmp_path, [entry("tiny-sr", server.url("/tiny.zip"), data)]))
    job = tmp_path / "fetch"
    job.mkdir()
    (job / "cancel").touch()
    proc, events = worker("fetch", "--id", "tiny-sr", "--job", job, env=env)
    assert proc.returncode == 130
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "cancelled"
    assert installed_folders(env) == []
    parts = list(Path(env["SCOREFUSION_HOME"]).rglob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(data)  # kept for a resume


def test_fetch_of_an_unknown_model_is_a_weights_error(tmp_path, env):
    env["SCOREFUSION_REGISTRY"] = str(registry_file(tmp_path, []))
    proc, events = worker("fetch", "--id", "nope", "--job", tmp_path / "fetch", env=env)
    assert proc.returncode == 2 and "unknown model 'nope'" in events[-1]["msg"]


def test_import_validates_the_bundle_and_lists_it_as_imported(tmp_path, env, sr_zip):
    env["SCOREFUSION_REGISTRY"] = str(registry_file(tmp_path, []))
    broken = tmp_path / "broken.zip"
    data = bytearray(sr_zip.read_bytes())
    broken.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    proc, events = worker("import", "--path", broken, "--job", tmp_path / "imp", env=env)
    assert proc.returncode == 2 and events[-1]["kind"] == "weights"
    assert installed_folders(env) == []
    folder = tmp_path / "unpacked"
    import zipfile

    with zipfile.ZipFile(sr_zip) as z:
        z.extractall(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model"] = {"id": "my-sr", "version": "0.1.0", "title": "My own SR"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    proc, events = worker("import", "--path", folder, "--job", tmp_path / "imp", env=env)
    assert proc.returncode == 0, proc.stderr
    assert events[-1]["path"] == str(Path(env["SCOREFUSION_HOME"]) / "models" / "my-sr" / "0.1.0")
    listed = json.loads(worker("models", env=env)[0].stdout)["models"]
    assert [(m["id"], m["source"], m["title"], m["installed"]) for m in listed] == [
        ("my-sr", "imported", "My own SR", True)]


def test_models_lists_the_shipped_registry_with_cards(env):
    proc, _ = worker("models", env=env)
    assert proc.returncode == 0
    models = {m["id"]: m for m in json.loads(proc.stdout)["models"]}
    assert {"t1-sr4-iso", "t1-thick4-axial", "t1-to-flair", "t1-t2-to-flair"} <= set(models)
    flair = models["t1-to-flair"]
    assert flair["embedded"] and not flair["remote"] and not flair["installed"]
    assert flair["inputs"] == ["t1n"] and flair["target"] == "t2f" and flair["card"].startswith("#")


def test_models_on_a_broken_registry_says_why_as_json(tmp_path, env):
    broken = tmp_path / "models.json"
    broken.write_text('{"format": "scorefusion-registry", "format_version": 1, "models": [{"id": "x"}]}')
    env["SCOREFUSION_REGISTRY"] = str(broken)
    proc, _ = worker("models", env=env)
    reply = json.loads(proc.stdout)
    assert proc.returncode == 2 and reply["models"] == [] and "not a valid model registry" in reply["error"]
