"""Overlapping 3D tiles for the fuser, blended so the volume stays one diffusion state (method.md 6.6).

The fuser's activations are what grows fastest with the volume (dozens of full-resolution
channel maps), so at every denoising step the fuser runs on overlapping tiles and only its
*head outputs* ``(w, b)`` are blended back into volume-sized maps with smooth weights that
sum to one per voxel. Fusion is affine in ``(w, b)`` for fixed plane estimates, so blending
the head equals blending the fused noise; the sampler update then acts on the whole volume
with noise drawn once for all of it, so tiles never see different states.

Tile starts and sizes are multiples of ``multiple`` (8: the coarsest alignment factor and the
fuser's down-sampling grid), so every tile's stride-f windows coincide with the global grid.
The last tile along an axis is shifted inwards instead of padded. A volume that fits in one
tile is processed untiled, which reproduces the untiled result exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

#: Gaussian blending width as a fraction of the tile side (method.md 6.6).
BLEND_SIGMA_FRACTION = 0.125
#: Default overlap between neighbouring tiles, as a fraction of the tile side.
DEFAULT_OVERLAP = 0.25


def _axis_starts(n: int, tile: int, overlap: int, multiple: int) -> list[int]:
    """Starts along one axis: stride ``tile - overlap`` (rounded down to ``multiple``), last tile flush."""
    if tile >= n:
        return [0]
    stride = max((tile - overlap) // multiple * multiple, multiple)
    starts = list(range(0, n - tile, stride))
    starts.append(n - tile)
    return sorted(set(starts))


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of a (D, H, W) volume lie.

    Parameters
    ----------
    shape : volume shape (D, H, W); every side a multiple of ``multiple``.
    tile : tile side (clipped to each axis); a multiple of ``multiple``.
    multiple : alignment of tile starts and sizes.
    overlap : voxels shared by neighbouring tiles (default a quarter of the tile).
    """

    shape: tuple[int, int, int]
    tile: int
    multiple: int = 8
    overlap: int | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"tile plan needs a (D, H, W) shape, got {self.shape}")
        m = int(self.multiple)
        if m < 1 or any(s % m for s in shape):
            raise InputError(f"volume sides {shape} must be multiples of {m} for tiling; pad the volume first")
        tile = int(self.tile)
        if tile < m or tile % m:
            raise InputError(f"tile size must be a positive multiple of {m}, got {self.tile}")
        overlap = int(round(DEFAULT_OVERLAP * tile)) if self.overlap is None else int(self.overlap)
        if not 0 <= overlap < tile:
            raise InputError(f"tile overlap must lie in [0, tile size), got {overlap} for tiles of {tile}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "overlap", overlap)

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Tile extent per axis (the tile side, or the axis length when shorter)."""
        return tuple(min(self.tile, n) for n in self.shape)

    @property
    def starts(self) -> list[tuple[int, int, int]]:
        """Start (D, H, W) of every tile, in a fixed order."""
        per_axis = [_axis_starts(n, s, min(self.overlap, s - self.multiple), self.multiple)
                    for n, s in zip(self.shape, self.sizes)]
        return [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]

    @property
    def single(self) -> bool:
        """True when one tile covers the whole volume (the untiled computation)."""
        return len(self.starts) == 1

    def slices(self, start: Sequence[int], factor: int = 1) -> tuple[slice, slice, slice]:
        """Index of a tile on the grid downsampled by ``factor`` (for aligned feature maps)."""
        return tuple(slice(a // factor, (a + s) // factor) for a, s in zip(start, self.sizes))


def blend_weights(sizes: Sequence[int], device: Any = None) -> Any:
    """Separable Gaussian weights of one tile, peak 1 at its centre (sigma = 0.125 x side)."""
    import torch

    profiles = []
    for s in sizes:
        pos = torch.arange(s, dtype=torch.float32, device=device) - (s - 1) / 2.0
        sigma = max(BLEND_SIGMA_FRACTION * s, 1e-3)
        profiles.append(torch.exp(-0.5 * (pos / sigma) ** 2))
    return profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]


def run_tiled(fn: Callable[[tuple[int, int, int]], Any], plan: TilePlan, channels: int, device: Any = None) -> Any:
    """Blend ``fn(start) -> (1, channels, *plan.sizes)`` over all tiles into a (1, channels, D, H, W) map.

    With a single tile the tile's output is returned unchanged (exactly the untiled result);
    otherwise every voxel's value is the weight-normalised sum of the tiles covering it, which
    does not depend on the order the tiles are visited in.
    """
    import torch

    if plan.single:
        return fn(plan.starts[0])
    total = torch.zeros((1, channels, *plan.shape), dtype=torch.float32, device=device)
    weight_sum = torch.zeros(plan.shape, dtype=torch.float32, device=device)
    w = blend_weights(plan.sizes, device)
    for start in plan.starts:
        out = fn(start)
        if tuple(out.shape) != (1, channels, *plan.sizes):
            raise InputError(f"tile output has shape {tuple(out.shape)}, expected {(1, channels, *plan.sizes)}")
        sl = plan.slices(start)
        total[(slice(None), slice(None), *sl)] += out.float() * w
        weight_sum[sl] += w
    return total / weight_sum


def estimate_fuser_bytes_per_voxel(level_channels: Sequence[int], num_res_blocks: int, dtype_bytes: int = 4) -> float:
    """Rough inference working set of the fuser per input voxel (activations and skips, no grad).

    Each level keeps ``num_res_blocks + 1`` skip maps and a few working maps; coarser levels
    hold ``8**-l`` as many voxels. A factor 2 covers concatenation buffers and allocator slack.
    The benchmark (``benchmarks/sampling.py``) compares this estimate with measured peaks.
    """
    per = sum(c * (num_res_blocks + 5) / 8**level for level, c in enumerate(level_channels))
    return 2.0 * per * dtype_bytes


def auto_tile_size(shape: Sequence[int], bytes_per_voxel: float, budget_bytes: float, multiple: int = 8,
                   minimum: int = 32) -> int:
    """Largest tile (multiple of ``multiple``) whose estimated working set fits ``budget_bytes``.

    Returns the largest side of ``shape`` when the whole volume fits (no tiling). Never returns
    less than ``minimum`` (rounded to ``multiple``): below that, tiles are mostly overlap.
    """
    longest = max(int(s) for s in shape)
    floor = max(multiple, math.ceil(minimum / multiple) * multiple)

    def fits(side: int) -> bool:
        voxels = math.prod(min(side, int(n)) for n in shape)
        return voxels * bytes_per_voxel <= budget_bytes

    if fits(longest):
        return math.ceil(longest / multiple) * multiple
    side = floor
    while side + multiple < longest and fits(side + multiple):
        side += multiple
    return side


def free_memory_bytes(device: str) -> float:
    """Memory currently free for work on ``device``: CUDA's free memory, or the system's available RAM."""
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    import os

    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
