"""The ``score-fusion`` mode: plane estimates fused per voxel by the trained 3D fuser (method.md 4.4-4.6).

At fused step ``t`` every plane model of every condition group scores the whole volume slice
by slice (at ``gamma = abar_t``); the fuser sees the noisy residual, all conditions, the
coordinates, the mask and the N detached estimates, and its head gives per-voxel weight
offsets and a bias, combined by :func:`~ScoreFusionLib.fusion.weights.fuse_estimates`.

**Condition groups (route A, 4.6).** A group is a set of plane models trained on the residual
relative to *its own* reference condition ``c_j``. Its models get the re-based state
``r_t + sqrt(abar_t) (c_ref - c_j) / 2``, which is exactly the forward process applied to their
residual with the same noise, so all N estimates predict the same ε.

**Feature alignment (4.5).** With alignment layers, each plane's decoder features are pushed
through the alignment convolutions as soon as a batch of slices is scored (kernel = stride =
f along the slicing axis, so chunks aligned to f give exactly the full-stack result); only
the fuser-grid sums are kept, never the full-resolution stacks.

**Tiling (6.6).** The fuser runs over overlapping tiles and only its head is blended (see
:mod:`.tiling`); plane scoring always covers full slices in memory-bounded batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .slice_scorer import SliceScorer, VolumeConditioning
from .tiling import TilePlan, run_tiled

#: Name of the group of plane models conditioned on the reference condition; its sources are
#: named by plane alone ("axial"), those of other groups "<group>/<plane>".
MAIN_GROUP = "main"


@dataclass(frozen=True)
class PlaneGroup:
    """Plane models sharing one conditioning (route A: one group per condition).

    name : group name (``main`` for the models conditioned on ``c_ref``).
    scorers : plane -> :class:`SliceScorer`.
    cond : the group's own conditioning (its conditions, the shared coordinates, the mask of
        its reference condition), i.e. what its models were trained on.
    reference : index into the fused task's conditions of the group's reference ``c_j``.
    """

    name: str
    scorers: Mapping[str, SliceScorer]
    cond: VolumeConditioning
    reference: int = 0

    def source(self, plane: str) -> str:
        """Alignment-source name of one of the group's planes."""
        return plane if self.name == MAIN_GROUP else f"{self.name}/{plane}"


def rebase_noisy_state(r_t: Any, abar_t: float, c_ref: Any, c_group: Any) -> Any:
    """The state a group trained on ``(y - c_group)/2`` expects: ``r_t + sqrt(abar_t) (c_ref - c_group)/2``.

    ``(y - c_group)/2 = r0 + (c_ref - c_group)/2`` and the forward process adds the same noise,
    so this equals ``q_sample`` of the group's residual with the noise of ``r_t``.
    """
    return r_t + math.sqrt(float(abar_t)) * (c_ref - c_group) / 2.0


class FeatureAccumulator:
    """Fuser-grid sums of the aligned plane features, filled while slices are scored.

    Parameters
    ----------
    alignment : a :class:`~ScoreFusionLib.nets.alignment.FeatureAlignment`.
    injection_channels : factor -> fuser channels at that injection point.
    shape : (D, H, W) of the volume; every side a multiple of the largest factor.
    """

    def __init__(self, alignment: Any, injection_channels: Mapping[int, int], shape: Sequence[int],
                 device: Any = None) -> None:
        import torch

        self.alignment = alignment
        self.shape = tuple(int(s) for s in shape)
        self.factors = tuple(sorted(int(f) for f in injection_channels))
        for f in self.factors:
            if any(s % f for s in self.shape):
                raise InputError(f"volume sides {self.shape} must be multiples of the alignment factor {f}")
        self.buffers = {
            f: torch.zeros((1, int(injection_channels[f]), *(s // f for s in self.shape)), device=device)
            for f in self.factors
        }

    @property
    def slice_multiple(self) -> int:
        """Slice batches must start and end on multiples of this (the largest factor)."""
        return max(self.factors)

    def sink(self, source: str, axis: int) -> Callable[[int, int, Mapping[int, Any]], None]:
        """A callback for :class:`SliceScorer`: aligns features of slices ``start .. stop - 1`` and adds them."""
        import torch

        def add(start: int, stop: int, features: Mapping[int, Any]) -> None:
            for f in self.factors:
                if start % f or stop % f:
                    raise InputError(f"slice batch {start}..{stop} is not aligned to the factor {f}")
                chunk = features[f].movedim(0, 1).movedim(1, 1 + axis)[None]  # (1, C, ...), slicing axis = S
                aligned = self.alignment.align(source, f, chunk.to(self.buffers[f].dtype))
                index = [slice(None)] * 5
                index[2 + axis] = slice(start // f, stop // f)
                if torch.is_grad_enabled() and aligned.requires_grad:
                    # training: keep the graph (an in-place add into a shared buffer cannot be differentiated)
                    padded = torch.zeros_like(self.buffers[f])
                    padded[tuple(index)] = aligned
                    self.buffers[f] = self.buffers[f] + padded
                else:
                    self.buffers[f][tuple(index)] += aligned

        return add


class ScoreFusionModel:
    """``eps_model(r_t, t, abar_t)`` of the ``score-fusion`` mode, for the samplers and for training.

    Parameters
    ----------
    fuser : a :class:`~ScoreFusionLib.nets.score_fuser.ScoreFuser` (network + optional alignment).
    groups : the plane-model groups; their estimates are stacked in group order, then plane order.
    cond : the fused task's conditioning: all conditions (``conditions[0]`` = ``c_ref``), the
        coordinates and the reference mask -- the fuser's inputs.
    tile_size : fuser tile side (multiple of 8); ``None`` runs the fuser on the whole volume.
    autocast : context-manager factory wrapped around the network calls (mixed precision on GPU).
    """

    def __init__(self, fuser: Any, groups: Sequence[PlaneGroup], cond: VolumeConditioning,
                 tile_size: int | None = None, autocast: Callable[[], Any] | None = None) -> None:
        self.fuser = fuser
        self.groups = list(groups)
        self.cond = cond
        self.config = fuser.config
        self.autocast = autocast or contextlib.nullcontext
        n = sum(len(g.scorers) for g in self.groups)
        if n != self.config.n_estimates:
            raise InputError(
                f"the fuser fuses {self.config.n_estimates} estimates but the groups hold {n} plane models"
            )
        expected = 1 + int(cond.conditions.shape[0]) + 3 + 1 + n
        if expected != self.config.in_channels:
            raise InputError(
                f"the fuser takes {self.config.in_channels} input channels; this conditioning gives {expected} "
                f"(residual, {cond.conditions.shape[0]} conditions, 3 coordinates, mask, {n} estimates)"
            )
        sources = {g.source(p) for g in self.groups for p in g.scorers}
        wanted = {s for s, _ in self.config.aligned_sources}
        if wanted and wanted != sources:
            raise InputError(
                f"the fuser aligns features of {sorted(wanted)} but the plane models are {sorted(sources)}"
            )
        multiple = max(self.config.required_divisor, *(f for f, _ in self.config.aligned_channels or [(1, 0)]))
        self.multiple = int(multiple)
        if any(s % self.multiple for s in cond.shape):
            raise InputError(f"volume sides {cond.shape} must be multiples of {self.multiple} for this fuser")
        side = tile_size or math.ceil(max(cond.shape) / self.multiple) * self.multiple
        if side % self.multiple:
            raise InputError(f"the tile size must be a multiple of {self.multiple} for this fuser, got {side}")
        self.plan = TilePlan(cond.shape, side, self.multiple)

    @property
    def aligned(self) -> bool:
        return bool(self.config.aligned_sources)

    def estimates(self, r_t: Any, abar_t: float) -> tuple[Any, dict[int, Any] | None]:
        """The N plane estimates ``(1, N, D, H, W)`` (detached) and the aligned feature sums (or ``None``)."""
        import torch

        accumulator = None
        if self.aligned:
            accumulator = FeatureAccumulator(self.fuser.alignment, {f: self.config.injection_channels(f)
                                                                    for f, _ in self.config.aligned_channels},
                                             self.cond.shape, r_t.device)
        c_ref = self.cond.conditions[0:1]
        eps = torch.empty((1, self.config.n_estimates, *self.cond.shape), dtype=torch.float32, device=r_t.device)
        k = 0
        for group in self.groups:
            state = r_t
            if group.reference != 0:
                c_group = self.cond.conditions[group.reference : group.reference + 1]
                state = rebase_noisy_state(r_t, abar_t, c_ref, c_group)
            for plane, scorer in group.scorers.items():
                sink = accumulator.sink(group.source(plane), scorer.axis) if accumulator is not None else None
                with self.autocast():
                    eps[0, k] = scorer(state, abar_t, group.cond, feature_sink=sink)[0]
                k += 1
        return eps, (accumulator.buffers if accumulator is not None else None)

    def fuser_input(self, r_t: Any, eps: Any, region: tuple[slice, slice, slice] | None = None) -> Any:
        """Channel stack ``(1, C, d, h, w)`` of ``region`` (default: everything): residual, conditions,
        coordinates, mask, estimates (4.4). Tiles cut their own region, so the whole-volume stack
        never exists while tiling."""
        import torch

        c = self.cond
        sl = (slice(None), *(region or (slice(None),) * 3))
        parts = [r_t[sl], c.conditions[sl], c.coords[sl], c.mask[sl], eps[0][sl].to(r_t.dtype)]
        return torch.cat(parts, dim=0)[None]

    def head(self, r_t: Any, t: int, eps: Any, aligned: Mapping[int, Any] | None) -> Any:
        """Blended fuser head ``(1, N, D, H, W)`` over the tile plan."""

        def one_tile(start: tuple[int, int, int]) -> Any:
            x = self.fuser_input(r_t, eps, self.plan.slices(start))
            feats = None
            if aligned is not None:
                feats = {f: a[(slice(None), slice(None), *self.plan.slices(start, f))] for f, a in aligned.items()}
            with self.autocast():
                return self.fuser.net(x, t, feats).float()

        return run_tiled(one_tile, self.plan, self.config.n_estimates, r_t.device)

    def fuse(self, head: Any, eps: Any) -> Any:
        from .weights import fuse_estimates

        return fuse_estimates(head, eps, self.config.bias_scale)[0]

    def __call__(self, r_t: Any, t: int, abar_t: float) -> Any:
        """The fused noise estimate ``(1, D, H, W)`` for sampling (never builds a graph)."""
        import torch

        with torch.no_grad():
            eps, aligned = self.estimates(r_t, abar_t)
            return self.fuse(self.head(r_t, t, eps, aligned), eps)
