"""Input and output side by side in two linked slice views.

:func:`assign_side_by_side` only sets MRML slice-composite nodes, so it is tested against a
slicer-core scene; :func:`show_side_by_side` is the thin application part (layout manager, slice
widgets) that runs inside Slicer only.

Order matters: each view gets its own volume while the views are unlinked, and only then are they
linked. Linked views broadcast volume changes, and ``slicer.util.setSliceViewerLayers`` changes
every view, so neither may be used to give the two views different volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import slicer

#: Opacity of the uncertainty map over the output.
OVERLAY_OPACITY = 0.5


def assign_side_by_side(composite_nodes: Sequence[Any], input_node_id: str, output_node_id: str, link: bool = True,
                        foreground_id: str | None = None, foreground_opacity: float = 0.0) -> None:
    """Input as background of the first view, output (and optional foreground) in the second, then link.

    Parameters
    ----------
    composite_nodes : the two ``vtkMRMLSliceCompositeNode`` of the views (input view first).
    input_node_id, output_node_id : volume node IDs shown as the views' backgrounds.
    link : link the views afterwards, so pan, zoom and slice offset follow each other.
    foreground_id : a volume (e.g. the uncertainty map) over the output; ``None`` clears the foreground.
    foreground_opacity : opacity of that foreground.
    """
    if len(composite_nodes) != 2:
        raise ValueError(f"side by side needs exactly two slice views, got {len(composite_nodes)}")
    if not input_node_id or not output_node_id:
        raise ValueError("side by side needs both an input and an output volume")
    input_view, output_view = composite_nodes
    for view in composite_nodes:  # unlinked first, so one view's change is not broadcast to the other
        view.SetLinkedControl(False)
        view.SetHotLinkedControl(False)
    input_view.SetBackgroundVolumeID(input_node_id)
    input_view.SetForegroundVolumeID(None)
    output_view.SetBackgroundVolumeID(output_node_id)
    output_view.SetForegroundVolumeID(foreground_id)
    output_view.SetForegroundOpacity(foreground_opacity if foreground_id else 0.0)
    for view in composite_nodes:
        view.SetLinkedControl(link)
        view.SetHotLinkedControl(link)


def show_side_by_side(input_node: Any, output_node: Any, overlay_node: Any = None) -> None:
    """Switch Slicer to the side-by-side layout: input in Red, output (with ``overlay_node`` at 50%) in Yellow.

    Raises ``RuntimeError`` outside the Slicer application, where there is no layout manager.
    """
    app = getattr(slicer, "app", None)
    layout_manager = app.layoutManager() if app is not None else None
    if layout_manager is None:
        raise RuntimeError("showing volumes side by side needs the Slicer application (no layout manager here)")
    layout_manager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    composite_nodes = [layout_manager.sliceWidget(name).sliceLogic().GetSliceCompositeNode()
                       for name in ("Red", "Yellow")]
    assign_side_by_side(composite_nodes, input_node.GetID(), output_node.GetID(), link=True,
                        foreground_id=overlay_node.GetID() if overlay_node is not None else None,
                        foreground_opacity=OVERLAY_OPACITY)
    slicer.util.resetSliceViews()
