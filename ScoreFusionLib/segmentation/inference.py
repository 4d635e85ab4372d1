"""Whole-volume tumour segmentation with a segmenter bundle (sliding windows, Gaussian blending).

The volume is cut into overlapping windows of the bundle's size; each window's region logits
are weighted by a Gaussian centred on the window (MONAI's ``sliding_window_inference`` with
``mode="gaussian"``), so seams between windows disappear and window borders, where the
network sees least context, count least. Sigmoid probabilities of TC, WT and ET are
thresholded, decoded into compartments (:mod:`.regions`) and written in the requested label
convention on the input's own grid and axis order.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..volume import Volume
from .model_bundle import LoadedSegmenter, SegmenterManifest, load_segmenter
from .network import REGION_CHANNELS
from .preprocess import channel_volumes, normalize_nonzero, ras_stack, resampled_shape, resize
from .regions import regions_to_labels

#: ``progress(windows_done, windows_total)``; raising from it stops the run (e.g. to cancel).
ProgressCallback = Callable[[int, int], Any]


@dataclass
class SegmentationResult:
    """Label map and region probabilities on the input grid, with what produced them."""

    labels: Volume
    probabilities: dict[str, Volume]
    label_convention: str
    manifest: SegmenterManifest
    seconds: float

    def provenance(self) -> dict:
        m = self.manifest
        return {
            "segmenter": {"model": m.model, "weights_sha256": m.weights_sha256, "channels": list(m.channels),
                          "spacing_mm": list(m.spacing_mm), "roi_size_ijk": list(m.roi_size_ijk),
                          "overlap": m.overlap, "threshold": m.threshold},
            "label_convention": self.label_convention,
            "seconds": round(self.seconds, 3),
        }


def window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's sliding window visits for ``shape`` (after padding up to ``roi``)."""
    total = 1
    for n, r in zip(shape, roi):
        n = max(n, r)
        step = max(int(r * (1.0 - overlap)), 1)
        total *= 1 if n == r else math.ceil((n - r) / step) + 1
    return total


def _segmenter(model: str | os.PathLike | LoadedSegmenter, device: str) -> LoadedSegmenter:
    if isinstance(model, LoadedSegmenter):
        return model
    from .defaults import resolve_segmenter

    return load_segmenter(resolve_segmenter(model), device)


def predict_probabilities(segmenter: LoadedSegmenter, stack: np.ndarray, spacing_ijk: Sequence[float],
                          overlap: float | None = None, sw_batch_size: int = 1,
                          progress: ProgressCallback | None = None) -> np.ndarray:
    """``(3, k, j, i)`` float32 sigmoid probabilities of a raw RAS ``(C, k, j, i)`` stack at ``spacing_ijk``."""
    import torch
    from monai.inferers import sliding_window_inference

    m = segmenter.manifest
    overlap = m.overlap if overlap is None else float(overlap)
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must lie in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise InputError(f"sw_batch_size must be positive, got {sw_batch_size}")
    shape = stack.shape[1:]
    x = torch.from_numpy(normalize_nonzero(stack))[None].to(segmenter.device)
    target = resampled_shape(shape, spacing_ijk, m.spacing_mm)
    if target is not None:
        x = resize(x, target)
    roi = tuple(m.roi_size_ijk[::-1])
    if m.layout == "ijk":  # the network expects (C, i, j, k) tensors
        x, roi = x.permute(0, 1, 4, 3, 2), tuple(m.roi_size_ijk)
    total = math.ceil(window_count(x.shape[2:], roi, overlap) / sw_batch_size)
    done = [0]

    def predictor(window: Any) -> Any:
        out = segmenter.network(window)
        done[0] += 1
        if progress is not None:
            progress(min(done[0], total), total)
        return out

    with torch.inference_mode():
        logits = sliding_window_inference(x, roi, sw_batch_size, predictor, overlap=overlap, mode="gaussian",
                                          sigma_scale=0.125, padding_mode="constant", cval=0.0)
        probs = torch.sigmoid(torch.as_tensor(logits).float())
        if m.layout == "ijk":
            probs = probs.permute(0, 1, 4, 3, 2)
        if target is not None:
            probs = resize(probs, shape)
    return probs[0].cpu().numpy().astype(np.float32)


def segment(volumes: Mapping[str, Volume], model: str | os.PathLike | LoadedSegmenter = "default", *,
            device: str = "auto", label_convention: str | None = None, overlap: float | None = None,
            sw_batch_size: int = 1, progress: ProgressCallback | None = None) -> SegmentationResult:
    """Segment a brain tumour from co-registered contrasts (see the module docstring).

    Parameters
    ----------
    volumes : contrast name (``t1n``/``t1``, ``t1c``/``t1ce``, ``t2w``/``t2``, ``t2f``/``flair``) -> volume,
        all on one grid. The bundle's channels must all be present; a zero-filled volume stands for
        a missing contrast.
    model : a segmenter bundle folder or ``.zip``, ``"default"`` (the shipped one) or a loaded segmenter.
    label_convention : ``brats2021`` (ET = 4) or ``brats2023`` (ET = 3); ``None``: the bundle's.
    overlap, sw_batch_size : sliding-window overlap (default: the bundle's) and windows per call.
    progress : called after each network call with (done, total).
    """
    from ..labels import CONVENTIONS
    from ..translate import resolve_device

    start = time.perf_counter()
    segmenter = _segmenter(model, resolve_device(device))
    m = segmenter.manifest
    convention = label_convention or m.label_convention
    if convention not in CONVENTIONS:
        raise InputError(f"unknown label convention {convention!r}; use one of {sorted(CONVENTIONS)}")
    ordered = channel_volumes(volumes, m.channels)
    stack, reference, record = ras_stack(ordered)
    probs = predict_probabilities(segmenter, stack, reference.spacing, overlap, sw_batch_size, progress)
    labels = regions_to_labels(probs >= m.threshold, convention)
    as_input = record.undo
    return SegmentationResult(
        labels=as_input(Volume(labels, reference.affine)),
        probabilities={r: as_input(Volume(p, reference.affine)) for r, p in zip(REGION_CHANNELS, probs)},
        label_convention=convention, manifest=m, seconds=time.perf_counter() - start,
    )


__all__ = ["SegmentationResult", "predict_probabilities", "segment", "window_count"]
