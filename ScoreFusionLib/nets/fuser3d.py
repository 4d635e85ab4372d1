"""The 3D fuser: a med-ddpm style U-Net that predicts per-voxel fusion weights (method.md §4.4).

``FuserUNet3D(config)(x, t, aligned)`` maps the fuser input (``r_t``, conditions,
coordinates, mask and the N detached plane estimates) and the fused step t to the head
``(delta_1 .. delta_{N-1}, b)``; :func:`ScoreFusionLib.fusion.weights.fuse_estimates`
turns it into the fused noise. The head conv is zero-initialised, so a fresh fuser gives
exactly the plain average of the planes. Never re-initialise it with a generic scheme
(Kaiming, ...), and never apply weight decay to it or to the alignment convs (§10.11).

This module imports torch at file scope; import it only where torch is needed.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..errors import InputError
from .blocks2d import GroupNorm32, zero_module
from .blocks3d import Downsample3d, ResBlock3d, Upsample3d
from .embedding import sinusoidal_features
from .fuser_config import Fuser3DConfig


class FuserUNet3D(nn.Module):
    """3D U-Net without attention, additive time embedding, zero-initialised N-channel head.

    Layout: replicate-padded 3x3x3 input conv; per encoder level ``num_res_blocks``
    residual blocks and a stride-2 conv between levels; two middle residual blocks; per
    decoder level, in reverse, ``num_res_blocks + 1`` residual blocks that each take one
    encoder skip, with nearest + conv up-sampling closing every level but the finest;
    GroupNorm, SiLU and a zero-initialised replicate-padded 3x3x3 conv to N channels.

    The alignment convs are not part of this module: they live in a
    :class:`~ScoreFusionLib.nets.alignment.FeatureAlignment` built from the same config, and
    :meth:`forward` takes their (summed) output, so a caller can accumulate it slice group
    by slice group (§4.5). The config's alignment fields only say which factors
    :meth:`forward` accepts; they add no parameters, so phase A weights load unchanged
    into a phase-B fuser (§5.4).
    """

    def __init__(self, config: Fuser3DConfig) -> None:
        super().__init__()
        if not isinstance(config, Fuser3DConfig):
            raise InputError(f"FuserUNet3D needs a Fuser3DConfig, got {type(config).__name__}")
        self.config = config
        cfg = config
        emb_ch = cfg.embedding_channels

        def res(cin: int, cout: int) -> ResBlock3d:
            return ResBlock3d(cin, cout, emb_ch, cfg.dropout, cfg.norm_groups)

        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        ch = cfg.level_channels[0]
        self.input_conv = nn.Conv3d(cfg.in_channels, ch, 3, padding=1, padding_mode="replicate")

        self.encoder = nn.ModuleList()
        self._injection: dict[int, int] = {}  # encoder index -> factor added to its output
        skip_channels = [ch]
        for level, level_ch in enumerate(cfg.level_channels):
            after_downsampling = level == cfg.levels - 1 and level > 0  # the coarsest level (§4.5)
            if after_downsampling:
                self._injection[len(self.encoder) - 1] = 2**level
            for i in range(cfg.num_res_blocks):
                self.encoder.append(res(ch, level_ch))
                ch = level_ch
                skip_channels.append(ch)
                if i == 0 and not after_downsampling:
                    self._injection[len(self.encoder) - 1] = 2**level
            if level < cfg.levels - 1:
                self.encoder.append(Downsample3d(ch))
                skip_channels.append(ch)

        self.middle = nn.ModuleList([res(ch, ch), res(ch, ch)])

        self.decoder = nn.ModuleList()
        for level in reversed(range(cfg.levels)):
            level_ch = cfg.level_channels[level]
            for _ in range(cfg.num_res_blocks + 1):
                self.decoder.append(res(ch + skip_channels.pop(), level_ch))
                ch = level_ch
            if level > 0:
                self.decoder.append(Upsample3d(ch))
        assert not skip_channels

        self.out = nn.Sequential(
            GroupNorm32(cfg.norm_groups, ch),
            nn.SiLU(),
            zero_module(nn.Conv3d(ch, cfg.n_estimates, 3, padding=1, padding_mode="replicate")),
        )

    @property
    def required_divisor(self) -> int:
        """Every spatial side of the input must be a multiple of this."""
        return self.config.required_divisor

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of (trainable) parameters (the alignment convs are not part of the network)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _steps(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Validate ``x`` and return the fused steps as a ``(B,)`` float32 tensor on its device."""
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise InputError(f"fuser input must be a torch tensor, got {type(x).__name__}")
        if x.ndim != 5:
            raise InputError(f"fuser input must be (B, C, D, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputError(f"fuser input must be floating point, got {x.dtype}")
        b, c, *sides = x.shape
        if c != cfg.in_channels:
            raise InputError(f"fuser expects {cfg.in_channels} input channels, got {c} (shape {tuple(x.shape)})")
        d = cfg.required_divisor
        if any(side % d for side in sides):
            raise InputError(
                f"fuser input sides must be multiples of {d} for {cfg.levels} levels, got "
                f"{'x'.join(map(str, sides))}; pad the volume first"
            )
        if isinstance(t, bool):
            raise InputError("t must be a step number or a tensor of steps, got a bool")
        if isinstance(t, numbers.Real):
            return torch.full((b,), float(t), dtype=torch.float32, device=x.device)
        if not isinstance(t, torch.Tensor):
            raise InputError(f"t must be a number or a torch tensor, got {type(t).__name__}")
        if t.ndim == 0:
            t = t.expand(b)
        elif tuple(t.shape) != (b,):
            raise InputError(f"t must have shape ({b},) or be a scalar, got {tuple(t.shape)}")
        return t.to(device=x.device, dtype=torch.float32)

    def _check_aligned(self, x: torch.Tensor, aligned: dict[int, torch.Tensor] | None) -> dict[int, torch.Tensor]:
        if aligned is None:
            return {}
        if not isinstance(aligned, dict):
            raise InputError(f"aligned features must be a dict keyed by factor, got {type(aligned).__name__}")
        allowed = [factor for factor, _ in self.config.aligned_channels]
        b, _, *sides = x.shape
        for factor, feature in aligned.items():
            if factor not in allowed:
                raise InputError(
                    f"aligned features for factor {factor!r} are not configured; this fuser aligns {allowed or 'none'}"
                )
            expected = (b, self.config.injection_channels(factor), *(side // factor for side in sides))
            if not isinstance(feature, torch.Tensor) or tuple(feature.shape) != expected:
                got = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
                raise InputError(f"aligned features for factor {factor} must have shape {expected}, got {got}")
        return aligned

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        aligned: dict[int, torch.Tensor] | None = None,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """Predict the fusion head.

        Parameters
        ----------
        x
            ``(B, in_channels, D, H, W)``; every side a multiple of :attr:`required_divisor`.
        t
            The fused step 0..999 (float allowed): a number, a 0-d or a ``(B,)`` tensor.
        aligned
            ``{factor: (B, injection_channels(factor), D/f, H/f, W/f)}``, e.g. from
            :class:`~ScoreFusionLib.nets.alignment.FeatureAlignment`. As in the official
            network, each map is added to the encoder activation that feeds the next block
            (after the first residual block of its level, or after the last down-sampling
            for the coarsest level); the skip saved for the decoder at that point is the
            activation before the addition.
            Factors may be omitted (treated as zero); unconfigured ones are an error.
        checkpoint
            Recompute residual blocks in the backward pass (gradient checkpointing) to
            train on full volumes; the result is the same.

        Returns
        -------
        The head ``(B, n_estimates, D, H, W)``: N - 1 weight offsets, then the bias.
        """
        steps = self._steps(x, t)
        aligned = self._check_aligned(x, aligned)
        emb = self.time_mlp(sinusoidal_features(steps, self.config.time_channels).to(self.time_mlp[0].weight.dtype))

        def run(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
            if not isinstance(block, ResBlock3d):
                return block(h)
            if checkpoint:
                return _checkpoint(block, h, emb, use_reentrant=False)
            return block(h, emb)

        h = self.input_conv(x)
        skips = [h]
        for index, block in enumerate(self.encoder):
            h = run(block, h)
            skips.append(h)
            factor = self._injection.get(index)
            if factor is not None and factor in aligned:
                h = h + aligned[factor].to(h.dtype)
        for block in self.middle:
            h = run(block, h)
        for block in self.decoder:
            if isinstance(block, ResBlock3d):
                h = torch.cat([h, skips.pop()], dim=1)
            h = run(block, h)
        return self.out(h)
