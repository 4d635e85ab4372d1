"""Tumour segmentation from the module's logic, outside Slicer: slicer-core's MRML scene, the real worker.

Without MONAIAuto3DSeg (never present outside the application) ``ProcessingLogic.segment_tumour`` runs a
``segment`` job of the worker with a random segmenter bundle and imports its label map as a segmentation
node: on the inputs' grid, named and coloured for the label convention, placed with the inputs, and
labelled with the back-end, the model and the synthesized inputs. A failed or cancelled job adds nothing.
With a stand-in MONAIAuto3DSeg that extension is still preferred.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("CI") == "true":
    import slicer_core  # noqa: F401  (make test installs it; under CI its absence is a failure)
else:
    pytest.importorskip("slicer_core", reason="slicer-core is not installed (pip install -e '.[mrml]')")

import slicer  # noqa: E402
from test_scene_io import exported_labels, fake_monai_module  # noqa: E402
from test_slicer_logic import ENV, matrix_of, oblique_matrix  # noqa: E402

from ScoreFusionLib.jobio import read_segmentation  # noqa: E402
from segmenter_fixtures import make_random_segmenter, tumour_volumes  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ScoreFusionSlicer"))

from ScoreFusionSlicerLib import segmentation  # noqa: E402
from ScoreFusionSlicerLib.logic import CANCELLED, DONE, FAILED, ProcessingLogic  # noqa: E402

CONTRASTS = ("t1n", "t1c", "t2w", "t2f")


@pytest.fixture
def scene(monkeypatch):
    fresh = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", fresh, raising=False)
    return fresh


@pytest.fixture
def logic(tmp_path):
    job_root = tmp_path / "jobs"
    job_root.mkdir()
    return ProcessingLogic(sys.executable, str(REPO), job_root=str(job_root), env=ENV, kill_grace_s=20.0)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return make_random_segmenter(tmp_path_factory.mktemp("segmenter") / "tiny-seg", seed=3, roi=16)


def study_case(scene, shape_kji=(20, 24, 22)):
    """The four contrasts of a synthetic tumour on one oblique 2 mm grid, in one study, under one transform.

    The FLAIR stands for a ScoreFusion synthesis (it carries ``ScoreFusion.task``)."""
    volumes, _ = tumour_volumes(shape_kji)
    matrix = oblique_matrix((2.0, 2.0, 2.0))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    nodes = {}
    for contrast in CONTRASTS:
        node = slicer.util.addVolumeFromArray(volumes[contrast].array, ijkToRAS=matrix, name=f"case {contrast}")
        node.SetAndObserveTransformNodeID(transform.GetID())
        sh.CreateItem(study, node)
        nodes[contrast] = node
    nodes["t2f"].SetAttribute("ScoreFusion.task", "synthesize")
    return nodes, study, transform


def segmentation_count(scene):
    return scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")


def segments_of(node):
    segments = node.GetSegmentation()
    return {segments.GetNthSegment(i).GetLabelValue(): (segments.GetNthSegment(i).GetName(),
                                                         segments.GetNthSegment(i).GetColor())
            for i in range(segments.GetNumberOfSegments())}


@pytest.mark.parametrize("convention, enhancing", [(None, 3), ("brats2021", 4)], ids=["model's", "brats2021"])
def test_without_monai_the_scorefusion_segmenter_adds_a_segmentation_on_the_input_grid(
        scene, logic, segmenter, convention, enhancing):
    nodes, study, transform = study_case(scene)
    before = {c: (slicer.util.arrayFromVolume(n).copy(), matrix_of(n)) for c, n in nodes.items()}
    events = []
    assert segmentation.monai_auto3dseg_available() is False

    handle = logic.segment_tumour(nodes, segmenter=segmenter, device="cpu", label_convention=convention,
                                  keep_job_files=True, event_callback=events.append)

    assert handle.state == DONE, handle.error
    assert handle.backend == segmentation.SCOREFUSION_BACKEND == "ScoreFusion segmenter"
    seg = handle.output_node
    assert seg.IsA("vtkMRMLSegmentationNode") and seg.GetName() == "case t2f tumour"
    assert segmentation_count(scene) == 1 and not slicer.util.getNodesByClass("vtkMRMLLabelMapVolumeNode", scene)
    # the worker's label map, exactly, on the inputs' grid (the export checks the reference matrix)
    written = read_segmentation(handle.job_dir)
    labels = exported_labels(seg, nodes["t2f"])
    np.testing.assert_array_equal(labels, written.labels.array)
    np.testing.assert_array_equal(written.labels.affine, matrix_of(nodes["t2f"]))
    # one segment per label present, named and coloured for the convention the worker wrote
    convention = convention or "brats2023"
    assert written.label_convention == convention
    present = set(np.unique(labels).tolist()) - {0}
    assert present and present <= {1, 2, enhancing}
    segments = segments_of(seg)
    assert set(segments) == present
    expected_names = {1: "Necrotic tumour core", 2: "Peritumoural oedema", enhancing: "Enhancing tumour"}
    for value, (name, color) in segments.items():
        assert name == expected_names[value]
        assert color == pytest.approx(segmentation.BRATS_LABELS[value][1])
    # placed with the inputs and labelled with what made it
    assert seg.GetTransformNodeID() == transform.GetID()
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    assert seg.GetAttribute("ScoreFusion.segmentationBackend") == "ScoreFusion segmenter"
    assert seg.GetAttribute("ScoreFusion.segmenter") == str(segmenter)
    assert seg.GetAttribute("ScoreFusion.segmenterId") == "tiny-seg"
    assert seg.GetAttribute("ScoreFusion.segmenterSha256") == written.provenance["segmenter"]["weights_sha256"]
    assert seg.GetAttribute("ScoreFusion.labelConvention") == convention
    assert seg.GetAttribute("ScoreFusion.synthesizedInputs") == "t2f"
    assert seg.GetAttribute("ScoreFusion.inputs") == "t1n,t1c,t2w,t2f"
    assert written.provenance["job"]["synthesized"] == ["t2f"]  # its background was zeroed like the real inputs'
    # window progress reached the caller; the inputs were not touched
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["step"] == progress[-1]["total"] > 1
    for contrast, node in nodes.items():
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before[contrast][0])
        np.testing.assert_array_equal(matrix_of(node), before[contrast][1])


def test_a_failing_segmentation_job_leaves_nothing(scene, logic, segmenter):
    nodes, _, _ = study_case(scene, shape_kji=(8, 8, 8))
    nodes_before = scene.GetNumberOfNodes()
    three = {c: n for c, n in nodes.items() if c != "t2f"}
    handle = logic.segment_tumour(three, segmenter=segmenter, device="cpu")
    assert handle.state == FAILED and handle.exit_code == 2
    assert handle.error_kind == "input" and "missing: t2f" in handle.error and handle.output_node is None
    assert not os.path.exists(handle.job_dir) and scene.GetNumberOfNodes() == nodes_before
    with pytest.raises(ValueError, match="missing: t1c"):
        logic.segment_tumour({**nodes, "t1c": None}, segmenter=segmenter)
    with pytest.raises(ValueError, match="'label_convention' must be null"):
        logic.segment_tumour(nodes, segmenter=segmenter, label_convention="brats2024")
    assert scene.GetNumberOfNodes() == nodes_before and list(Path(logic.job_root).iterdir()) == []


def test_a_failing_import_is_rolled_back(scene, logic, segmenter, monkeypatch):
    nodes, _, _ = study_case(scene, shape_kji=(8, 8, 8))
    nodes_before = scene.GetNumberOfNodes()

    def broken_naming(segmentation_node, names, expected_values):  # fails once the segments exist
        assert segmentation_node.GetSegmentation().GetNumberOfSegments() > 0
        raise RuntimeError("no names today")

    monkeypatch.setattr(segmentation, "_name_segments", broken_naming)
    handle = logic.segment_tumour(nodes, segmenter=segmenter, device="cpu")
    assert handle.state == FAILED and "no names today" in handle.error
    assert scene.GetNumberOfNodes() == nodes_before and handle.output_node is None


def test_a_cancelled_segmentation_adds_nothing(scene, logic, segmenter):
    nodes, _, _ = study_case(scene, shape_kji=(40, 40, 40))  # 64 windows
    nodes_before = scene.GetNumberOfNodes()

    def cancel_on_progress(event):
        if event["event"] == "progress":
            logic.cancel()

    handle = logic.segment_tumour(nodes, segmenter=segmenter, device="cpu", wait_for_completion=False,
                                  event_callback=cancel_on_progress)
    assert handle.wait(timeout=120) == CANCELLED
    assert handle.exit_code == 130  # the worker stopped by itself, between windows
    assert scene.GetNumberOfNodes() == nodes_before and handle.output_node is None
    assert not os.path.exists(handle.job_dir)


def test_monai_auto3dseg_is_preferred_when_installed(scene, logic, segmenter, monkeypatch):
    module, calls = fake_monai_module(process_with_events=True)
    monkeypatch.setitem(sys.modules, "MONAIAuto3DSeg", module)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(monaiauto3dseg=object()), raising=False)
    nodes, _, _ = study_case(scene, shape_kji=(8, 8, 8))
    finished = []

    handle = logic.segment_tumour(nodes, segmenter=segmenter, device="cpu", finished_callback=finished.append)

    assert handle.state == DONE and handle.backend == "MONAIAuto3DSeg" and finished == [handle]
    seg = handle.output_node
    inputs, output, model, cpu, wait, _ = calls[-1]
    assert output is seg and (model, cpu, wait) == ("brats-gli-v1.0.0", True, True)
    assert [n.GetName() for n in inputs] == ["case t2f", "case t1c", "case t1n", "case t2w"]
    assert seg.GetAttribute("ScoreFusion.segmentationBackend") == "MONAIAuto3DSeg"
    assert seg.GetAttribute("ScoreFusion.synthesizedInputs") == "t2f"
    assert list(Path(logic.job_root).iterdir()) == []  # no worker job
    count = segmentation_count(scene)

    def failing_process(self, *args, **kwargs):
        raise RuntimeError("MONAIAuto3DSeg failed")

    monkeypatch.setattr(module.MONAIAuto3DSegLogic, "process", failing_process)
    with pytest.raises(RuntimeError, match="MONAIAuto3DSeg failed"):
        logic.segment_tumour(nodes, segmenter=segmenter)
    assert segmentation_count(scene) == count  # the empty segmentation was removed again
