"""Noise-level embeddings (method.md §2.4).

Plane models are conditioned on the continuous noise level γ = ᾱ in (0, 1], embedded with
sinusoids of the *raw* γ like the official code; the 3D fuser embeds its integer step t
with the same :func:`sinusoidal_features`. The embedding a model was trained with must be
used unchanged at sampling time, so its name is part of the network configuration.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from .configs import NOISE_EMBEDDINGS

#: Largest frequency period of the sinusoids (frequencies are ``MAX_PERIOD ** (-k / half)``).
MAX_PERIOD = 10000.0

#: The log-SNR variant clamps log(γ / (1 - γ)) to +-this, so γ = 0 or 1 stays finite.
LOGSNR_CLAMP = 20.0


def sinusoidal_features(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features ``[cos(v f_k), sin(v f_k)]`` (cos first) of a batch of scalars.

    Parameters
    ----------
    values
        Shape ``(B,)``: raw γ for plane models, the step index t for the fuser.
    dim
        Even feature width; ``f_k = 10000 ** (-k / (dim / 2))`` for ``k = 0 .. dim/2 - 1``.

    Returns
    -------
    torch.Tensor
        ``(B, dim)`` float32 (computed in float32 whatever the input dtype, so half-precision
        inputs cannot lose the argument's resolution).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise InputError(f"sinusoidal feature width must be a positive even integer, got {dim!r}")
    if values.ndim != 1:
        raise InputError(f"sinusoidal features expect a 1D batch of scalars, got shape {tuple(values.shape)}")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=values.device)
    freqs = torch.exp(-math.log(MAX_PERIOD) * k / half)
    args = values.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def noise_level_values(gamma: torch.Tensor, kind: str = "gamma-sinusoidal") -> torch.Tensor:
    """The scalar that enters the sinusoid for noise level ``gamma`` under embedding ``kind``.

    ``gamma-sinusoidal`` passes γ unchanged (official; nearly constant below γ = 1e-2).
    ``log-snr`` uses log(γ / (1 - γ)) clamped to ``±LOGSNR_CLAMP``, which separates the
    high-noise levels the raw γ cannot; computed in float64 where the device supports it.
    """
    if kind == "gamma-sinusoidal":
        return gamma.to(torch.float32)
    if kind == "log-snr":
        work = torch.float32 if gamma.device.type == "mps" else torch.float64
        g = gamma.to(work).clamp(1e-30, 1.0)
        logsnr = torch.log(g) - torch.log1p(-g.clamp(max=1.0 - 1e-12))
        return logsnr.clamp(-LOGSNR_CLAMP, LOGSNR_CLAMP).to(torch.float32)
    raise InputError(f"unknown noise embedding {kind!r}; expected one of {NOISE_EMBEDDINGS}")


class NoiseLevelEmbedding(nn.Module):
    """γ -> sinusoidal features (width ``dim``) -> Linear(dim, 4 dim) -> SiLU -> Linear(4 dim, 4 dim)."""

    def __init__(self, dim: int, kind: str = "gamma-sinusoidal") -> None:
        super().__init__()
        if kind not in NOISE_EMBEDDINGS:
            raise InputError(f"unknown noise embedding {kind!r}; expected one of {NOISE_EMBEDDINGS}")
        if dim < 2 or dim % 2:
            raise InputError(f"noise embedding width must be a positive even integer, got {dim}")
        self.dim = dim
        self.kind = kind
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, 4 * dim))

    @property
    def out_dim(self) -> int:
        """Width of the embedding given to the residual blocks."""
        return 4 * self.dim

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        """``(B,)`` noise levels -> ``(B, 4 dim)`` embedding."""
        feats = sinusoidal_features(noise_level_values(gamma, self.kind), self.dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kind={self.kind!r}"
