"""Hierarchical feature alignment: plane-model decoder features into the fuser (method.md §4.5).

For every source plane model (slicing axis ``a``) and every aligned downsampling factor
``f``, a ``Conv3d`` with kernel = stride = ``f`` along ``a`` and 1 along the other two axes
maps the plane's stacked features (full resolution along ``a``, ``1/f`` in-plane) onto the
fuser's ``1/f`` grid with the fuser's channels. The aligned maps of all sources are summed
per factor and added to the fuser's encoder (:class:`~ScoreFusionLib.nets.fuser3d.FuserUNet3D`).

Every alignment conv starts at zero (weights and bias), so adding alignment to a trained
phase-A fuser leaves its function unchanged (§5.4). Generic initialisers must not touch
these convs and training must not apply weight decay to them (nor to the fuser's head):
decay would pull them towards zero for no reason other than their start (§10.11).

Because kernel == stride along ``a`` and 1 elsewhere, each output voxel depends on exactly
one group of ``f`` consecutive slices. A caller may therefore align the stack in chunks of
slices that start at multiples of ``f`` and write each result at ``start / f``: the full
feature stacks never need to exist at once.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import InputError
from .blocks2d import zero_module
from .fuser_config import Fuser3DConfig


def _module_key(source: str) -> str:
    """A state-dict-safe name for ``source``: ``/`` becomes ``__``, other symbols ``_``."""
    return re.sub(r"[^0-9A-Za-z_]", "_", source.replace("/", "__"))


class FeatureAlignment(nn.Module):
    """The zero-initialised alignment convs of every (source, factor) of a :class:`Fuser3DConfig`.

    Modules are stored in :attr:`convs` under ``"{key}_f{factor}"`` where ``key`` is the
    sanitised source name (see :attr:`module_keys`), e.g. ``convs.mt__coronal_f4.weight``.
    """

    def __init__(self, config: Fuser3DConfig) -> None:
        super().__init__()
        if not isinstance(config, Fuser3DConfig):
            raise InputError(f"FeatureAlignment needs a Fuser3DConfig, got {type(config).__name__}")
        if not config.aligned_sources:
            raise InputError("FeatureAlignment needs a Fuser3DConfig with aligned_sources and aligned_channels")
        self.config = config
        self.axes: dict[str, int] = dict(config.aligned_sources)
        self.plane_channels: dict[int, int] = dict(config.aligned_channels)
        self.module_keys: dict[str, str] = {}
        for source in self.axes:
            key = _module_key(source)
            clash = [other for other, k in self.module_keys.items() if k == key]
            if clash:
                raise InputError(f"aligned sources {clash[0]!r} and {source!r} map to the same module key {key!r}")
            self.module_keys[source] = key
        self.convs = nn.ModuleDict()
        for source, axis in self.axes.items():
            for factor, plane_ch in self.plane_channels.items():
                kernel = [1, 1, 1]
                kernel[axis] = factor
                conv = nn.Conv3d(plane_ch, config.injection_channels(factor), tuple(kernel), stride=tuple(kernel))
                self.convs[self._name(source, factor)] = zero_module(conv)

    def _name(self, source: str, factor: int) -> str:
        return f"{self.module_keys[source]}_f{factor}"

    def conv(self, source: str, factor: int) -> nn.Conv3d:
        """The alignment conv of ``source`` at ``factor``."""
        if source not in self.axes:
            raise InputError(f"unknown aligned source {source!r}; expected one of {list(self.axes)}")
        if factor not in self.plane_channels:
            raise InputError(f"factor {factor!r} is not aligned; expected one of {list(self.plane_channels)}")
        return self.convs[self._name(source, factor)]  # type: ignore[return-value]

    def align(self, source: str, factor: int, stacked: torch.Tensor) -> torch.Tensor:
        """Map one source's stacked features at ``factor`` onto the fuser's ``1/factor`` grid.

        Parameters
        ----------
        source, factor
            Which alignment conv to use.
        stacked
            ``(B, plane_channels, D', H', W')``: the plane's features of consecutive
            slices stacked along the source's axis (full resolution along it, ``1/factor``
            on the other two). A chunk is fine if its extent along the axis is a multiple of
            ``factor`` and it starts at a slice index that is a multiple of ``factor``.

        Returns
        -------
        ``(B, injection_channels(factor), ...)`` with the source's axis divided by ``factor``.
        """
        conv = self.conv(source, factor)
        axis = self.axes[source]
        if not isinstance(stacked, torch.Tensor) or stacked.ndim != 5:
            shape = tuple(stacked.shape) if isinstance(stacked, torch.Tensor) else type(stacked).__name__
            raise InputError(f"stacked features of {source!r} must be (B, C, D, H, W), got {shape}")
        if stacked.shape[1] != self.plane_channels[factor]:
            raise InputError(
                f"stacked features of {source!r} at factor {factor} must have {self.plane_channels[factor]} "
                f"channels, got {stacked.shape[1]}"
            )
        extent = stacked.shape[2 + axis]
        if extent % factor:
            raise InputError(
                f"stacked features of {source!r} span {extent} slices along axis {axis}, "
                f"not a multiple of the factor {factor}"
            )
        return conv(stacked)

    def forward(self, features: dict[str, dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """Align every source's stacks and sum over sources, per factor, in float32 (§10.8).

        ``features[source][factor]`` is the full stack of :meth:`align`; every configured
        source and factor must be present. Returns ``{factor: (B, C_fuser, ...)}``.
        """
        if not isinstance(features, dict) or set(features) != set(self.axes):
            got = sorted(features) if isinstance(features, dict) else type(features).__name__
            raise InputError(f"aligned features must be given for the sources {sorted(self.axes)}, got {got}")
        summed: dict[int, torch.Tensor] = {}
        for source, per_factor in features.items():
            if not isinstance(per_factor, dict) or set(per_factor) != set(self.plane_channels):
                got = sorted(per_factor) if isinstance(per_factor, dict) else type(per_factor).__name__
                raise InputError(
                    f"features of {source!r} must be given for the factors {sorted(self.plane_channels)}, got {got}"
                )
            for factor, stacked in per_factor.items():
                aligned = self.align(source, factor, stacked).float()
                if factor in summed and summed[factor].shape != aligned.shape:
                    raise InputError(
                        f"aligned features of {source!r} at factor {factor} have shape {tuple(aligned.shape)}, "
                        f"other sources {tuple(summed[factor].shape)}; the stacks do not describe one volume"
                    )
                summed[factor] = aligned if factor not in summed else summed[factor] + aligned
        return summed
