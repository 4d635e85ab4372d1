"""Inputs of a segmenter: checked, stacked in the bundle's channel order, normalised, on its voxel size.

Every input must lie on one grid (shape and IJK->RAS matrix) and be finite. The stack is
reoriented to RAS by axis permutation and flips (no resampling); only when the voxel size
differs from the one the network was trained at is it resampled (trilinear, edge-aligned
grids, so the field of view is kept exactly), and the network's outputs are resampled back
the same way. A channel that is all zero stays zero after normalisation: that is how a
missing contrast is zero-filled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..data.records import canonical_contrast
from ..errors import InputError
from ..grid import Reorientation, reorient_to_ras
from ..volume import Volume, require_finite_real, require_same_grid

#: Relative voxel-size difference below which no resampling is done.
SPACING_TOLERANCE = 1e-3


def channel_volumes(volumes: Mapping[str, Volume], channels: Sequence[str]) -> list[Volume]:
    """The volumes of ``channels`` in order, after checking names, grid and values."""
    named: dict[str, Volume] = {}
    for name, volume in volumes.items():
        key = canonical_contrast(name)
        if key in named:
            raise InputError(f"contrast {key} is given twice")
        if not isinstance(volume, Volume):
            raise InputError(f"the {key} input must be a Volume, got {type(volume).__name__}")
        named[key] = volume
    missing = [c for c in channels if c not in named]
    if missing:
        raise InputError(f"the segmenter needs {', '.join(channels)}; missing: {', '.join(missing)} (synthesize a "
                         "missing contrast first, or zero-fill it explicitly)")
    chosen = {c: named[c] for c in channels}
    require_same_grid(chosen)
    for name, volume in chosen.items():
        require_finite_real(volume.array, f"the {name} volume")
    return list(chosen.values())


def normalize_nonzero(stack: np.ndarray) -> np.ndarray:
    """Per channel: subtract the mean and divide by the std of its nonzero voxels; zeros stay zero."""
    out = np.zeros(stack.shape, dtype=np.float32)
    for c, channel in enumerate(stack):
        nonzero = channel != 0
        if not nonzero.any():
            continue
        values = channel[nonzero].astype(np.float64)
        std = float(values.std())
        out[c][nonzero] = ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def ras_stack(volumes: Sequence[Volume]) -> tuple[np.ndarray, Volume, Reorientation]:
    """``(C, k, j, i)`` float32 stack on the RAS-reoriented grid, a reference volume of that grid and the record."""
    reoriented = [reorient_to_ras(v) for v in volumes]
    reference, record = reoriented[0]
    stack = np.stack([r[0].array.astype(np.float32, copy=False) for r in reoriented])
    return stack, reference, record


def resampled_shape(shape_kji: Sequence[int], spacing_ijk: Sequence[float],
                    target_spacing_ijk: Sequence[float]) -> tuple[int, int, int] | None:
    """Array shape at the target voxel size, or ``None`` when no resampling is needed."""
    spacing_kji = np.asarray(spacing_ijk, dtype=np.float64)[::-1]
    target_kji = np.asarray(target_spacing_ijk, dtype=np.float64)[::-1]
    if np.all(np.abs(spacing_kji / target_kji - 1.0) <= SPACING_TOLERANCE):
        return None
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape_kji, spacing_kji, target_kji))


def resize(tensor, shape_kji: Sequence[int]):  # (B, C, D, H, W) torch tensor -> same at shape_kji
    """Trilinear resize with edge-aligned grids (``align_corners=False``): the field of view is kept."""
    import torch.nn.functional as F

    return F.interpolate(tensor, size=tuple(int(n) for n in shape_kji), mode="trilinear", align_corners=False)


def zero_outside_head(volume: Volume, references: Sequence[Volume]) -> Volume:
    """``volume`` with every voxel set to 0 where all ``references`` are 0 (outside the head).

    Synthesized contrasts have no unit and a nonzero background; the segmenter normalises each
    channel over its nonzero voxels, so a synthesized channel must share the real inputs' zero
    background or its statistics would include air.
    """
    if not references:
        raise InputError("zero_outside_head needs at least one real reference volume")
    require_same_grid({"synthesized": volume, **{f"reference {n + 1}": r for n, r in enumerate(references)}})
    head = np.zeros(volume.array.shape, dtype=bool)
    for reference in references:
        head |= np.asarray(reference.array) != 0
    return volume.with_array(np.where(head, volume.array, 0).astype(volume.array.dtype, copy=False))
