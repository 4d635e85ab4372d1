"""The MRML adapter (scene_io, segmentation, layout) against the real vtkMRMLScene of PyPI ``slicer-core``.

Off CI, a missing ``slicer-core`` skips this module; under ``CI=true`` it must be installed and the
import fails loudly. What only the Slicer application can do (layout manager, MONAIAuto3DSeg) is
checked for its clear refusal here.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

# Under CI the MRML tests must run, so a missing slicer-core is an import error there, not a skip.
if os.environ.get("CI") == "true":
    import slicer_core  # noqa: F401
else:
    pytest.importorskip("slicer_core", reason="PyPI slicer-core (MRML without Qt) is not installed")

import slicer  # noqa: E402
import slicer.util  # noqa: E402

from ScoreFusionLib.geometry import super_resolution_grid  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ScoreFusionSlicer"))

from ScoreFusionSlicerLib import layout, scene_io, segmentation  # noqa: E402
from ScoreFusionSlicerLib.scene_io import GridMismatchError, VolumeNodeError  # noqa: E402

SHAPE_KJI = (4, 5, 6)


@pytest.fixture
def scene(monkeypatch):
    """A fresh scene as ``slicer.mrmlScene`` (slicer.util and scene_io create nodes there)."""
    fresh = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", fresh, raising=False)
    return fresh


def add_volume(array, matrix, name="input"):
    return slicer.util.addVolumeFromArray(np.asarray(array), ijkToRAS=matrix, name=name)


def node_state(node):
    """Copies of everything an input must keep: voxels, local matrix, parent transform."""
    return slicer.util.arrayFromVolume(node).copy(), scene_io.ijk_to_ras(node), node.GetTransformNodeID()


def assert_unchanged(node, state):
    voxels, matrix, transform_id = state
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), voxels)
    np.testing.assert_array_equal(scene_io.ijk_to_ras(node), matrix)
    assert node.GetTransformNodeID() == transform_id


def study_with_input(scene, rng, matrix, shape=SHAPE_KJI):
    """An input volume under a patient/study, observing a translation-and-rotation transform."""
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    node = add_volume(rng.normal(100.0, 20.0, size=shape).astype(np.float32), matrix)
    sh.CreateItem(study, node)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    to_parent = np.eye(4)
    to_parent[:3, :3] = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    to_parent[:3, 3] = (5.0, -7.0, 11.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    node.SetAndObserveTransformNodeID(transform.GetID())
    return node, study, transform


def assert_same_matrix(got, expected):
    """Exact for permuted/flipped matrices; oblique ones to 1e-12 mm, as MRML stores spacing, origin and
    unit directions separately and re-multiplies them (one rounding step)."""
    exact = np.count_nonzero(expected[:3, :3]) == 3
    np.testing.assert_allclose(got, expected, rtol=0.0, atol=0.0 if exact else 1e-12)


def voxel_corners_ras(node):
    """RAS positions of the 8 outer corners of the voxel box (cell-centred: indices -0.5 and n-0.5)."""
    dims = np.array(node.GetImageData().GetDimensions())
    corners = np.array([[c[a] * dims[a] - 0.5 for a in range(3)] for c in np.ndindex(2, 2, 2)])
    matrix = scene_io.ijk_to_ras(node)
    return np.sort(corners @ matrix[:3, :3].T + matrix[:3, 3], axis=0)


# --- scene_io: reading inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.float64])
@pytest.mark.parametrize("oblique_deg", [0.0, 25.0], ids=["permuted", "oblique"])
def test_node_to_array_round_trips_voxels_and_matrices(scene, make_affine, rng, dtype, oblique_deg):
    for _ in range(4):
        matrix = make_affine(max_oblique_deg=oblique_deg)
        voxels = (rng.normal(size=SHAPE_KJI) * 1000).astype(dtype)
        node = add_volume(voxels, matrix)
        assert node.GetImageData().GetDimensions() == (6, 5, 4)
        before = node_state(node)

        array, got_matrix = scene_io.node_to_array(node)

        assert array.dtype == np.float32 and array.shape == SHAPE_KJI
        np.testing.assert_array_equal(array, voxels.astype(np.float32))
        assert got_matrix.dtype == np.float64
        assert_same_matrix(got_matrix, matrix)
        array[...] = -1.0  # a copy: the node must not follow
        assert_unchanged(node, before)


def test_node_to_array_reads_the_local_frame_under_a_parent_transform(scene, make_affine, rng):
    matrix = make_affine()
    node, _, transform = study_with_input(scene, rng, matrix)

    _, got = scene_io.node_to_array(node)

    assert_same_matrix(got, matrix)
    assert node.GetTransformNodeID() == transform.GetID()


def test_node_to_array_refuses_nodes_it_cannot_use(scene):
    matrix = np.diag([1.0, 1.0, 2.0, 1.0])
    with pytest.raises(VolumeNodeError, match="no volume selected"):
        scene_io.node_to_array(None)
    labels = slicer.util.addVolumeFromArray(np.zeros(SHAPE_KJI, np.uint8), ijkToRAS=matrix, name="seg",
                                            nodeClassName="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(VolumeNodeError, match="'seg'.*label map"):
        scene_io.node_to_array(labels)
    vector = slicer.util.addVolumeFromArray(np.zeros((*SHAPE_KJI, 3), np.float32), ijkToRAS=matrix, name="rgb",
                                            nodeClassName="vtkMRMLVectorVolumeNode")
    with pytest.raises(VolumeNodeError, match="'rgb'.*vector"):
        scene_io.node_to_array(vector)
    with pytest.raises(VolumeNodeError, match="'empty'.*no voxels"):
        scene_io.node_to_array(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))
    with pytest.raises(VolumeNodeError, match=r"'slice'.*6x5x1 voxels.*at least 2"):
        scene_io.node_to_array(add_volume(np.zeros((1, 5, 6), np.float32), matrix, "slice"))
    for bad, count in ((np.nan, "1 NaN and 0 infinite"), (np.inf, "0 NaN and 1 infinite")):
        voxels = np.zeros(SHAPE_KJI, np.float32)
        voxels[2, 3, 4] = bad
        node = add_volume(voxels, matrix, "broken")
        with pytest.raises(VolumeNodeError, match=f"'broken'.*{count}"):
            scene_io.node_to_array(node)
        assert not np.isfinite(slicer.util.arrayFromVolume(node)[2, 3, 4])  # refused, not repaired


# --- scene_io: same grid --------------------------------------------------------------------------------


def test_check_same_grid_accepts_float_noise_and_names_each_kind_of_difference(scene, make_affine, rng):
    matrix = make_affine(max_oblique_deg=10.0)
    voxels = rng.normal(size=SHAPE_KJI).astype(np.float32)
    t1 = add_volume(voxels, matrix, "T1")
    noisy = add_volume(voxels, matrix + np.pad(rng.uniform(-1e-6, 1e-6, (3, 4)), ((0, 1), (0, 0))), "T2")
    scene_io.check_same_grid([t1, noisy])
    scene_io.check_same_grid([t1])
    scene_io.check_same_grid([])

    spacing = matrix.copy()
    spacing[:3, 2] *= 1.5
    turned = matrix.copy()
    angle = np.radians(5.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    turned[:3, :3] = rotation @ matrix[:3, :3]
    shifted = matrix.copy()
    shifted[:3, 3] += (0.0, 0.5, 0.0)
    cases = {
        "shape": add_volume(np.zeros((4, 5, 7), np.float32), matrix, "other"),
        "spacing": add_volume(voxels, spacing, "other"),
        "direction": add_volume(voxels, turned, "other"),
        "origin": add_volume(voxels, shifted, "other"),
    }
    for kind, other in cases.items():
        with pytest.raises(GridMismatchError) as info:
            scene_io.check_same_grid([t1, other])
        message = str(info.value)
        assert "'T1'" in message and "'other'" in message and "Resample" in message
        assert kind in message
        for unrelated in {"shape", "spacing", "direction", "origin"} - {kind}:
            assert unrelated not in message, f"{kind}: {message}"

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    same_grid = add_volume(voxels, matrix, "other")
    same_grid.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(GridMismatchError, match=r"parent transform none vs 'moved'.*same transform"):
        scene_io.check_same_grid([t1, same_grid])

    labels = slicer.util.addVolumeFromArray(np.zeros(SHAPE_KJI, np.uint8), ijkToRAS=matrix,
                                            nodeClassName="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(VolumeNodeError, match="label map"):
        scene_io.check_same_grid([t1, labels])


# --- scene_io: writing outputs ---------------------------------------------------------------------------


def test_add_output_volume_places_a_new_node_like_the_input_and_leaves_the_input_alone(scene, make_affine, rng):
    matrix = make_affine()
    node, study, transform = study_with_input(scene, rng, matrix)
    before = node_state(node)
    result = rng.gamma(2.0, 50.0, size=SHAPE_KJI)  # float64: stored as float32
    attributes = {"ScoreFusion.modelId": "t1-to-flair", "ScoreFusion.steps": "20"}

    out = scene_io.add_output_volume(result, matrix, "input synth FLAIR", node, attributes)

    assert_unchanged(node, before)
    assert out.GetID() != node.GetID() and out.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert out.GetName() == "input synth FLAIR"
    array, got_matrix = scene_io.node_to_array(out)
    np.testing.assert_array_equal(array, result.astype(np.float32))
    assert_same_matrix(got_matrix, matrix)
    assert out.GetTransformNodeID() == transform.GetID()
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(out)) == study == sh.GetItemParent(sh.GetItemByDataNode(node))
    assert {k: out.GetAttribute(k) for k in attributes} == attributes
    assert out.GetDescription() == "AI-generated image, not for diagnosis"
    display = out.GetDisplayNode()
    low, high = np.percentile(result.astype(np.float32), [0.5, 99.5])
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(low, rel=1e-5)
    assert display.GetWindowLevelMax() == pytest.approx(high, rel=1e-5)


def test_super_resolved_output_keeps_the_outer_box_of_the_input(scene, make_affine, rng):
    for factors in ((1, 1, 3), (2, 2, 2), (3, 1, 2)):
        matrix = make_affine()
        node = add_volume(rng.normal(size=SHAPE_KJI).astype(np.float32), matrix)
        before = node_state(node)
        shape_ijk, sr_matrix = super_resolution_grid(SHAPE_KJI[::-1], matrix, factors)

        out = scene_io.add_output_volume(np.ones(shape_ijk[::-1], np.float32), sr_matrix, "SR", node)

        assert out.GetImageData().GetDimensions() == tuple(shape_ijk)
        assert_same_matrix(scene_io.ijk_to_ras(out), sr_matrix)
        np.testing.assert_allclose(voxel_corners_ras(out), voxel_corners_ras(node), atol=1e-9)
        bounds_in, bounds_out = np.zeros(6), np.zeros(6)
        node.GetRASBounds(bounds_in)
        out.GetRASBounds(bounds_out)
        np.testing.assert_allclose(bounds_out, bounds_in, atol=1e-6)
        assert_unchanged(node, before)


def test_add_output_volume_validates_everything_before_touching_the_scene(scene):
    matrix = np.diag([1.0, 1.0, 3.0, 1.0])
    node = add_volume(np.ones(SHAPE_KJI, np.float32), matrix)
    count = scene.GetNumberOfNodes()
    nan = np.ones(SHAPE_KJI)
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        scene_io.add_output_volume(nan, matrix, "out", node)
    with pytest.raises(ValueError, match="not invertible"):
        scene_io.add_output_volume(np.ones(SHAPE_KJI), np.diag([1.0, 0.0, 1.0, 1.0]), "out", node)
    with pytest.raises(ValueError, match="3D"):
        scene_io.add_output_volume(np.ones((5, 6)), matrix, "out", node)
    with pytest.raises(TypeError, match="string values"):
        scene_io.add_output_volume(np.ones(SHAPE_KJI), matrix, "out", node, {"ScoreFusion.steps": 20})
    with pytest.raises(VolumeNodeError, match="no volume selected"):
        scene_io.add_output_volume(np.ones(SHAPE_KJI), matrix, "out", None)
    assert scene.GetNumberOfNodes() == count


def test_update_output_volume_rewrites_a_chosen_node_and_never_the_input(scene, make_affine, rng):
    matrix = make_affine()
    node, study, transform = study_with_input(scene, rng, matrix)
    before = node_state(node)
    target = add_volume(np.zeros((2, 2, 2), np.float32), np.diag([9.0, 9.0, 9.0, 1.0]), "previous result")
    target.SetAttribute("ScoreFusion.modelId", "old-model")
    target.SetAttribute("ScoreFusion.seed", "7")
    target.SetAttribute("user.note", "kept")
    shape_ijk, sr_matrix = super_resolution_grid(SHAPE_KJI[::-1], matrix, (1, 1, 2))
    result = rng.normal(size=shape_ijk[::-1]).astype(np.float32)

    same = scene_io.update_output_volume(target, result, sr_matrix, node, {"ScoreFusion.modelId": "t1-sr4-iso"})

    assert same is target
    array, got_matrix = scene_io.node_to_array(target)
    np.testing.assert_array_equal(array, result)
    assert_same_matrix(got_matrix, sr_matrix)
    assert target.GetAttribute("ScoreFusion.modelId") == "t1-sr4-iso"
    assert target.GetAttribute("ScoreFusion.seed") is None  # stale provenance removed
    assert target.GetAttribute("user.note") == "kept"
    assert target.GetDescription() == "AI-generated image, not for diagnosis"
    assert target.GetTransformNodeID() == transform.GetID()
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(target)) == study
    assert_unchanged(node, before)

    with pytest.raises(VolumeNodeError, match="is the input volume"):
        scene_io.update_output_volume(node, result, sr_matrix, node)
    labels = slicer.util.addVolumeFromArray(np.zeros(SHAPE_KJI, np.uint8), ijkToRAS=matrix,
                                            nodeClassName="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(VolumeNodeError, match="vtkMRMLLabelMapVolumeNode"):
        scene_io.update_output_volume(labels, result, sr_matrix, node)
    assert_unchanged(node, before)


def test_uncertainty_volume_is_a_heat_map_with_its_role(scene, make_affine, rng):
    matrix = make_affine()
    node = add_volume(rng.normal(size=SHAPE_KJI).astype(np.float32), matrix)
    spread = rng.uniform(0.0, 3.0, size=SHAPE_KJI)

    first = scene_io.add_uncertainty_volume(spread, matrix, "input synth FLAIR uncertainty", node)
    second = scene_io.add_uncertainty_volume(spread, matrix, "again", node)

    assert first.GetName() == "input synth FLAIR uncertainty"
    assert first.GetAttribute("ScoreFusion.role") == "uncertainty"
    assert "not for diagnosis" in first.GetDescription()
    color_id = first.GetDisplayNode().GetColorNodeID()
    table = scene.GetNodeByID(color_id)  # bare slicer-core scene: no colour nodes, so ScoreFusion's own table
    assert table is not None and table.IsA("vtkMRMLColorTableNode") and table.GetNumberOfColors() == 256
    rgba = [0.0] * 4
    table.GetColor(0, rgba)
    assert rgba[:3] == [0.0, 0.0, 0.0]
    table.GetColor(255, rgba)
    assert rgba[:3] == [1.0, 1.0, 1.0]
    assert second.GetDisplayNode().GetColorNodeID() == color_id
    assert len(slicer.util.getNodesByClass("vtkMRMLColorTableNode", scene)) == 1


def test_uncertainty_volume_prefers_a_built_in_heat_map(scene):
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)  # adds the default colour nodes, as the application does
    node = add_volume(np.ones(SHAPE_KJI, np.float32), np.eye(4))

    overlay = scene_io.add_uncertainty_volume(np.zeros(SHAPE_KJI), np.eye(4), "u", node)

    assert overlay.GetDisplayNode().GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    display = overlay.GetDisplayNode()  # a constant map still gets a usable window
    assert display.GetWindowLevelMax() > display.GetWindowLevelMin()
    colors.SetMRMLScene(None)


def test_remove_nodes_rolls_back_to_the_original_scene(scene, make_affine, rng):
    matrix = make_affine()
    node, _, _ = study_with_input(scene, rng, matrix)
    sh = scene.GetSubjectHierarchyNode()
    nodes_before, items_before = scene.GetNumberOfNodes(), sh.GetNumberOfItems()
    scene_io.heat_color_node_id(scene)  # the shared colour table is not part of a run's rollback
    nodes_before += 1
    out = scene_io.add_output_volume(np.ones(SHAPE_KJI), matrix, "out", node)
    out.AddDefaultStorageNode()
    overlay = scene_io.add_uncertainty_volume(np.ones(SHAPE_KJI), matrix, "out uncertainty", node)
    labels = np.zeros(SHAPE_KJI, np.uint8)
    labels[1:3, 1:3, 1:4] = 2
    seg = segmentation.import_labelmap(labels, matrix, out, "segments")
    assert scene.GetNumberOfNodes() > nodes_before

    scene_io.remove_nodes([seg, overlay, None, out])
    scene_io.remove_nodes([out])  # repeating a rollback is harmless

    assert scene.GetNumberOfNodes() == nodes_before
    assert sh.GetNumberOfItems() == items_before
    assert scene.IsNodePresent(node)


# --- segmentation -----------------------------------------------------------------------------------------


def exported_labels(seg, reference):
    """The segmentation exported back to a label map on the reference grid, with the original label values.

    The export adds a colour table to the scene, so count nodes before calling this."""
    out = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
        seg, out, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    np.testing.assert_array_equal(scene_io.ijk_to_ras(out), scene_io.ijk_to_ras(reference))
    exported = slicer.util.arrayFromVolume(out)
    segments = seg.GetSegmentation()
    restored = np.zeros_like(exported, dtype=np.int64)
    for index in range(segments.GetNumberOfSegments()):  # export numbers segments 1..N in segment order
        restored[exported == index + 1] = segments.GetNthSegment(index).GetLabelValue()
    scene_io.remove_nodes([out])
    return restored


@pytest.mark.parametrize("values", [(1, 2, 4), (1, 2, 3)], ids=["brats2021", "brats2023"])
def test_import_labelmap_round_trips_brats_labels(scene, make_affine, rng, values):
    matrix = make_affine()
    reference, study, transform = study_with_input(scene, rng, matrix, shape=(8, 9, 10))
    labels = rng.choice((0, *values), size=(8, 9, 10), p=(0.55, 0.15, 0.15, 0.15)).astype(np.int64)
    nodes_before = scene.GetNumberOfNodes()

    seg = segmentation.import_labelmap(labels, matrix, reference, "tumour",
                                       attributes={"ScoreFusion.synthesizedInputs": "t2f"})

    assert not slicer.util.getNodesByClass("vtkMRMLLabelMapVolumeNode", scene)  # the temporary map is gone
    assert scene.GetNumberOfNodes() == nodes_before + 2  # the segmentation and its display node
    np.testing.assert_array_equal(exported_labels(seg, reference), labels)
    segments = seg.GetSegmentation()
    names = {segments.GetNthSegment(i).GetLabelValue(): segments.GetNthSegment(i).GetName()
             for i in range(segments.GetNumberOfSegments())}
    assert names == {values[0]: "Necrotic tumour core", values[1]: "Peritumoural oedema",
                     values[2]: "Enhancing tumour"}
    colors = {segments.GetNthSegment(i).GetName(): segments.GetNthSegment(i).GetColor()
              for i in range(segments.GetNumberOfSegments())}
    assert colors["Enhancing tumour"] == pytest.approx(segmentation.BRATS_LABELS[values[2]][1])
    assert colors["Peritumoural oedema"] == pytest.approx(segmentation.BRATS_LABELS[2][1])
    assert seg.GetName() == "tumour"
    assert seg.GetAttribute("ScoreFusion.synthesizedInputs") == "t2f"
    assert seg.GetTransformNodeID() == transform.GetID()
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study


def test_import_labelmap_names_segments_by_value_with_custom_names(scene):
    matrix = np.diag([2.0, 2.0, 2.0, 1.0])
    reference = add_volume(np.zeros(SHAPE_KJI, np.float32), matrix)
    labels = np.zeros(SHAPE_KJI, np.uint16)
    labels[0, :2] = 300
    labels[3, 4] = 7
    labels[2, 2, 2] = 1

    seg = segmentation.import_labelmap(labels, matrix, reference, "custom", label_names={7: "lesion", 1: "brain"})

    segments = seg.GetSegmentation()
    names = {segments.GetNthSegment(i).GetLabelValue(): segments.GetNthSegment(i).GetName()
             for i in range(segments.GetNumberOfSegments())}
    assert names == {1: "brain", 7: "lesion", 300: "Label 300"}
    np.testing.assert_array_equal(exported_labels(seg, reference), labels)


def test_import_labelmap_refuses_bad_label_maps(scene):
    matrix = np.diag([1.0, 1.0, 2.0, 1.0])
    reference = add_volume(np.zeros(SHAPE_KJI, np.float32), matrix, "T1")
    count = scene.GetNumberOfNodes()
    good = np.zeros(SHAPE_KJI, np.uint8)
    with pytest.raises(ValueError, match="integers"):
        segmentation.import_labelmap(good.astype(np.float32), matrix, reference, "s")
    with pytest.raises(ValueError, match="negative"):
        segmentation.import_labelmap(good.astype(np.int8) - 1, matrix, reference, "s")
    with pytest.raises(ValueError, match="at most 65535"):
        segmentation.import_labelmap(good.astype(np.int32) + 70000, matrix, reference, "s")
    with pytest.raises(GridMismatchError, match=r"'T1'.*shape \(6, 5, 4\) vs \(5, 5, 3\)"):
        segmentation.import_labelmap(np.zeros((3, 5, 5), np.uint8), matrix, reference, "s")
    with pytest.raises(GridMismatchError, match="spacing"):
        segmentation.import_labelmap(good, np.diag([1.0, 1.0, 3.0, 1.0]), reference, "s")
    with pytest.raises(ValueError, match="3D"):
        segmentation.import_labelmap(good[0], matrix, reference, "s")
    assert scene.GetNumberOfNodes() == count


def test_monai_auto3dseg_is_not_available_without_the_application(scene):
    assert segmentation.monai_auto3dseg_available() is False
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(RuntimeError, match="MONAIAuto3DSeg extension is not installed"):
        segmentation.run_monai_auto3dseg({}, seg)


BRATS_GLI_INPUTS = [  # as in MONAIAuto3DSeg's Resources/Models.json for brats-gli-v1.0.0
    {"title": "Input T2F volume", "namePattern": "*t2f*"},
    {"title": "Input T1C volume", "namePattern": "*t1c*"},
    {"title": "Input T1N volume", "namePattern": "*t1n*"},
    {"title": "Input T2W volume", "namePattern": "*t2w*"},
]


def fake_monai_module(process_with_events):
    """A stand-in ``MONAIAuto3DSeg`` module whose logic has the real ``process`` signature (old or recent)."""
    calls = []

    class Logic:
        def model(self, model_id):
            return {"id": model_id, "inputs": BRATS_GLI_INPUTS}

        if process_with_events:
            def process(self, inputNodes, outputSegmentation, model=None, cpu=False, waitForCompletion=True,
                        modelType="SegResNet", sequenceBrowserNode=None, eventCallback=None,
                        customEventCallbackData=None):
                calls.append((inputNodes, outputSegmentation, model, cpu, waitForCompletion, eventCallback))
                return "task"
        else:
            def process(self, inputNodes, outputSegmentation, model=None, cpu=False, waitForCompletion=True,
                        customData=None):
                calls.append((inputNodes, outputSegmentation, model, cpu, waitForCompletion, None))
                return "task"

    return types.SimpleNamespace(MONAIAuto3DSegLogic=Logic), calls


@pytest.mark.parametrize("process_with_events", [True, False], ids=["recent", "old"])
def test_run_monai_auto3dseg_passes_the_inputs_in_the_models_order(scene, monkeypatch, process_with_events):
    module, calls = fake_monai_module(process_with_events)
    monkeypatch.setitem(sys.modules, "MONAIAuto3DSeg", module)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(monaiauto3dseg=object()), raising=False)
    nodes = {name: add_volume(np.ones(SHAPE_KJI, np.float32), np.eye(4), name)
             for name in ("t1", "t1ce", "t2", "flair")}
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert segmentation.monai_auto3dseg_available()

    logic, task = segmentation.run_monai_auto3dseg(nodes, seg, cpu=True, wait=False)

    assert isinstance(logic, module.MONAIAuto3DSegLogic) and task == "task"
    inputs, output, model, cpu, wait, _ = calls[-1]
    assert [n.GetName() for n in inputs] == ["flair", "t1ce", "t1", "t2"]  # t2f, t1c, t1n, t2w
    assert (output, model, cpu, wait) == (seg, "brats-gli-v1.0.0", True, False)

    def on_event(code, task_info):
        return None

    if process_with_events:
        segmentation.run_monai_auto3dseg(nodes, seg, event_callback=on_event)
        assert calls[-1][-1] is on_event
    else:
        with pytest.raises(RuntimeError, match="reports no progress events"):
            segmentation.run_monai_auto3dseg(nodes, seg, event_callback=on_event)
    with pytest.raises(ValueError, match="needs volumes for t2w"):
        segmentation.run_monai_auto3dseg({k: v for k, v in nodes.items() if k != "t2"}, seg)
    with pytest.raises(ValueError, match="segmentation node"):
        segmentation.run_monai_auto3dseg(nodes, nodes["t1"])


def test_brats_input_order_follows_the_model_declaration():
    assert segmentation.brats_input_order(BRATS_GLI_INPUTS) == ["t2f", "t1c", "t1n", "t2w"]
    assert segmentation.brats_input_order([{"name": "t2w"}, {"title": "T1N"}, "t1c", {"name": "T2F"}]) == [
        "t2w", "t1n", "t1c", "t2f"]
    with pytest.raises(ValueError, match="CT.*not one of the BraTS contrasts"):
        segmentation.brats_input_order([{"title": "Input volume", "namePattern": "*CT*"}])
    with pytest.raises(ValueError, match="t1c more than once"):
        segmentation.brats_input_order([{"name": "t1c"}, {"title": "Input T1C volume"}])


# --- layout -----------------------------------------------------------------------------------------------


def test_assign_side_by_side_sets_each_view_then_links_them(scene):
    inp, out, spread, stale = (add_volume(np.ones(SHAPE_KJI, np.float32), np.eye(4), name)
                               for name in ("input", "output", "spread", "stale"))
    red = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    yellow = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    for view in (red, yellow):
        view.SetForegroundVolumeID(stale.GetID())
        view.SetLinkedControl(True)

    layout.assign_side_by_side([red, yellow], inp.GetID(), out.GetID(), foreground_id=spread.GetID(),
                               foreground_opacity=0.5)

    assert (red.GetBackgroundVolumeID(), red.GetForegroundVolumeID()) == (inp.GetID(), None)
    assert (yellow.GetBackgroundVolumeID(), yellow.GetForegroundVolumeID()) == (out.GetID(), spread.GetID())
    assert yellow.GetForegroundOpacity() == 0.5
    assert all(view.GetLinkedControl() and view.GetHotLinkedControl() for view in (red, yellow))

    layout.assign_side_by_side([red, yellow], inp.GetID(), out.GetID(), link=False, foreground_opacity=0.7)

    assert yellow.GetBackgroundVolumeID() == out.GetID() and red.GetBackgroundVolumeID() == inp.GetID()
    assert yellow.GetForegroundVolumeID() is None and yellow.GetForegroundOpacity() == 0.0
    assert not any(view.GetLinkedControl() or view.GetHotLinkedControl() for view in (red, yellow))
    with pytest.raises(ValueError, match="exactly two"):
        layout.assign_side_by_side([red], inp.GetID(), out.GetID())
    with pytest.raises(ValueError, match="both an input and an output"):
        layout.assign_side_by_side([red, yellow], inp.GetID(), None)


def test_show_side_by_side_needs_the_application(scene):
    node = add_volume(np.ones(SHAPE_KJI, np.float32), np.eye(4))
    with pytest.raises(RuntimeError, match="needs the Slicer application"):
        layout.show_side_by_side(node, node)

