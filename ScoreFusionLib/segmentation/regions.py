"""Between BraTS label maps and the nested region masks the segmenter predicts (TC, WT, ET).

Decoding enforces the nesting ET in TC in WT (a voxel predicted enhancing is also core and
tumour), then codes compartments in the requested convention: enhancing = ET, necrotic =
TC minus ET, oedema = WT minus TC. Encoding is :func:`~ScoreFusionLib.labels.region_mask`
per region, so a round trip of a valid BraTS map is exact.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..labels import labels_from_compartments, region_mask
from .network import REGION_CHANNELS


def labels_to_regions(labels: np.ndarray, convention: str) -> np.ndarray:
    """``(3, *labels.shape)`` boolean masks of TC, WT and ET."""
    return np.stack([region_mask(labels, region, convention) for region in REGION_CHANNELS])


def regions_to_labels(regions: np.ndarray, convention: str) -> np.ndarray:
    """uint8 label map of ``(3, ...)`` boolean region masks (TC, WT, ET) in ``convention``."""
    masks = np.asarray(regions)
    if masks.ndim < 2 or masks.shape[0] != len(REGION_CHANNELS) or masks.dtype != bool:
        raise InputError(f"expected boolean region masks of shape (3, ...), got {masks.dtype} {masks.shape}")
    tc, wt, et = masks
    core = tc | et
    whole = wt | core
    return labels_from_compartments(
        {"edema": whole & ~core, "necrotic": core & ~et, "enhancing": et}, convention)
