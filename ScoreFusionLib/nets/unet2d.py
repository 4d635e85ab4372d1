"""The 2D plane model: a guided-diffusion style conditional U-Net (method.md §3.3).

``UNet2D(config)(x, gamma)`` predicts the noise of the residual slice from the stacked
input channels of §3.2 and the continuous noise level γ. With ``return_features=True`` it
also returns the decoder features the fuser aligns into its encoder (§4.5): the output of
the first decoder block of every level, keyed by downsampling factor.

This module imports torch at file scope; import it only where torch is needed (the
package itself stays importable without torch).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..errors import InputError
from .blocks2d import AttentionBlock2d, EmbedSequential, GroupNorm32, ResBlock2d, zero_module
from .configs import UNet2DConfig
from .embedding import NoiseLevelEmbedding

_REINIT_TYPES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
)


class UNet2D(nn.Module):
    """Conditional ε-prediction U-Net for one slicing axis.

    Layout: 3x3 input conv; per encoder level ``num_res_blocks`` residual blocks (plus
    attention on ``attention_levels``) and a down-sampling residual block between levels;
    middle ResBlock -> attention (if ``mid_attention``) -> ResBlock; per decoder level, in
    reverse, ``num_res_blocks + 1`` blocks that each take one encoder skip, with an
    up-sampling residual block closing every level but the finest; GroupNorm, SiLU and a
    zero-initialised 3x3 output conv, so a fresh network predicts exactly zero.
    """

    def __init__(self, config: UNet2DConfig) -> None:
        super().__init__()
        if not isinstance(config, UNet2DConfig):
            raise InputError(f"UNet2D needs a UNet2DConfig, got {type(config).__name__}")
        self.config = config
        cfg = config
        emb_ch = cfg.embedding_channels
        groups = cfg.norm_groups

        def res(cin: int, cout: int, resample: str | None = None) -> ResBlock2d:
            return ResBlock2d(cin, cout, emb_ch, cfg.dropout, groups, resample)

        def attn(ch: int) -> AttentionBlock2d:
            return AttentionBlock2d(ch, cfg.head_channels, groups)

        self.embedding = NoiseLevelEmbedding(cfg.base_channels, cfg.noise_embedding)
        ch = cfg.level_channels[0]
        self.input_conv = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.encoder = nn.ModuleList()
        skip_channels = [ch]
        for level, level_ch in enumerate(cfg.level_channels):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, level_ch)]
                ch = level_ch
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                self.encoder.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level < cfg.levels - 1:
                self.encoder.append(EmbedSequential(res(ch, ch, "down")))
                skip_channels.append(ch)

        middle: list[nn.Module] = [res(ch, ch)]
        if cfg.mid_attention:
            middle.append(attn(ch))
        middle.append(res(ch, ch))
        self.middle = EmbedSequential(*middle)

        self.decoder = nn.ModuleList()
        self._feature_blocks: dict[int, int] = {}  # decoder block index -> downsampling factor
        for level in reversed(range(cfg.levels)):
            level_ch = cfg.level_channels[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), level_ch)]
                ch = level_ch
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                if i == 0:
                    self._feature_blocks[len(self.decoder)] = 2**level
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, "up"))
                self.decoder.append(EmbedSequential(*layers))
        assert not skip_channels

        self.out = nn.Sequential(
            GroupNorm32(groups, ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    @property
    def required_divisor(self) -> int:
        """Height and width of the input must be multiples of this."""
        return self.config.required_divisor

    @property
    def feature_channels(self) -> dict[int, int]:
        """Channels of the returned decoder features, keyed by downsampling factor."""
        return self.config.feature_channels

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _noise_levels(self, x: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
        """Validate the inputs and return γ as a ``(B,)`` float tensor on ``x``'s device."""
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise InputError(f"UNet2D input must be a torch tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise InputError(f"UNet2D input must be (B, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputError(f"UNet2D input must be floating point, got {x.dtype}")
        b, c, hgt, wid = x.shape
        if c != cfg.in_channels:
            raise InputError(
                f"UNet2D expects {cfg.in_channels} input channels, got {c} (shape {tuple(x.shape)})"
            )
        d = cfg.required_divisor
        if hgt % d or wid % d:
            raise InputError(
                f"UNet2D input height and width must be multiples of {d} for {cfg.levels} levels, "
                f"got {hgt}x{wid}; pad the slices first"
            )
        if isinstance(gamma, bool):
            raise InputError("gamma must be a float or a tensor of noise levels, got a bool")
        if isinstance(gamma, numbers.Real):
            # float64 keeps a tiny python γ exact for the log-SNR embedding (MPS has no float64)
            dtype = torch.float32 if x.device.type == "mps" else torch.float64
            return torch.full((b,), float(gamma), dtype=dtype, device=x.device)
        if not isinstance(gamma, torch.Tensor):
            raise InputError(f"gamma must be a float or a torch tensor, got {type(gamma).__name__}")
        if gamma.ndim == 0:
            gamma = gamma.expand(b)
        elif tuple(gamma.shape) != (b,):
            raise InputError(f"gamma must have shape ({b},) or be a scalar, got {tuple(gamma.shape)}")
        return gamma.to(device=x.device)

    def forward(
        self, x: torch.Tensor, gamma: torch.Tensor | float, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Predict the noise of the noisy slice.

        Parameters
        ----------
        x
            ``(B, in_channels, H, W)``; H and W multiples of :attr:`required_divisor`.
        gamma
            ``(B,)`` noise levels γ = ᾱ in (0, 1], or a scalar shared by the batch.
        return_features
            Also return ``{factor: (B, feature_channels[factor], H / factor, W / factor)}``,
            the first decoder block of each level (coarsest first).

        Returns
        -------
        ``eps`` of shape ``(B, out_channels, H, W)``, or ``(eps, features)``.
        """
        gamma = self._noise_levels(x, gamma)
        emb = self.embedding(gamma)
        h = self.input_conv(x)
        skips = [h]
        for block in self.encoder:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        features: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.decoder):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            factor = self._feature_blocks.get(index)
            if factor is not None and return_features:
                features[factor] = h
        eps = self.out(h)
        return (eps, features) if return_features else eps


def kaiming_reinit_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialise like the official 2D training script; returns ``model``.

    Every Conv/Linear weight gets Kaiming-normal (fan-in, gain sqrt(2)) and every such bias
    zero. This overrides the zero initialisations (output conv, residual branches,
    attention projections), so a re-initialised plane model no longer starts at zero.
    Optional and acceptable for plane models only: never apply it to the fuser, whose zero
    head and alignment convs must stay zero (method.md §10.11). Norm layers are untouched.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _REINIT_TYPES):
                nn.init.kaiming_normal_(module.weight, a=0.0, mode="fan_in", generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
    return model
