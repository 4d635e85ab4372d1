"""The x0 hook every sampler applies to its clean estimate: clip, then project (method.md 6.2).

The residual ``r0 = (y - c_ref)/2`` lies in [-1, 1], so clipping ``r0_hat`` is valid. When the
degradation ``A`` is known, the true residual satisfies ``A r0 = 0``, so ``r0_hat`` is then
projected onto the null space of ``A``. The order is fixed: clip first, project second, and
never clip again afterwards -- the projection may leave [-1, 1] slightly, and re-clipping
would break ``A r0_hat = 0`` (pitfall 13). The hook acts on ``r0_hat``, never on the
posterior mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..errors import InputError


class NullSpaceProjector(Protocol):
    """Anything with ``project_null(r, strength)``, e.g. the operators in :mod:`..degradation`."""

    def project_null(self, r: Any, strength: float = 1.0) -> Any: ...


X0Hook = Callable[[Any, int], Any]


def make_x0_hook(
    clip: bool = True,
    projector: NullSpaceProjector | None = None,
    strength: float = 1.0,
) -> X0Hook:
    """Build ``hook(r0_hat, t) -> r0_hat'`` for the samplers.

    Parameters
    ----------
    clip
        Clamp to [-1, 1] first (the residual's valid range).
    projector
        Optional object with ``project_null(r, strength)``; applied after clipping, with
        nothing after it.
    strength
        Projection strength in [0, 1]: 1 is exact consistency (simulated data), smaller values
        a soft projection for noisy measurements (method.md 6.3).

    The hook works on torch tensors and numpy arrays and never modifies its input. ``t`` is
    accepted (the step the estimate was made at) so schedules of strength can be added later.
    """
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"projection strength must lie in [0, 1], got {strength}")
    if projector is not None and not callable(getattr(projector, "project_null", None)):
        raise InputError(f"{projector!r} has no project_null(r, strength) method")

    def hook(r0_hat: Any, t: int) -> Any:
        out = r0_hat
        if clip:
            out = out.clamp(-1.0, 1.0) if hasattr(out, "clamp") else out.clip(-1.0, 1.0)
        if projector is not None:
            out = projector.project_null(out, strength)
        return out

    hook.clip = clip  # type: ignore[attr-defined]
    hook.projector = projector  # type: ignore[attr-defined]
    hook.strength = strength  # type: ignore[attr-defined]
    return hook
