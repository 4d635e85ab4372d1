"""Volume nodes <-> ``(array, IJK->RAS)`` pairs: the only place where ScoreFusion touches the MRML scene's voxels.

The worker never sees a node. It gets a float32 copy of the voxels in (k, j, i) order and the node's
4x4 IJK->RAS matrix in its *local* frame; a non-hardened parent transform stays in the scene, and
the output simply observes the same transform, so it sits exactly where the input does. Outputs are
always new nodes (or a node the user chose), created with ``addVolumeFromArray(..., ijkToRAS=M)``
and never with ``CopyOrientation``, which would copy the input's spacing onto a super-resolved grid.
Input nodes are never modified.

File-scope imports are numpy, vtk and slicer only; ``ScoreFusionLib`` (matrix and array
validation) is imported inside functions, as everywhere in ``ScoreFusionSlicerLib``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import slicer
import vtk

#: Description of every output volume: the scene file keeps it next to the data.
DISCLAIMER = "AI-generated image, not for diagnosis"
UNCERTAINTY_DESCRIPTION = "Uncertainty of an AI-generated image, not for diagnosis"
#: Prefix of the provenance attributes this module owns (stale ones are removed on update).
ATTRIBUTE_PREFIX = "ScoreFusion."
#: Display range of a new output: robust percentiles, so a few hot voxels do not wash the image out.
WINDOW_PERCENTILES = (0.5, 99.5)
#: Heat-map colour nodes, best first: Slicer's colour files (application only), then the procedural
#: PET heat map that ``vtkMRMLColorLogic`` adds to every scene; else our own table is created.
HEAT_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLPETProceduralColorNodePET-Heat",
)
HEAT_COLOR_SINGLETON_TAG = "ScoreFusionUncertainty"
_RESAMPLE_HINT = (
    "resample one onto the other first (e.g. with 'Resample Scalar/Vector/DWI Volume' or "
    "'Resample Image (BRAINS)'); ScoreFusion never resamples silently"
)
_REFUSED_VOLUME_CLASSES = {
    "vtkMRMLLabelMapVolumeNode": "a label map; choose an intensity image",
    "vtkMRMLVectorVolumeNode": "a vector (e.g. colour) volume; extract one scalar component first",
    "vtkMRMLDiffusionWeightedVolumeNode": "a diffusion-weighted volume; extract one scalar volume first",
    "vtkMRMLDiffusionTensorVolumeNode": "a diffusion tensor volume; compute a scalar map (e.g. FA) first",
    "vtkMRMLMultiVolumeNode": "a multi-volume; extract one frame first",
}


class GridMismatchError(ValueError):
    """Volumes that must share one voxel grid (and parent transform) do not."""


class VolumeNodeError(ValueError):
    """A node that cannot be read as, or written to as, a scalar volume."""


def describe(node: Any) -> str:
    """``'T1' (vtkMRMLScalarVolumeNode1)``: how error messages name a node."""
    return f"'{node.GetName()}' ({node.GetID()})"


def require_scalar_volume(node: Any) -> vtk.vtkImageData:
    """The image data of a usable 3D scalar volume node, or :class:`VolumeNodeError` saying why not.

    Label maps, vector, tensor and diffusion volumes are refused by class, and volumes thinner than
    two voxels along any axis because neither a 3D prior nor super-resolution has anything to work on.
    """
    if node is None:
        raise VolumeNodeError("no volume selected")
    class_name = node.GetClassName()
    if class_name in _REFUSED_VOLUME_CLASSES:
        raise VolumeNodeError(f"{describe(node)} is {_REFUSED_VOLUME_CLASSES[class_name]}")
    if class_name != "vtkMRMLScalarVolumeNode":
        raise VolumeNodeError(f"{describe(node)} is a {class_name}, not a scalar volume")
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise VolumeNodeError(f"{describe(node)} has no voxels (empty volume)")
    dims = tuple(image.GetDimensions())
    if min(dims) < 2:
        raise VolumeNodeError(
            f"{describe(node)} has {dims[0]}x{dims[1]}x{dims[2]} voxels (i, j, k); ScoreFusion needs a 3D volume "
            "with at least 2 voxels along every axis"
        )
    if image.GetNumberOfScalarComponents() != 1:
        raise VolumeNodeError(
            f"{describe(node)} has {image.GetNumberOfScalarComponents()} components per voxel; a scalar volume has one"
        )
    return image


def ijk_to_ras(node: Any) -> np.ndarray:
    """The node's 4x4 IJK->RAS matrix (float64) in its local frame, without any parent transform."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix).astype(np.float64)


def node_to_array(node: Any) -> tuple[np.ndarray, np.ndarray]:
    """A float32 copy of the voxels in (k, j, i) order and the local IJK->RAS matrix of ``node``.

    The copy is what the worker may change freely: the node itself is never modified. NaN or
    infinite voxels are refused here, where the node can still be named, rather than deep in a model.
    """
    from ScoreFusionLib.errors import InputError
    from ScoreFusionLib.volume import require_finite_real

    require_scalar_volume(node)
    array = np.array(slicer.util.arrayFromVolume(node), dtype=np.float32, copy=True)
    try:
        require_finite_real(array, f"volume {describe(node)}")
    except InputError as exc:
        raise VolumeNodeError(f"{exc} (values beyond the float32 range count as infinite)") from exc
    return array, ijk_to_ras(node)


def grid_differences(
    shape_ijk_a: Sequence[int], matrix_a: np.ndarray, shape_ijk_b: Sequence[int], matrix_b: np.ndarray,
    atol_mm: float = 1e-3,
) -> list[str]:
    """What differs between two voxel grids: shape, spacing, direction, origin (empty when they match).

    The grids match when the shapes are equal and no matrix entry differs by more than ``atol_mm``;
    the differing parts are then named, so the user knows what to fix.
    """
    if tuple(shape_ijk_a) != tuple(shape_ijk_b):
        return [f"shape {tuple(shape_ijk_a)} vs {tuple(shape_ijk_b)} voxels (i, j, k)"]
    a, b = np.asarray(matrix_a, dtype=np.float64), np.asarray(matrix_b, dtype=np.float64)
    max_diff = float(np.max(np.abs(a - b)))
    if max_diff <= atol_mm:
        return []
    spacing_a, spacing_b = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    direction_a, direction_b = a[:3, :3] / spacing_a, b[:3, :3] / spacing_b
    parts = []
    if np.max(np.abs(spacing_a - spacing_b)) > atol_mm:
        parts.append(f"spacing {_fmt(spacing_a)} vs {_fmt(spacing_b)} mm")
    if np.max(np.abs((direction_a - direction_b) * spacing_a)) > atol_mm:
        cosines = np.clip(np.sum(direction_a * direction_b, axis=0), -1.0, 1.0)
        parts.append(f"direction (axes turned by up to {np.degrees(np.max(np.arccos(cosines))):.3g} degrees)")
    if np.max(np.abs(a[:3, 3] - b[:3, 3])) > atol_mm:
        parts.append(f"origin {_fmt(a[:3, 3])} vs {_fmt(b[:3, 3])} mm")
    parts.append(f"IJK->RAS entries differ by up to {max_diff:.4g} mm (tolerance {atol_mm:g} mm)")
    return parts


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def check_same_grid(nodes: Sequence[Any], atol_mm: float = 1e-3) -> None:
    """Raise :class:`GridMismatchError` unless every node shares the first one's grid and parent transform.

    Synthesis combines inputs voxel by voxel, so they must be on one grid; the message names the two
    nodes and what differs, and asks for an explicit resampling instead of doing one silently.
    """
    if not nodes:
        return
    reference, *others = nodes
    ref_shape, ref_matrix = tuple(require_scalar_volume(reference).GetDimensions()), ijk_to_ras(reference)
    for node in others:
        diffs = grid_differences(ref_shape, ref_matrix, require_scalar_volume(node).GetDimensions(), ijk_to_ras(node),
                                 atol_mm)
        hint = _RESAMPLE_HINT
        if reference.GetTransformNodeID() != node.GetTransformNodeID():
            diffs.insert(0, f"parent transform {_transform_name(reference)} vs {_transform_name(node)}")
            hint = "place both under the same transform (or harden it), or " + hint
        if diffs:
            raise GridMismatchError(
                f"{describe(reference)} and {describe(node)} are not on the same voxel grid: "
                f"{'; '.join(diffs)}. To fix it, {hint}."
            )


def _transform_name(node: Any) -> str:
    transform = node.GetParentTransformNode()
    return "none" if transform is None else describe(transform)


def _valid_output(array_kji: Any, matrix: Any, attributes: Mapping[str, str] | None) -> tuple[np.ndarray, np.ndarray]:
    """A float32 (k, j, i) array and float64 matrix, checked before any node is created or changed."""
    from ScoreFusionLib.volume import Volume, require_finite_real

    volume = Volume(require_finite_real(array_kji, "output volume"), matrix)
    validate_attributes(attributes)
    return np.ascontiguousarray(volume.array, dtype=np.float32), np.array(volume.affine)


def validate_attributes(attributes: Mapping[str, str] | None) -> None:
    """Raise ``TypeError`` unless every attribute name and value is a string (MRML stores strings only)."""
    for key, value in (attributes or {}).items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise TypeError(f"node attributes must be non-empty names with string values, got {key!r}: {value!r}")


def adopt_reference_placement(node: Any, reference_node: Any, attributes: Mapping[str, str] | None = None) -> None:
    """Give ``node`` the reference's parent transform and subject-hierarchy parent (its study), then ``attributes``.

    Stale ``ScoreFusion.*`` attributes that ``attributes`` does not set again are removed, so a node
    rewritten by another model never keeps the previous model's provenance.
    """
    node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    reference_item = sh.GetItemByDataNode(reference_node)
    parent = sh.GetItemParent(reference_item) if reference_item else sh.GetSceneItemID()
    item = sh.GetItemByDataNode(node)
    if item:  # the application's subject-hierarchy plugins create items for new nodes; slicer-core does not
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)
    attributes = dict(attributes or {})
    for name in node.GetAttributeNames():
        if name.startswith(ATTRIBUTE_PREFIX) and name not in attributes:
            node.RemoveAttribute(name)
    for name, value in attributes.items():
        node.SetAttribute(name, value)


def _show_robust_range(node: Any, array: np.ndarray) -> None:
    """Window/level from the 0.5-99.5 percentiles, fixed so that automatic window/level cannot undo it."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    low, high = (float(v) for v in np.percentile(array, WINDOW_PERCENTILES))
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high if high > low else low + 1.0)


def _new_volume(array_kji: Any, matrix: Any, name: str, reference_node: Any,
                attributes: Mapping[str, str] | None, description: str, heat_map: bool = False) -> Any:
    """Create and place a new scalar volume; nothing of it stays in the scene if a step fails."""
    require_scalar_volume(reference_node)
    array, matrix = _valid_output(array_kji, matrix, attributes)
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=matrix, name=name)
    try:
        node.SetDescription(description)
        adopt_reference_placement(node, reference_node, attributes)
        _show_robust_range(node, array)
        if heat_map:
            node.GetDisplayNode().SetAndObserveColorNodeID(heat_color_node_id(node.GetScene()))
    except Exception:
        remove_nodes([node])
        raise
    return node


def add_output_volume(array_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str, reference_node: Any,
                      attributes: Mapping[str, str] | None = None, description: str = DISCLAIMER) -> Any:
    """A new scalar volume holding ``array_kji`` on the grid ``ijk_to_ras``, placed like ``reference_node``.

    It observes the reference's parent transform, sits under the reference's study in the subject
    hierarchy, carries the provenance ``attributes`` and the AI disclaimer, and is displayed with a
    robust window/level. The array and matrix are validated before anything is added to the scene.
    """
    return _new_volume(array_kji, ijk_to_ras, name, reference_node, attributes, description)


def update_output_volume(node: Any, array_kji: np.ndarray, ijk_to_ras: np.ndarray, reference_node: Any,
                         attributes: Mapping[str, str] | None = None, description: str = DISCLAIMER) -> Any:
    """Write the result into an existing scalar volume the user chose as output, and return it.

    The reference (input) node is refused: inputs are never modified. The matrix is set before the
    voxels, so the node never shows the new voxels on its old grid.
    """
    require_scalar_volume(reference_node)
    if node is None:
        raise VolumeNodeError("no output volume selected")
    if node is reference_node or node.GetID() == reference_node.GetID():
        raise VolumeNodeError(f"{describe(node)} is the input volume; ScoreFusion never overwrites its input")
    if node.GetClassName() != "vtkMRMLScalarVolumeNode":
        raise VolumeNodeError(f"{describe(node)} is a {node.GetClassName()}; choose a scalar volume or a new node")
    array, matrix = _valid_output(array_kji, ijk_to_ras, attributes)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    slicer.util.updateVolumeFromArray(node, array)
    node.SetDescription(description)
    adopt_reference_placement(node, reference_node, attributes)
    _show_robust_range(node, array)
    return node


def heat_color_node_id(scene: Any) -> str:
    """ID of a heat-map colour node in ``scene``: a built-in one when present, else ScoreFusion's own table.

    slicer-core scenes without a colour logic have no colour nodes at all, so the fallback is a
    256-entry black-red-yellow-white table, created once per scene as a singleton.
    """
    for node_id in HEAT_COLOR_NODE_IDS:
        if scene.GetNodeByID(node_id) is not None:
            return node_id
    table = scene.GetSingletonNode(HEAT_COLOR_SINGLETON_TAG, "vtkMRMLColorTableNode")
    if table is None:
        table = slicer.vtkMRMLColorTableNode()
        table.SetTypeToUser()
        table.SetName("ScoreFusion uncertainty")
        table.SetSingletonTag(HEAT_COLOR_SINGLETON_TAG)
        ramp = np.linspace(0.0, 1.0, 256)
        table.SetNumberOfColors(ramp.size)
        for index, t in enumerate(ramp):  # the classic "hot" map: red, then green, then blue ramp up
            r, g, b = np.clip([3.0 * t, 3.0 * t - 1.0, 3.0 * t - 2.0], 0.0, 1.0)
            table.SetColor(index, r, g, b, 1.0)
        scene.AddNode(table)
    return table.GetID()


def add_uncertainty_volume(array_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str, reference_node: Any) -> Any:
    """A new volume with the per-voxel spread of the samples, as a heat map (``ScoreFusion.role = uncertainty``)."""
    return _new_volume(array_kji, ijk_to_ras, name, reference_node, {"ScoreFusion.role": "uncertainty"},
                       UNCERTAINTY_DESCRIPTION, heat_map=True)


def remove_nodes(nodes: Iterable[Any]) -> None:
    """Remove nodes with their display and storage nodes and subject-hierarchy items (a rollback).

    ``None`` entries and nodes already gone are skipped, so a partial rollback can be repeated.
    """
    for node in nodes:
        scene = None if node is None else node.GetScene()
        if scene is None or not scene.IsNodePresent(node):
            continue
        helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        item = sh.GetItemByDataNode(node)
        if item:
            sh.RemoveItem(item, False, False)
        scene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and scene.IsNodePresent(helper):
                scene.RemoveNode(helper)
