"""Segmenting a (partly synthesised) set of contrasts: label maps into segmentations, and MONAIAuto3DSeg.

:func:`import_labelmap` turns an integer label array on a known grid into a segmentation node named
and coloured like the BraTS compartments, placed like its reference volume. The MONAIAuto3DSeg
hand-off (:func:`run_monai_auto3dseg`) needs the Slicer application with that extension installed;
MONAIAuto3DSeg is imported inside the function, never at file scope, and its ``process`` is not a
declared public API, so it is wrapped here and nowhere else. Without it, ScoreFusion's own segmenter
runs in the worker (:meth:`.logic.ProcessingLogic.segment_tumour`); the helpers below name its
segments for the label convention it wrote and record what made the segmentation.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import slicer

from .scene_io import (
    GridMismatchError,
    adopt_reference_placement,
    describe,
    grid_differences,
    remove_nodes,
    require_scalar_volume,
    validate_attributes,
)
from .scene_io import ijk_to_ras as node_ijk_to_ras

#: BraTS label value -> (segment name, colour). Enhancing tumour is 3 in BraTS 2023+ and 4 in
#: BraTS 2017-2021; both are accepted. (BraTS 2024 post-treatment data uses 4 for the resection
#: cavity: pass ``label_names`` for such label maps.)
BRATS_LABELS: dict[int, tuple[str, tuple[float, float, float]]] = {
    1: ("Necrotic tumour core", (0.85, 0.20, 0.20)),
    2: ("Peritumoural oedema", (0.30, 0.80, 0.30)),
    3: ("Enhancing tumour", (1.00, 0.85, 0.10)),
    4: ("Enhancing tumour", (1.00, 0.85, 0.10)),
}
_COLOR_OF_NAME = dict(BRATS_LABELS.values())
#: Label maps are imported as unsigned 16-bit volumes.
MAX_LABEL = 65535

#: Segment names of the BraTS compartments (``ScoreFusionLib.labels`` names), whatever their label value.
COMPARTMENT_NAMES = {"necrotic": BRATS_LABELS[1][0], "edema": BRATS_LABELS[2][0], "enhancing": BRATS_LABELS[3][0],
                     "resection_cavity": "Resection cavity"}

#: What ``ScoreFusion.segmentationBackend`` says about the back-end that made a segmentation.
SCOREFUSION_BACKEND = "ScoreFusion segmenter"
MONAI_BACKEND = "MONAIAuto3DSeg"
BACKEND_ATTRIBUTE = "ScoreFusion.segmentationBackend"
#: Comma-separated input contrasts that ScoreFusion generated (synthesized or super-resolved).
SYNTHESIZED_ATTRIBUTE = "ScoreFusion.synthesizedInputs"

#: Input ids of the MONAIAuto3DSeg BraTS models, which are also ScoreFusion's contrast names.
BRATS_INPUT_IDS = ("t2f", "t1c", "t1n", "t2w")
DEFAULT_MONAI_MODEL = "brats-gli-v1.0.0"


def _valid_labels(labels_kji: Any) -> np.ndarray:
    labels = np.asarray(labels_kji)
    if labels.ndim != 3 or labels.size == 0:
        raise ValueError(f"a label map must be a non-empty 3D (k, j, i) array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label maps must hold integers, got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"label values must not be negative, got {low}")
    if high > MAX_LABEL:
        raise ValueError(f"label values must be at most {MAX_LABEL}, got {high}")
    return labels.astype(np.uint8 if high <= 255 else np.uint16)


def import_labelmap(labels_kji: np.ndarray, ijk_to_ras: np.ndarray, reference_volume_node: Any, name: str,
                    label_names: Mapping[int, str] | None = None, attributes: Mapping[str, str] | None = None) -> Any:
    """A new segmentation node with one segment per non-zero label of ``labels_kji``.

    The labels must lie on the reference volume's grid (same shape and IJK->RAS within 1e-3 mm):
    a label map on another grid is a bug upstream, not something to resample silently. Segments are
    named from ``label_names`` (BraTS names by default), matched by each segment's label value, and
    BraTS names get BraTS colours. The segmentation observes the reference's parent transform, sits
    in its study and carries ``attributes`` (e.g. ``ScoreFusion.synthesizedInputs``); the temporary
    label map node is removed again.
    """
    from ScoreFusionLib.geometry import validate_affine

    image = require_scalar_volume(reference_volume_node)
    labels = _valid_labels(labels_kji)
    matrix = validate_affine(ijk_to_ras)
    validate_attributes(attributes)
    diffs = grid_differences(image.GetDimensions(), node_ijk_to_ras(reference_volume_node), labels.shape[::-1], matrix)
    if diffs:
        raise GridMismatchError(f"the label map is not on the grid of {describe(reference_volume_node)}: "
                                f"{'; '.join(diffs)}")
    names = {value: label for value, (label, _) in BRATS_LABELS.items()} if label_names is None else dict(label_names)
    labelmap = slicer.util.addVolumeFromArray(labels, ijkToRAS=matrix, name=f"{name} labels",
                                              nodeClassName="vtkMRMLLabelMapVolumeNode")
    segmentation_node = None
    try:
        # Label map, segmentation and reference share one parent transform *before* the geometry is
        # set and the labels imported: both steps map between the nodes' frames, and would otherwise
        # bake the reference's transform into the segmentation's geometry.
        labelmap.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
        segmentation_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation_node.CreateDefaultDisplayNodes()
        adopt_reference_placement(segmentation_node, reference_volume_node, attributes)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
            raise RuntimeError(f"Slicer could not import the label map into segmentation '{name}'")
        _name_segments(segmentation_node, names, {int(v) for v in np.unique(labels) if v})
    except Exception:
        remove_nodes([segmentation_node])
        raise
    finally:
        remove_nodes([labelmap])
    return segmentation_node


def _name_segments(segmentation_node: Any, names: Mapping[int, str], expected_values: set[int]) -> None:
    """Name and colour each segment by its label value (not its position), and check none went missing."""
    segmentation = segmentation_node.GetSegmentation()
    found = set()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        value = segment.GetLabelValue()
        found.add(value)
        segment.SetName(names.get(value, f"Label {value}"))
        if segment.GetName() in _COLOR_OF_NAME:
            segment.SetColor(*_COLOR_OF_NAME[segment.GetName()])
    if found != expected_values:
        raise RuntimeError(f"importing the label map gave segments for labels {sorted(found)}, "
                           f"expected {sorted(expected_values)}")


def brats_label_names(convention: str) -> dict[int, str]:
    """Label value -> segment name in a BraTS label convention (``brats2023``: ET 3; ``brats2021``: ET 4)."""
    from ScoreFusionLib.labels import CONVENTIONS

    if convention not in CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; use one of {sorted(CONVENTIONS)}")
    return {value: COMPARTMENT_NAMES[compartment] for compartment, value in CONVENTIONS[convention].items()}


def reference_input(input_nodes_by_contrast: Mapping[str, Any]) -> Any:
    """The node a segmentation is named after and placed with: the FLAIR (``t2f``) if given, else the first."""
    from ScoreFusionLib.data.records import canonical_contrast

    for contrast, node in input_nodes_by_contrast.items():
        try:
            if canonical_contrast(contrast) == "t2f" and node is not None:
                return node
        except ValueError:  # a name that is no known contrast cannot be the FLAIR
            continue
    return next(iter(input_nodes_by_contrast.values()))


def synthesized_inputs(input_nodes_by_contrast: Mapping[str, Any]) -> list[str]:
    """The contrasts whose node ScoreFusion made (it carries ``ScoreFusion.task``): synthesized or super-resolved."""
    return [contrast for contrast, node in input_nodes_by_contrast.items()
            if node is not None and node.GetAttribute("ScoreFusion.task")]


def scorefusion_attributes(provenance: Mapping[str, Any], input_nodes_by_contrast: Mapping[str, Any],
                           segmenter: str = "default") -> dict[str, str]:
    """Attributes of a segmentation made by ScoreFusion's segmenter: back-end, model, convention, inputs."""
    model = provenance.get("segmenter") or {}
    attrs = {
        BACKEND_ATTRIBUTE: SCOREFUSION_BACKEND,
        "ScoreFusion.segmenter": segmenter,
        "ScoreFusion.segmenterId": provenance.get("segmenter_id"),
        "ScoreFusion.segmenterSha256": model.get("weights_sha256") if isinstance(model, Mapping) else None,
        "ScoreFusion.labelConvention": provenance.get("label_convention"),
        "ScoreFusion.device": provenance.get("device"),
        "ScoreFusion.version": provenance.get("software"),
        "ScoreFusion.inputs": ",".join(input_nodes_by_contrast),
    }
    out = {k: str(v) for k, v in attrs.items() if v is not None and v != ""}
    out[SYNTHESIZED_ATTRIBUTE] = ",".join(synthesized_inputs(input_nodes_by_contrast))
    return out


def monai_attributes(input_nodes_by_contrast: Mapping[str, Any], model_id: str = DEFAULT_MONAI_MODEL) -> dict[str, str]:
    """Attributes of a segmentation made by MONAIAuto3DSeg."""
    return {BACKEND_ATTRIBUTE: MONAI_BACKEND, "ScoreFusion.segmenter": model_id,
            "ScoreFusion.inputs": ",".join(input_nodes_by_contrast),
            SYNTHESIZED_ATTRIBUTE: ",".join(synthesized_inputs(input_nodes_by_contrast))}


def monai_auto3dseg_available() -> bool:
    """True only inside Slicer with the MONAIAuto3DSeg extension's module loaded."""
    return hasattr(getattr(slicer, "modules", None), "monaiauto3dseg")


def _input_id(model_input: Any) -> str:
    """The BraTS id (``t2f`` ...) named by one entry of a model's ``inputs`` list."""
    if isinstance(model_input, Mapping):
        texts = [str(model_input.get(key, "")) for key in ("name", "namePattern", "title")]
    else:
        texts = [str(model_input)]
    for text in texts:
        matches = [input_id for input_id in BRATS_INPUT_IDS if input_id in text.lower()]
        if len(matches) == 1:
            return matches[0]
    raise ValueError(f"model input {model_input!r} is not one of the BraTS contrasts {', '.join(BRATS_INPUT_IDS)}")


def brats_input_order(model_inputs: Sequence[Any]) -> list[str]:
    """ScoreFusion contrast names (``t2f``, ``t1c``, ``t1n``, ``t2w``) in the order a MONAIAuto3DSeg model wants them.

    ``model_inputs`` is the model's ``inputs`` list; each entry is a dict whose ``name``,
    ``namePattern`` (``*t2f*`` in Models.json) or ``title`` (``Input T2F volume``) names the
    contrast, or a plain string. Unknown and repeated contrasts raise ``ValueError``.
    """
    order = [_input_id(entry) for entry in model_inputs]
    repeated = sorted({c for c in order if order.count(c) > 1})
    if repeated:
        raise ValueError(f"the model lists the contrast(s) {', '.join(repeated)} more than once")
    return order


def run_monai_auto3dseg(input_nodes_by_contrast: Mapping[str, Any], output_segmentation_node: Any,
                        model_id: str = DEFAULT_MONAI_MODEL, cpu: bool = False, wait: bool = True,
                        event_callback: Callable[..., Any] | None = None) -> tuple[Any, Any]:
    """Segment with a MONAIAuto3DSeg model; return ``(logic, task)``: its logic and what ``process`` returned.

    ``input_nodes_by_contrast`` maps contrast names (``t1n``, ``t1c``, ``t2w``, ``t2f`` or aliases
    such as ``flair``) to volume nodes; they are passed in the order the model declares. With
    ``wait=False`` the call returns at once and the result arrives in ``output_segmentation_node``
    later; keep both returned objects until then (recent versions cancel with
    ``logic.cancelProcessing(task)``, older ones with ``logic.cancelProcessing()``).
    ``event_callback(event_code, task)`` needs a version whose ``process`` accepts ``eventCallback``.
    Checked against lassoan/SlicerMONAIAuto3DSeg: ``process(inputNodes, outputSegmentation, model=None,
    cpu=False, waitForCompletion=True, ...)``, with ``eventCallback`` only in versions with sequence support.
    """
    if not monai_auto3dseg_available():
        raise RuntimeError("the MONAIAuto3DSeg extension is not installed: install it from the Extensions Manager "
                           "(it is only available inside the Slicer application)")
    from MONAIAuto3DSeg import MONAIAuto3DSegLogic

    from ScoreFusionLib.data.records import canonical_contrasts

    if output_segmentation_node is None or not output_segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise ValueError("MONAIAuto3DSeg writes into a segmentation node; choose or create one first")
    nodes = dict(zip(canonical_contrasts(list(input_nodes_by_contrast)), input_nodes_by_contrast.values()))
    logic = MONAIAuto3DSegLogic()
    order = brats_input_order(logic.model(model_id)["inputs"])
    missing = [c for c in order if nodes.get(c) is None]
    if missing:
        raise ValueError(f"MONAIAuto3DSeg model {model_id} needs volumes for {', '.join(missing)}")
    options = {"model": model_id, "cpu": cpu, "waitForCompletion": wait}
    if event_callback is not None:
        if "eventCallback" not in inspect.signature(logic.process).parameters:
            raise RuntimeError("this MONAIAuto3DSeg version reports no progress events; update the extension "
                               "or run without an event callback")
        options["eventCallback"] = event_callback
    return logic, logic.process([nodes[c] for c in order], output_segmentation_node, **options)
