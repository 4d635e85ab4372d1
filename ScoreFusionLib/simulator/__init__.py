"""Physics-based MRI simulator driven by real ICBM152 tissue maps (output is *simulated*).

It produces co-registered T1w (``t1n``), post-contrast T1w (``t1c``), T2w (``t2w``),
FLAIR (``t2f``) and PDw (``pdw``) volumes, optionally with a synthetic tumour and its
BraTS label map, for tests and demos where no real multi-contrast data exist offline.
See docs/data.md section 3 for the model and its assumptions.

Modules, one job each: :mod:`.tissue` (source maps and grids), :mod:`.fields` (smooth
random fields), :mod:`.physics` (relaxation and signal equations), :mod:`.augment`
(deformation, bias, noise, gain), :mod:`.tumor` (synthetic tumours), :mod:`.case` (one
case end to end) and :mod:`.writer` (files on disk).
"""

from __future__ import annotations

from .case import SimulatedCase, case_id, description, simulate_case
from .physics import CONTRASTS
from .tissue import TissueMaps, icbm_data_dir, load_tissue_maps
from .writer import write_case, write_cohort

__all__ = [
    "CONTRASTS",
    "SimulatedCase",
    "TissueMaps",
    "case_id",
    "description",
    "icbm_data_dir",
    "load_tissue_maps",
    "simulate_case",
    "write_case",
    "write_cohort",
]
