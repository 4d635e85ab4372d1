"""The demo's segmentation step: segment the simulated tumour with the real and the synthesized FLAIR.

The default segmenter sees the case's real T1w, T1ce and T2w each time; only the FLAIR channel
changes: the real one, zeros (the usual fallback when a contrast is missing) and each synthesis
method's output. Dice against the simulated labels then shows what synthesis is worth downstream.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..volume import Volume

#: FLAIR sources that need no model, in the order they are reported.
BASELINE_SOURCES = ("real", "zero-filled")


@dataclass
class SegmentationRun:
    """One FLAIR source's label map, its Dice per region and the seconds segmentation took."""

    labels: Volume
    dice: dict[str, float]
    seconds: float


def flair_sources(images: Mapping[str, Volume], target: str, synthesized: Mapping[str, Volume]) -> dict[str, Volume]:
    """Source name -> the volume used as ``target``: real, zero-filled, then each synthesis (head-masked)."""
    from ..segmentation.preprocess import zero_outside_head

    real = images[target]
    references = [v for name, v in images.items() if name != target]
    sources = {"real": real, "zero-filled": real.with_array(np.zeros_like(real.array))}
    for method, volume in synthesized.items():
        sources[method] = zero_outside_head(volume, references)
    return sources


def segment_sources(images: Mapping[str, Volume], truth: Volume, convention: str, target: str,
                    synthesized: Mapping[str, Volume], segmenter: str = "default",
                    device: str = "auto") -> dict[str, SegmentationRun]:
    """Segment once per FLAIR source with the other contrasts real; Dice WT/TC/ET against ``truth``."""
    from ..metrics import region_dice
    from ..segmentation.defaults import resolve_segmenter
    from ..segmentation.inference import segment
    from ..segmentation.model_bundle import load_segmenter
    from ..translate import resolve_device

    model = load_segmenter(resolve_segmenter(segmenter), resolve_device(device))
    runs = {}
    for name, volume in flair_sources(images, target, synthesized).items():
        inputs = {c: images[c] for c in model.manifest.channels if c != target}
        start = time.perf_counter()
        result = segment({**inputs, target: volume}, model, label_convention=convention)
        seconds = time.perf_counter() - start
        dice = region_dice(result.labels.array, np.asarray(truth.array).astype(result.labels.array.dtype), convention)
        runs[name] = SegmentationRun(result.labels, {r: round(float(v), 4) for r, v in dice.items()}, seconds)
    return runs
