"""The module's logic end to end outside Slicer: slicer-core's real MRML scene, the real worker subprocess.

``ProcessingLogic`` reads scene volumes, runs ``worker.py`` on a tiny random bundle and imports the
result. These tests check what users rely on: the super-resolution grid (new IJK->RAS, outer box
kept), the input left untouched, the output placed with the input (parent transform, study), the
provenance attributes, the uncertainty map, and that a cancelled or failed run adds nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("CI") == "true":
    import slicer_core  # noqa: F401  (make test installs it; under CI its absence is a failure)
else:
    pytest.importorskip("slicer_core", reason="slicer-core is not installed (pip install -e '.[mrml]')")

import slicer  # noqa: E402
import vtk  # noqa: E402

from bundle_fixtures import blob  # noqa: E402
from ScoreFusionLib.bundle import sha256_file  # noqa: E402
from ScoreFusionLib.geometry import super_resolution_affine  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ScoreFusionSlicer"))

from ScoreFusionSlicerLib import scene_io  # noqa: E402
from ScoreFusionSlicerLib.logic import CANCELLED, DONE, FAILED, ProcessingLogic, RunRequest  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "-1"}
ENV.pop("SCOREFUSION_FAKE_OOM", None)


@pytest.fixture
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    return slicer.mrmlScene


@pytest.fixture
def logic(tmp_path):
    shown = []
    job_root = tmp_path / "jobs"
    job_root.mkdir()
    lg = ProcessingLogic(sys.executable, str(REPO), job_root=str(job_root),
                         show_results=lambda *nodes: shown.append(nodes), env=ENV, kill_grace_s=20.0)
    lg.shown = shown
    return lg


def oblique_matrix(spacing=(3.0, 2.0, 2.5)):
    angle = np.radians(12.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([-1.0, 1.0, 1.0]) @ np.diag(spacing)
    m[:3, 3] = [31.0, -12.5, 40.0]
    return m


def study_volume(scene, shape=(8, 8, 8), matrix=None, name="input", seed=0):
    """A volume under a patient/study with a (non-hardened) parent transform, as loaded from DICOM."""
    matrix = oblique_matrix() if matrix is None else matrix
    node = slicer.util.addVolumeFromArray(blob(shape, np.random.default_rng(seed)), ijkToRAS=matrix, name=name)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    sh = scene.GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "patient")
    study = sh.CreateStudyItem(patient, "study")
    sh.CreateItem(study, node)  # what loading does in Slicer; a bare slicer-core scene adds no item itself
    return node, study


def matrix_of(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def volume_count(scene):
    return scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")


def request(bundle, inputs, task="super_resolve", output_node=None, output_name=None, keep_job_files=False,
            **settings):
    settings = {"task": task, "bundle": str(bundle), "sampler": "ddim", "steps": 2, "time_grid": "default",
                "device": "cpu", **settings}
    return RunRequest(inputs=inputs, settings=settings, output_node=output_node, output_name=output_name,
                      keep_job_files=keep_job_files)


def same_grid_contrast(scene, node, seed=1, name="t2"):
    """A second contrast on ``node``'s grid, under the same parent transform (as a co-registered series)."""
    shape = slicer.util.arrayFromVolume(node).shape
    other = slicer.util.addVolumeFromArray(blob(shape, np.random.default_rng(seed)), ijkToRAS=matrix_of(node),
                                           name=name)
    other.SetAndObserveTransformNodeID(node.GetTransformNodeID())
    return other


def test_super_resolution_lands_on_the_new_grid_beside_the_untouched_input(scene, logic, sr_bundle):
    node, study = study_volume(scene)
    voxels_before, matrix_before = slicer.util.arrayFromVolume(node).copy(), matrix_of(node)
    events = []
    handle = logic.process(request(sr_bundle, {"t1n": node}, output_name="input SR"), event_callback=events.append)
    assert handle.state == DONE, handle.error
    out = handle.output_node
    assert out.GetName() == "input SR"
    assert slicer.util.arrayFromVolume(out).shape == (16, 16, 16)
    expected = super_resolution_affine(matrix_before, (2, 2, 2))
    np.testing.assert_allclose(matrix_of(out), expected, atol=1e-9)
    # the outer box of the grid is kept: voxel corner (-1/2, -1/2, -1/2) maps to the same RAS point
    corner = np.array([-0.5, -0.5, -0.5, 1.0])
    np.testing.assert_allclose(matrix_of(out) @ corner, matrix_before @ corner, atol=1e-9)
    # the input is never modified
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), voxels_before)
    np.testing.assert_array_equal(matrix_of(node), matrix_before)
    # placed with the input: same parent transform (not hardened), same study
    assert out.GetTransformNodeID() == node.GetTransformNodeID()
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(out)) == study
    # provenance saved with the scene
    assert out.GetAttribute("ScoreFusion.modelSha256") == sha256_file(sr_bundle / "manifest.json")
    assert out.GetAttribute("ScoreFusion.steps") == "2" and out.GetAttribute("ScoreFusion.task") == "super_resolve"
    assert [e["event"] for e in events][0] == "hello" and events[-1]["event"] == "result"
    assert logic.shown == [(node, out, None)]
    assert not os.path.exists(handle.job_dir)


def test_synthesis_with_samples_adds_an_uncertainty_map_on_the_input_grid(scene, logic, mt_bundle):
    node, _ = study_volume(scene, shape=(8, 10, 8), matrix=oblique_matrix((2.0, 2.0, 2.0)))
    t2 = same_grid_contrast(scene, node)
    handle = logic.process(request(mt_bundle, {"t1n": node, "t2w": t2}, task="synthesize", samples=2, seed=3))
    assert handle.state == DONE, handle.error
    out, unc = handle.output_node, handle.uncertainty_node
    assert unc is not None and unc.GetAttribute("ScoreFusion.role") == "uncertainty"
    for result in (out, unc):
        assert slicer.util.arrayFromVolume(result).shape == (8, 10, 8)
        np.testing.assert_allclose(matrix_of(result), matrix_of(node), atol=1e-9)
    assert slicer.util.arrayFromVolume(unc).max() > 0
    assert out.GetAttribute("ScoreFusion.samples") == "2"
    assert logic.shown == [(node, out, unc)]


def test_results_can_go_into_an_existing_output_node(scene, logic, sr_bundle):
    node, _ = study_volume(scene)
    target = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), name="previous result")
    handle = logic.process(request(sr_bundle, {"t1n": node}, output_node=target))
    assert handle.state == DONE and handle.output_node is target
    assert slicer.util.arrayFromVolume(target).shape == (16, 16, 16)
    np.testing.assert_allclose(matrix_of(target), super_resolution_affine(matrix_of(node), (2, 2, 2)), atol=1e-9)


def test_cancelled_run_adds_nothing(scene, logic, sr_bundle):
    node, _ = study_volume(scene)
    before = volume_count(scene)

    def cancel_on_progress(event):
        if event["event"] == "progress":
            logic.cancel()

    handle = logic.process(request(sr_bundle, {"t1n": node}, steps=200), wait_for_completion=False,
                           event_callback=cancel_on_progress)
    assert handle.wait(timeout=120) == CANCELLED
    assert handle.exit_code == 130  # the worker stopped by itself, within a step
    assert volume_count(scene) == before and handle.output_node is None
    assert not os.path.exists(handle.job_dir)


def test_failed_run_reports_the_workers_error_and_adds_nothing(scene, logic, tmp_path):
    node, _ = study_volume(scene)
    before = volume_count(scene)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    handle = logic.process(request(broken, {"t1n": node}))
    assert handle.state == FAILED and handle.exit_code == 2
    assert handle.error_kind == "weights" and "manifest" in handle.error
    assert volume_count(scene) == before


def test_a_failing_import_is_rolled_back(scene, tmp_path, mt_bundle):
    node, _ = study_volume(scene, matrix=oblique_matrix((2.0, 2.0, 2.0)))
    t2 = same_grid_contrast(scene, node)
    before = volume_count(scene)

    def broken_layout(*nodes):
        raise RuntimeError("no layout manager")

    lg = ProcessingLogic(sys.executable, str(REPO), job_root=str(tmp_path), show_results=broken_layout, env=ENV)
    handle = lg.process(request(mt_bundle, {"t1n": node, "t2w": t2}, task="synthesize", samples=2))
    assert handle.state == FAILED and "no layout manager" in handle.error
    assert volume_count(scene) == before  # neither the output nor the uncertainty map stayed


def test_bad_requests_are_refused_before_anything_starts(scene, logic, mt_bundle, sr_bundle):
    t1, _ = study_volume(scene, name="t1")
    other_grid = slicer.util.addVolumeFromArray(np.ones((8, 8, 9), np.float32), name="t2")
    job_root = Path(logic.job_root)
    with pytest.raises(scene_io.GridMismatchError):
        logic.process(request(mt_bundle, {"t1n": t1, "t2w": other_grid}, task="synthesize"))
    with pytest.raises(ValueError, match="cannot be one of the inputs"):
        logic.process(request(sr_bundle, {"t1n": t1}, output_node=t1))
    with pytest.raises(ValueError, match="'samples' must be a whole number"):  # settings checked by JobSettings
        logic.process(request(sr_bundle, {"t1n": t1}, samples=0))
    with pytest.raises(ValueError, match="missing: t1n"):
        logic.process(request(sr_bundle, {"t1n": None}))
    nan = slicer.util.addVolumeFromArray(np.full((8, 8, 8), np.nan, np.float32), name="nan")
    with pytest.raises(ValueError):
        logic.process(request(sr_bundle, {"t1n": nan}))
    assert list(job_root.iterdir()) == [] and not logic.is_running


def test_keep_job_files_keeps_the_folder_for_inspection(scene, logic, sr_bundle):
    node, _ = study_volume(scene)
    handle = logic.process(request(sr_bundle, {"t1n": node}, keep_job_files=True))
    assert handle.state == DONE
    assert {"job.json", "input.npz", "output.npz", "output.json"} <= set(os.listdir(handle.job_dir))
