"""Building blocks of the 2D plane U-Net (method.md §3.3).

A residual block is conditioned on the noise-level embedding through scale-shift norm
(FiLM: ``GN(h) * (1 + scale) + shift``) and can resample inside itself, as the official
network does with ``resblock_updown``. The last convolution of every residual branch and
the output projection of attention start at zero, so a fresh block is an identity (or a
1x1 projection) of its input; :func:`ScoreFusionLib.nets.unet2d.kaiming_reinit_` can
override that for plane models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 whatever the activation dtype (method.md §10.8)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(work)
        bias = None if self.bias is None else self.bias.to(work)
        out = F.group_norm(x.to(work), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


class ResBlock2d(nn.Module):
    """Residual block with scale-shift norm, dropout and optional 2x down/up-sampling.

    Parameters
    ----------
    in_channels, out_channels
        Channel counts; a 1x1 convolution maps the skip path when they differ.
    emb_channels
        Width of the noise-level embedding.
    dropout
        Dropout probability before the second convolution.
    norm_groups
        GroupNorm groups (must divide both channel counts).
    resample
        ``None``, ``"down"`` (2x2 average pool) or ``"up"`` (nearest x2), applied to both
        paths between the first normalisation and the first convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        norm_groups: int = 32,
        resample: str | None = None,
    ) -> None:
        super().__init__()
        if resample not in (None, "down", "up"):
            raise InputError(f"resample must be None, 'down' or 'up', got {resample!r}")
        for ch in (in_channels, out_channels):
            if ch % norm_groups:
                raise InputError(f"{norm_groups} norm groups do not divide {ch} channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample = resample
        self.in_norm = GroupNorm32(norm_groups, in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.out_norm = GroupNorm32(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x`` (B, in, H, W), ``emb`` (B, E) -> (B, out, H', W')."""
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        scale, shift = self.emb_proj(F.silu(emb)).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(self._resample(x)) + h

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, resample={self.resample}"


class AttentionBlock2d(nn.Module):
    """Multi-head self-attention over all pixels, residual, with a zero-initialised output.

    Uses :func:`torch.nn.functional.scaled_dot_product_attention`, so fused (flash or
    memory-efficient) kernels are picked where available.
    """

    def __init__(self, channels: int, head_channels: int = 32, norm_groups: int = 32) -> None:
        super().__init__()
        if channels % head_channels:
            raise InputError(f"{head_channels} channels per head do not divide {channels} channels")
        self.channels = channels
        self.heads = channels // head_channels
        self.norm = GroupNorm32(norm_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, H, W) -> same shape; ``emb`` is ignored (uniform block signature)."""
        b, c, hgt, wid = x.shape
        tokens = hgt * wid
        qkv = self.qkv(self.norm(x).reshape(b, c, tokens))
        # (B, 3C, T) -> 3 x (B, heads, T, head_channels), head channels contiguous for fused kernels
        qkv = qkv.transpose(1, 2).reshape(b, tokens, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, tokens, c).transpose(1, 2)
        return x + self.proj_out(out).reshape(b, c, hgt, wid)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}"


class EmbedSequential(nn.Sequential):
    """A sequence of blocks that all take ``(x, emb)``: one U-Net "block" of the official list."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for module in self:
            x = module(x, emb)
        return x
