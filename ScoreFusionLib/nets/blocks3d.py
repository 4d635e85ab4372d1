"""Building blocks of the 3D fuser U-Net (method.md §4.4).

The fuser follows the med-ddpm / guided-diffusion 3D U-Net of the official code: residual
blocks take the time embedding ADDITIVELY (no scale-shift norm), down-sampling is a
stride-2 convolution and up-sampling is nearest-neighbour x2 followed by a convolution.
The last convolution of every residual branch starts at zero, so a fresh residual block is
its skip path. Normalisation reuses :class:`~ScoreFusionLib.nets.blocks2d.GroupNorm32`,
which computes in float32 even under half-precision autocast (§10.8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .blocks2d import GroupNorm32, zero_module


class ResBlock3d(nn.Module):
    """GN -> SiLU -> conv3 -> + Linear(SiLU(emb)) -> GN -> SiLU -> dropout -> conv3, plus skip.

    Parameters
    ----------
    in_channels, out_channels
        Channel counts; a 1x1x1 convolution maps the skip path when they differ.
    emb_channels
        Width of the time embedding.
    dropout
        Dropout probability before the second convolution.
    norm_groups
        GroupNorm groups (must divide both channel counts).
    """

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, dropout: float = 0.0, norm_groups: int = 32
    ) -> None:
        super().__init__()
        for ch in (in_channels, out_channels):
            if ch % norm_groups:
                raise InputError(f"{norm_groups} norm groups do not divide {ch} channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.in_norm = GroupNorm32(norm_groups, in_channels)
        self.in_conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels)
        self.out_norm = GroupNorm32(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv3d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x`` (B, in, D, H, W), ``emb`` (B, E) -> (B, out, D, H, W)."""
        h = self.in_conv(F.silu(self.in_norm(x)))
        h = h + self.emb_proj(F.silu(emb)).to(h.dtype)[:, :, None, None, None]
        h = self.out_conv(self.dropout(F.silu(self.out_norm(h))))
        return self.skip(x) + h

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}"


class Downsample3d(nn.Module):
    """Halve every spatial side with a learned 3x3x3 convolution of stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3d(nn.Module):
    """Double every spatial side: nearest-neighbour repeat, then a 3x3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
