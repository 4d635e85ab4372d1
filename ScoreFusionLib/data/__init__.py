"""Dataset handling: case discovery, manifests, splits, loading, task preparation, datasets.

Modules (one job each): :mod:`.records` (contrast names, :class:`CaseRecord`),
:mod:`.brats` (folder discovery), :mod:`.manifest` (CSV/JSON paired-case lists),
:mod:`.sources` (folder-or-manifest), :mod:`.split` (train/test), :mod:`.loading` (one case
onto the model grid), :mod:`.task` (normalised network arrays), :mod:`.coords`
(coordinate channels), :mod:`.slices` (canonical plane layout, 2D slice dataset) and
:mod:`.crops` (3D random crops), :mod:`.cache` (prepared cases on disk). Nothing here
imports torch at module level.
"""

from __future__ import annotations

from .brats import discover_cases, match_case_file, scan_case_folder
from .cache import load_prepared, save_prepared
from .coords import axis_coordinates, coordinate_channels
from .crops import RandomCropDataset
from .loading import PAPER_GRID_IJK, LoadedCase, load_case
from .manifest import load_manifest, write_manifest
from .records import (
    CONTRASTS,
    IMAGE_CONTRASTS,
    SEG,
    CaseRecord,
    canonical_contrast,
    canonical_contrasts,
)
from .slices import (
    PLANES,
    PlaneSliceDataset,
    concat_plane_input,
    neighbor_indices,
    plane_axis,
    plane_input_channels,
    plane_network_input,
    plane_slices,
    slice_shape,
)
from .sources import load_cases
from .split import CaseSplit, read_id_list, split_cases
from .task import PreparedCase, TaskSpec, prepare_case

__all__ = [
    "CONTRASTS",
    "IMAGE_CONTRASTS",
    "PAPER_GRID_IJK",
    "PLANES",
    "SEG",
    "CaseRecord",
    "CaseSplit",
    "LoadedCase",
    "PlaneSliceDataset",
    "PreparedCase",
    "RandomCropDataset",
    "TaskSpec",
    "axis_coordinates",
    "canonical_contrast",
    "canonical_contrasts",
    "concat_plane_input",
    "coordinate_channels",
    "discover_cases",
    "load_case",
    "load_cases",
    "load_manifest",
    "load_prepared",
    "match_case_file",
    "neighbor_indices",
    "plane_axis",
    "plane_input_channels",
    "plane_network_input",
    "plane_slices",
    "prepare_case",
    "read_id_list",
    "save_prepared",
    "scan_case_folder",
    "slice_shape",
    "split_cases",
    "write_manifest",
]
