"""Random 3D crops for fuser training, phase A (method.md section 5.3, pitfall 14).

Conditions, coordinates, mask, residual and target are cut **jointly** at one uniformly
drawn position; the coordinates are the full grid's, so a crop keeps its global position.
Positions depend only on ``(seed, epoch, index)`` through
``numpy.random.default_rng((seed, epoch, index))``: no global RNG state, identical across
DataLoader workers and reruns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DatasetError, GeometryError, InputError
from .task import PreparedCase


def _window(start: int, size: int, n: int, halo: int) -> np.ndarray:
    """Indices ``start - halo .. start + size + halo - 1`` clamped to ``0..n-1``."""
    return np.clip(np.arange(start - halo, start + size + halo), 0, n - 1)


class RandomCropDataset:
    """``samples_per_case`` random crops of every prepared case per epoch.

    Parameters
    ----------
    prepared_cases : the cases (all with the same number of conditions).
    crop_size : (D, H, W) of a crop (paper: 64^3).
    samples_per_case : crops drawn per case and epoch.
    seed : base seed; call :meth:`set_epoch` each epoch for new positions.
    offset_multiple : crop starts are multiples of this (e.g. 8 for large phase-B crops).
    halo : also return ``cond_halo``, the conditions cropped with ``halo`` extra voxels per
        side (edge-replicated at the volume border), so 2.5D neighbours of a crop slice can
        come from the full volume ([L], method.md section 5.3).

    Items: ``cond`` (M, d, h, w), ``coords`` (3, d, h, w), ``mask``, ``r0``, ``target``
    (1, d, h, w), ``case_index`` and ``start`` (int64 (3,), D, H, W order).
    """

    def __init__(
        self,
        prepared_cases: Sequence[PreparedCase],
        crop_size: Sequence[int] = (64, 64, 64),
        samples_per_case: int = 1,
        seed: int = 0,
        offset_multiple: int = 1,
        halo: int = 0,
    ):
        self.cases = list(prepared_cases)
        if not self.cases:
            raise DatasetError("RandomCropDataset needs at least one prepared case")
        size = tuple(int(s) for s in crop_size)
        if len(size) != 3 or min(size) < 1:
            raise InputError(f"crop_size must be three positive sizes (D, H, W), got {tuple(crop_size)}")
        for name, value, low in (("samples_per_case", samples_per_case, 1), ("seed", seed, 0),
                                 ("offset_multiple", offset_multiple, 1), ("halo", halo, 0)):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        m = {c.n_conditions for c in self.cases}
        if len(m) != 1:
            raise DatasetError(f"prepared cases have different numbers of conditions {sorted(m)}")
        for c in self.cases:
            if any(s > n for s, n in zip(size, c.shape)):
                raise GeometryError(
                    f"crop {size} (D, H, W) is larger than case {c.case_id}'s grid {c.shape}; "
                    "use a smaller crop or pad the volumes"
                )
        self.crop_size = size
        self.samples_per_case = int(samples_per_case)
        self.seed = int(seed)
        self.offset_multiple = int(offset_multiple)
        self.halo = int(halo)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the crop positions of ``epoch`` (call before iterating each epoch)."""
        if int(epoch) != epoch or epoch < 0:
            raise InputError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_case

    def crop_start(self, item: int) -> tuple[int, int, int]:
        """(D, H, W) start of item ``item`` in the current epoch (deterministic)."""
        case = self.cases[item // self.samples_per_case]
        rng = np.random.default_rng((self.seed, self.epoch, int(item)))
        m = self.offset_multiple
        return tuple(
            int(rng.integers(0, (n - s) // m + 1)) * m for n, s in zip(case.shape, self.crop_size)
        )

    def __getitem__(self, item: int) -> dict:
        n = len(self)
        item = int(item)
        if item < 0:
            item += n
        if not 0 <= item < n:
            raise IndexError(f"item {item} out of range for {n} crops")
        case_index = item // self.samples_per_case
        case = self.cases[case_index]
        start = self.crop_start(item)
        sl = tuple(slice(a, a + s) for a, s in zip(start, self.crop_size))
        out = {
            "cond": np.array(case.conditions[(slice(None), *sl)], dtype=np.float32),
            "coords": np.array(case.coords[(slice(None), *sl)], dtype=np.float32),
            "mask": np.array(case.mask[sl][None], dtype=np.float32),
            "r0": np.array(case.r0[sl][None], dtype=np.float32),
            "target": np.array(case.target[sl][None], dtype=np.float32),
            "case_index": case_index,
            "start": np.asarray(start, dtype=np.int64),
        }
        if self.halo:
            idx = [_window(a, s, n_ax, self.halo) for a, s, n_ax in zip(start, self.crop_size, case.shape)]
            grid = np.ix_(idx[0], idx[1], idx[2])
            out["cond_halo"] = np.ascontiguousarray(
                np.asarray(case.conditions)[(slice(None), *grid)], dtype=np.float32
            )
        return out
