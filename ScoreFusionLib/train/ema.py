"""Exponential moving average of a network's weights, updated after every optimiser step.

Update number ``n`` (0-based: ``n`` updates happened before it) uses the decay

    d_n = min(decay, (1 + n) / (10 + n))      (warm-up on, the default)
    d_n = decay                               (warm-up off, the official Palette rule)

and sets, for every parameter, ``ema <- d_n * ema + (1 - d_n) * param``; buffers are
copied. Why the warm-up: with the paper's decay 0.9999 and no warm-up the average still
holds ``0.9999**10000 = 37 %`` of the random initialisation after 10k steps, so short runs
(and every CPU demo) would validate and ship an almost untrained network. The warm-up
(d_0 = 0.1, d_90 = 0.91, reaching 0.9999 after ~90k updates) lets the average follow the
raw weights early and converges to the plain rule for long runs.
"""

from __future__ import annotations

from typing import Any


def ema_decay_at(updates_done: int, decay: float, warmup: bool = True) -> float:
    """The effective decay of the update that follows ``updates_done`` earlier updates."""
    if not warmup:
        return float(decay)
    n = int(updates_done)
    return min(float(decay), (1.0 + n) / (10.0 + n))


class EMA:
    """EMA copy of a module (``module``), kept in float32 next to the trained network.

    Parameters
    ----------
    model : the network being trained (unwrapped, not the DDP wrapper); it is deep-copied.
    decay : the target decay (paper: 0.9999).
    warmup : use the warm-up rule of the module docstring.

    The copy never requires gradients and stays in eval mode, so it can be validated at any
    time. :meth:`state` / :meth:`load_state` carry the update count for exact resumption.
    """

    def __init__(self, model: Any, decay: float = 0.9999, warmup: bool = True) -> None:
        import copy

        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()

    def current_decay(self) -> float:
        """Decay the next :meth:`update` will use."""
        return ema_decay_at(self.updates, self.decay, self.warmup)

    def update(self, model: Any) -> float:
        """Fold ``model``'s current weights into the average; returns the decay used."""
        import torch

        d = self.current_decay()
        with torch.no_grad():
            for ema_p, p in zip(self.module.parameters(), model.parameters()):
                ema_p.mul_(d).add_(p.detach().to(ema_p.dtype), alpha=1.0 - d)
            for ema_b, b in zip(self.module.buffers(), model.buffers()):
                ema_b.copy_(b)
        self.updates += 1
        return d

    def state_dict(self) -> dict:
        """The averaged weights (the EMA network's ``state_dict``)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

    def state(self) -> dict:
        """JSON-ready bookkeeping (decay, warm-up, update count)."""
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "rule": "min(decay, (1+n)/(10+n))" if self.warmup else "decay"}

    def load_state(self, state: dict) -> None:
        self.updates = int(state["updates"])
