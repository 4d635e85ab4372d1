"""The canonical plane-input layout and the 2D per-plane slice dataset.

One function, :func:`plane_slices`, decides how a plane model sees a volume: which tensor
axis it slices (axial = D, coronal = H, sagittal = W; method.md section 0), that slices are
taken by plain indexing (no transpose or flip), and how 2.5D neighbours are stacked
(condition-major, replicate padding at the volume edges; sections 3.2 and pitfalls 5, 9).
The training dataset below and the 3D slice scorer both call it, so a plane model's
training batch and its inference input cannot drift apart. It works on numpy arrays and
torch tensors alike; torch is never imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DatasetError, InputError
from .task import PreparedCase

#: Plane name -> spatial tensor axis it slices along (0 = D, 1 = H, 2 = W).
PLANE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
PLANES = tuple(PLANE_AXES)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def plane_axis(plane: str) -> int:
    """Spatial axis (0 = D, 1 = H, 2 = W) that ``plane`` slices along."""
    try:
        return PLANE_AXES[plane]
    except (KeyError, TypeError):
        raise InputError(f"unknown plane {plane!r}; use one of {', '.join(PLANES)}") from None


def _check_neighbors(neighbors: int) -> int:
    if isinstance(neighbors, bool) or int(neighbors) != neighbors or neighbors < 0:
        raise InputError(f"neighbors must be a non-negative integer (slices per side), got {neighbors!r}")
    return int(neighbors)


def neighbor_indices(index: int, n: int, neighbors: int = 0) -> list[int]:
    """Slice indices ``index - k .. index + k``, clamped to ``0..n-1`` (replicate edges)."""
    k = _check_neighbors(neighbors)
    if not 0 <= int(index) < n:
        raise InputError(f"slice index {index} is outside 0..{n - 1}")
    return [min(max(int(index) + o, 0), n - 1) for o in range(-k, k + 1)]


def slice_shape(shape_dhw: Sequence[int], plane: str) -> tuple[int, int]:
    """(rows, cols) of one slice: axial (H, W), coronal (D, W), sagittal (D, H)."""
    ax = plane_axis(plane)
    return tuple(int(s) for i, s in enumerate(shape_dhw) if i != ax)


def plane_input_channels(n_conditions: int, neighbors: int = 0) -> int:
    """Input channels of a plane model: ``M (2k + 1)`` conditions + 3 coords + mask + noisy."""
    return int(n_conditions) * (2 * _check_neighbors(neighbors) + 1) + 5


def plane_slices(volume_channels: Any, plane: str, index: int | Sequence[int], neighbors: int = 0) -> Any:
    """Slices of a channel volume in the canonical plane layout.

    Parameters
    ----------
    volume_channels : array or tensor of shape (..., C, D, H, W).
    plane : ``axial``, ``coronal`` or ``sagittal``.
    index : one slice index along the plane's axis, or a sequence of them.
    neighbors : ``k`` slices on each side (2 for the paper's 2.5D models).

    Returns
    -------
    (..., C * (2k + 1), rows, cols) for an integer index, or (..., S, C * (2k + 1), rows,
    cols) for S indices. Channels are condition-major: all ``2k + 1`` slices of channel 0
    (from ``index - k`` to ``index + k``), then of channel 1, and so on. Neighbours beyond
    the volume replicate the edge slice.
    """
    ax = plane_axis(plane)
    x = volume_channels
    if getattr(x, "ndim", 0) < 4:
        raise InputError(f"expected a (..., C, D, H, W) array, got shape {tuple(getattr(x, 'shape', ()))}")
    n = int(x.shape[x.ndim - 3 + ax])
    single = isinstance(index, (int, np.integer))
    indices = [int(index)] if single else [int(i) for i in index]
    if not indices:
        raise InputError("no slice index given")
    table = [neighbor_indices(i, n, neighbors) for i in indices]
    flat = [i for row in table for i in row]
    s, kk = len(indices), len(table[0])
    axis = x.ndim - 3 + ax
    if _is_torch(x):
        import torch

        taken = x.index_select(axis, torch.as_tensor(flat, dtype=torch.long, device=x.device))
        taken = taken.movedim(axis, -3)
    else:
        taken = np.moveaxis(np.take(np.asarray(x), flat, axis=axis), axis, -3)
    lead = tuple(taken.shape[:-4])
    c, rows, cols = taken.shape[-4], taken.shape[-2], taken.shape[-1]
    # (..., C, S*K, r, c) -> (..., C, S, K, r, c) -> (..., S, C, K, r, c) -> (..., S, C*K, r, c)
    taken = taken.reshape(*lead, c, s, kk, rows, cols)
    if _is_torch(taken):
        taken = taken.movedim(-5, -4)
    else:
        taken = np.moveaxis(taken, -5, -4)
    out = taken.reshape(*lead, s, c * kk, rows, cols)
    if single:
        out = out[..., 0, :, :, :]
    return out if _is_torch(out) else np.ascontiguousarray(out)


def concat_plane_input(cond: Any, coords: Any, mask: Any, noisy: Any) -> Any:
    """The network input: conditions, coordinates, mask, noisy residual, along axis -3.

    All four are (..., C_part, rows, cols) with the same leading axes (numpy or torch); the
    order is the canonical one of method.md section 3.2, noisy residual last.
    """
    parts = [cond, coords, mask, noisy]
    if _is_torch(cond):
        import torch

        return torch.cat(parts, dim=-3)
    return np.concatenate([np.asarray(p) for p in parts], axis=-3)


def plane_network_input(
    conditions: Any,
    coords: Any,
    mask: Any,
    noisy: Any,
    plane: str,
    index: int | Sequence[int],
    neighbors: int = 0,
) -> Any:
    """Full plane-model input for slice(s) ``index`` of volumes on one grid.

    ``conditions`` (..., M, D, H, W), ``coords`` (..., 3, D, H, W), ``mask`` and ``noisy``
    (..., 1, D, H, W). Only the conditions get neighbours; the rest is the centre slice.
    This is the function the 3D slice scorer uses; :class:`PlaneSliceDataset` items
    concatenated by :func:`concat_plane_input` give the same array.
    """
    return concat_plane_input(
        plane_slices(conditions, plane, index, neighbors),
        plane_slices(coords, plane, index, 0),
        plane_slices(mask, plane, index, 0),
        plane_slices(noisy, plane, index, 0),
    )


class PlaneSliceDataset:
    """Every slice along one plane of every prepared case, for training a plane model.

    Items are dicts of float32 arrays, in the canonical layout of :func:`plane_slices`:
    ``cond`` (M (2k+1), rows, cols), ``coords`` (3, rows, cols), ``mask``, ``r0`` and
    ``target`` (1, rows, cols), plus ``case_index`` and ``slice_index``. The noisy residual
    is made by the training loop from ``r0``; :func:`concat_plane_input` then assembles the
    network input. Background slices are included, as in the official code.
    """

    def __init__(self, prepared_cases: Sequence[PreparedCase], plane: str = "axial", neighbors: int = 0):
        self.axis = plane_axis(plane)
        self.plane = plane
        self.neighbors = _check_neighbors(neighbors)
        self.cases = list(prepared_cases)
        if not self.cases:
            raise DatasetError("PlaneSliceDataset needs at least one prepared case")
        m = {c.n_conditions for c in self.cases}
        if len(m) != 1:
            raise DatasetError(f"prepared cases have different numbers of conditions {sorted(m)}")
        counts = [int(c.shape[self.axis]) for c in self.cases]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, item: int) -> tuple[int, int]:
        """(case index, slice index) of dataset item ``item``."""
        n = len(self)
        if item < 0:
            item += n
        if not 0 <= item < n:
            raise IndexError(f"item {item} out of range for {n} slices")
        case = int(np.searchsorted(self._offsets, item, side="right") - 1)
        return case, int(item - self._offsets[case])

    def __getitem__(self, item: int) -> dict:
        case_index, slice_index = self.locate(int(item))
        case = self.cases[case_index]

        def one(volume: np.ndarray, neighbors: int = 0) -> np.ndarray:
            return plane_slices(volume, self.plane, slice_index, neighbors).astype(np.float32, copy=False)

        return {
            "cond": one(case.conditions, self.neighbors),
            "coords": one(case.coords),
            "mask": one(case.mask[None]),
            "r0": one(case.r0[None]),
            "target": one(case.target[None]),
            "case_index": case_index,
            "slice_index": slice_index,
        }
