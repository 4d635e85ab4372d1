"""Brain-tumour segmentation on real or translated contrasts (BraTS regions and labels).

Modules (one job each): :mod:`.network` (SegResNet configuration and presets),
:mod:`.regions` (label maps <-> nested TC/WT/ET masks), :mod:`.model_bundle` (segmenter
bundles: manifest, safetensors weights, validation, loading), :mod:`.defaults` (the shipped
segmenter), :mod:`.preprocess` (channel order, RAS, normalisation, voxel size) and
:mod:`.inference` (:func:`segment`, sliding windows with Gaussian blending).

Typical use::

    from ScoreFusionLib.segmentation import segment
    result = segment({"t1n": t1, "t1c": t1c, "t2w": t2, "t2f": flair}, "default")
    result.labels  # a Volume of BraTS labels on the inputs' grid

Nothing here imports torch or MONAI at import time.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SegmentationResult", "segment"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import inference

        return getattr(inference, name)
    raise AttributeError(name)
