"""Fusion weights of the score-fusion head and the fused noise (method.md §4.4, §10.10).

The fuser's head has N channels per voxel: offsets ``delta_1 .. delta_{N-1}`` and a bias
``b``. The N plane estimates are combined with the affine weights

    w_k = 1/N + delta_k  (k < N),    w_N = 1/N - sum_{k<N} delta_k,

which sum to exactly 1 for any head output (they may be negative: affine, not convex),
plus ``bias_scale * b``. A zero head, as a fresh fuser produces, gives the plain average.

torch is imported inside the functions: :mod:`ScoreFusionLib.fusion` must stay importable
without it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    import torch


def _check_head(head: torch.Tensor) -> None:
    import torch

    if not isinstance(head, torch.Tensor):
        raise InputError(f"fusion head must be a torch tensor, got {type(head).__name__}")
    if head.ndim < 2 or head.shape[1] < 2:
        raise InputError(
            f"fusion head must be (B, N, ...) with N >= 2 channels (N - 1 offsets and a bias), "
            f"got shape {tuple(head.shape)}"
        )
    if not head.is_floating_point():
        raise InputError(f"fusion head must be floating point, got {head.dtype}")


def fusion_weights(head: torch.Tensor) -> torch.Tensor:
    """Per-voxel weights of the N estimates from the head ``(delta_1 .. delta_{N-1}, b)``.

    Parameters
    ----------
    head
        ``(B, N, ...)`` fuser output; the last channel (the bias) does not enter the weights.

    Returns
    -------
    ``(B, N, ...)`` weights ``1/N + delta_k`` for k < N and ``1/N - sum(delta)`` for the
    last, in at least float32. They sum to 1 everywhere: the last weight takes up every
    offset. [C]'s six-model multi-condition fuser leaves one offset out of its last weight,
    so its weights stop summing to 1 once trained and the fused noise is mis-scaled; that is
    a bug, not a design choice (method.md §10.10).
    """
    import torch

    _check_head(head)
    n = head.shape[1]
    delta = head[:, :-1].to(torch.promote_types(head.dtype, torch.float32))
    last = 1.0 / n - delta.sum(dim=1, keepdim=True)
    return torch.cat([delta + 1.0 / n, last], dim=1)


def fuse_estimates(head: torch.Tensor, estimates: torch.Tensor, bias_scale: float = 1.0) -> torch.Tensor:
    """The fused noise ``sum_k w_k * estimates[:, k] + bias_scale * b`` (method.md §4.4).

    Parameters
    ----------
    head
        ``(B, N, ...)`` fuser output ``(delta_1 .. delta_{N-1}, b)``.
    estimates
        ``(B, N, ...)`` plane noise estimates ``eps_1 .. eps_N`` in the order the fuser was
        trained with (its input channels).
    bias_scale
        ``s_b`` (1 for three planes; [C] uses 0.1 in its six-model fuser).

    Returns
    -------
    ``(B, 1, ...)`` in at least float32 (half inputs are cast up, §10.8). Computed as
    ``mean_k(eps_k) + sum_{k<N} delta_k (eps_k - eps_N) + s_b b``, which equals the weighted
    sum of :func:`fusion_weights` and is exactly the plane average for a zero head.
    """
    import torch

    _check_head(head)
    if not isinstance(estimates, torch.Tensor):
        raise InputError(f"plane estimates must be a torch tensor, got {type(estimates).__name__}")
    if not estimates.is_floating_point():
        raise InputError(f"plane estimates must be floating point, got {estimates.dtype}")
    if estimates.shape != head.shape:
        raise InputError(
            f"plane estimates must have the head's shape {tuple(head.shape)} (B, N, ...), "
            f"got {tuple(estimates.shape)}"
        )
    if isinstance(bias_scale, bool) or not isinstance(bias_scale, (int, float)) or not math.isfinite(bias_scale):
        raise InputError(f"bias_scale must be a finite number, got {bias_scale!r}")
    work = torch.promote_types(torch.promote_types(head.dtype, estimates.dtype), torch.float32)
    head = head.to(work)
    est = estimates.to(work)
    delta, bias = head[:, :-1], head[:, -1:]
    spread = (delta * (est[:, :-1] - est[:, -1:])).sum(dim=1, keepdim=True)
    return est.mean(dim=1, keepdim=True) + spread + bias_scale * bias
