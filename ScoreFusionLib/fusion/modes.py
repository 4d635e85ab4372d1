"""Fusion modes that need no trained fuser: ``single``, ``tpdm`` and ``average`` (method.md 4.1-4.3).

Each mode is an epsilon model ``eps_model(r_t, t, abar_t)`` for the samplers of
:mod:`ScoreFusionLib.diffusion.samplers`. Plane models are always queried at
``gamma = abar_t``, the exact noise level of the current state (method.md 2.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .slice_scorer import SliceScorer, VolumeConditioning

PLANE_FREE_MODES = ("single", "tpdm", "average")

#: TPDM plane probabilities of the official re-implementation: two planes 0.5/0.5; three
#: planes axial 0.1, coronal 0.6, sagittal 0.3.
DEFAULT_TPDM_PROBABILITIES = {
    ("coronal", "sagittal"): {"coronal": 0.5, "sagittal": 0.5},
    ("axial", "coronal", "sagittal"): {"axial": 0.1, "coronal": 0.6, "sagittal": 0.3},
}


def default_tpdm_probabilities(planes: Sequence[str]) -> dict[str, float]:
    """Official probabilities for the usual plane sets, uniform otherwise."""
    key = tuple(sorted(planes, key=("axial", "coronal", "sagittal").index))
    return dict(DEFAULT_TPDM_PROBABILITIES.get(key, {p: 1.0 / len(planes) for p in planes}))


class PlaneEnsemble:
    """Combine the noise estimates of several plane scorers into one volume estimate.

    Parameters
    ----------
    scorers : plane name -> :class:`SliceScorer`.
    cond : the fixed conditioning of the volume being translated.
    mode : ``single`` (one plane), ``tpdm`` (one plane per step) or ``average``.
    plane : the plane used by ``single`` (default: sagittal if present, as in the
        official single-model baseline, else the first).
    tpdm_probabilities : plane -> probability for random TPDM plane choice.
    tpdm_cycle : a fixed plane sequence instead (e.g. primary, auxiliary: alternation).
    seed : seeds the TPDM plane choice (its own generator, independent of the noise).
    """

    def __init__(
        self,
        scorers: Mapping[str, SliceScorer],
        cond: VolumeConditioning,
        mode: str = "average",
        plane: str | None = None,
        tpdm_probabilities: Mapping[str, float] | None = None,
        tpdm_cycle: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in PLANE_FREE_MODES:
            raise InputError(f"unknown fusion mode {mode!r}; use one of {', '.join(PLANE_FREE_MODES)}")
        if not scorers:
            raise InputError("at least one plane model is needed")
        self.scorers = dict(scorers)
        self.cond = cond
        self.mode = mode
        self.planes = list(self.scorers)
        self.single_plane = self._pick_single(plane)
        self.cycle = list(tpdm_cycle) if tpdm_cycle else None
        for p in self.cycle or []:
            self._require_plane(p)
        probs = dict(tpdm_probabilities or default_tpdm_probabilities(self.planes))
        for p in probs:
            self._require_plane(p)
        total = sum(probs.values())
        if any(v < 0 for v in probs.values()) or not np.isclose(total, 1.0):
            raise InputError(f"TPDM probabilities must be non-negative and sum to 1, got {probs}")
        self.probabilities = probs
        self._rng = np.random.default_rng(seed)
        self._calls = 0
        #: planes used at each call, in order (for provenance and tests)
        self.history: list[tuple[str, ...]] = []

    def _require_plane(self, plane: str) -> None:
        if plane not in self.scorers:
            raise InputError(f"plane {plane!r} has no model here; available: {', '.join(self.planes)}")

    def _pick_single(self, plane: str | None) -> str:
        if plane is not None:
            self._require_plane(plane)
            return plane
        return "sagittal" if "sagittal" in self.scorers else self.planes[0]

    def planes_for_next_step(self) -> tuple[str, ...]:
        """Which planes the next call evaluates (advances the TPDM choice)."""
        if self.mode == "average":
            return tuple(self.planes)
        if self.mode == "single":
            return (self.single_plane,)
        if self.cycle:
            return (self.cycle[self._calls % len(self.cycle)],)
        names = list(self.probabilities)
        return (str(self._rng.choice(names, p=[self.probabilities[n] for n in names])),)

    def __call__(self, r_t: Any, t: int, abar_t: float) -> Any:
        planes = self.planes_for_next_step()
        self._calls += 1
        self.history.append(planes)
        total = None
        for p in planes:
            eps = self.scorers[p](r_t, abar_t, self.cond)
            total = eps if total is None else total + eps
        return total / len(planes)
