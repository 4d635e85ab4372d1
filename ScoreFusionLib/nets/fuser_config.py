"""Pure-Python configuration of the 3D fuser (no torch import; method.md §4.4, §4.5).

Like :class:`ScoreFusionLib.nets.configs.UNet2DConfig`, a :class:`Fuser3DConfig` fully
determines the fuser's architecture, including its feature-alignment layers, so a fuser
checkpoint records :meth:`Fuser3DConfig.to_dict` and rebuilds the network from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import InputError

#: Names accepted by :func:`fuser_config`.
FUSER_PRESETS = ("paper", "tiny")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"Fuser3DConfig.{name} must be a positive integer, got {value!r}")
    return value


def _pairs(name: str, value: object) -> tuple[tuple, ...]:
    """``value`` as a tuple of 2-tuples (JSON gives lists of lists)."""
    try:
        pairs = tuple(tuple(pair) for pair in value)  # type: ignore[union-attr]
    except TypeError:
        raise InputError(f"Fuser3DConfig.{name} must be a sequence of pairs, got {value!r}") from None
    for pair in pairs:
        if len(pair) != 2:
            raise InputError(f"Fuser3DConfig.{name} entries must be pairs, got {pair!r}")
    return pairs


@dataclass(frozen=True)
class Fuser3DConfig:
    """Architecture of the 3D fuser U-Net and of its feature-alignment layers.

    Parameters
    ----------
    in_channels
        Input channels: ``r_t`` (1), the M conditions, 3 coordinates, the mask (1) and
        the N plane estimates (§4.4); 9 for super-resolution with three planes.
    n_estimates
        N >= 2 plane estimates; the head has N channels, N - 1 weight offsets and a bias.
    base_channels
        Channels of the finest level.
    channel_mult
        Per-level multipliers; level ``l`` runs at ``1 / 2**l`` resolution.
    num_res_blocks
        Residual blocks per encoder level (the decoder uses one more per level).
    norm_groups
        GroupNorm groups; must divide every level's channel count.
    dropout
        Dropout probability inside residual blocks (paper: 0).
    time_channels
        Width of the sinusoidal features of the fused step t (even); the time MLP maps
        them to :attr:`embedding_channels` = 4 * ``time_channels``.
    bias_scale
        Factor ``s_b`` on the head's bias channel in the fused noise (1 for the paper).
    aligned_sources
        ``(source, axis)`` pairs: a plane model whose decoder features are aligned into
        the encoder (e.g. ``("axial", 0)`` or ``("mt/coronal", 1)``) and the tensor axis
        (0, 1, 2 for D, H, W) it slices along. Empty: no alignment layers (phase A, §5.3).
    aligned_channels
        ``(factor, plane_channels)`` pairs shared by every source: the plane models'
        decoder channels at each aligned downsampling factor, e.g. ``((4, 32), (2, 32),
        (1, 16))`` for the tiny plane net. Stored coarsest first.
    """

    in_channels: int
    n_estimates: int
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    dropout: float = 0.0
    time_channels: int = 64
    bias_scale: float = 1.0
    aligned_sources: tuple[tuple[str, int], ...] = ()
    aligned_channels: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        for name in ("in_channels", "n_estimates", "base_channels", "num_res_blocks", "norm_groups",
                     "time_channels"):
            _positive_int(name, getattr(self, name))
        if self.n_estimates < 2:
            raise InputError(f"Fuser3DConfig.n_estimates must be at least 2 (a fusion of planes), "
                             f"got {self.n_estimates}")
        if self.in_channels <= self.n_estimates:
            raise InputError(
                f"Fuser3DConfig.in_channels={self.in_channels} must exceed n_estimates={self.n_estimates}: "
                "the input holds r_t, conditions, coordinates and mask besides the estimates"
            )
        if self.time_channels % 2:
            raise InputError(
                f"Fuser3DConfig.time_channels must be even (it is the sinusoid width), got {self.time_channels}"
            )
        try:
            mult = tuple(self.channel_mult)
        except TypeError:
            raise InputError("Fuser3DConfig.channel_mult must be a sequence of ints") from None
        if not mult:
            raise InputError("Fuser3DConfig.channel_mult must name at least one level")
        for m in mult:
            _positive_int("channel_mult entries", m)
        object.__setattr__(self, "channel_mult", mult)
        for level, ch in enumerate(self.level_channels):
            if ch % self.norm_groups:
                raise InputError(
                    f"Fuser3DConfig.norm_groups={self.norm_groups} does not divide the {ch} channels of level {level}"
                )
        for name in ("dropout", "bias_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"Fuser3DConfig.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"Fuser3DConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias_scale <= 0.0:
            raise InputError(f"Fuser3DConfig.bias_scale must be positive, got {self.bias_scale!r}")
        self._check_alignment()

    def _check_alignment(self) -> None:
        sources = _pairs("aligned_sources", self.aligned_sources)
        for name, axis in sources:
            if not isinstance(name, str) or not name:
                raise InputError(f"Fuser3DConfig.aligned_sources names must be non-empty strings, got {name!r}")
            if isinstance(axis, bool) or axis not in (0, 1, 2):
                raise InputError(
                    f"Fuser3DConfig.aligned_sources axis of {name!r} must be 0, 1 or 2 (D, H, W), got {axis!r}"
                )
        names = [name for name, _ in sources]
        if len(set(names)) != len(names):
            raise InputError(f"Fuser3DConfig.aligned_sources names must be unique, got {names}")
        channels = _pairs("aligned_channels", self.aligned_channels)
        for factor, plane_ch in channels:
            if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
                raise InputError(
                    f"Fuser3DConfig.aligned_channels factor must be a power of two, got {factor!r}"
                )
            if factor not in self.level_factors:
                raise InputError(
                    f"Fuser3DConfig.aligned_channels factor {factor} is not a level of the fuser; "
                    f"its levels are at factors {self.level_factors}"
                )
            _positive_int("aligned_channels plane channels", plane_ch)
        factors = [factor for factor, _ in channels]
        if len(set(factors)) != len(factors):
            raise InputError(f"Fuser3DConfig.aligned_channels factors must be unique, got {factors}")
        if bool(sources) != bool(channels):
            raise InputError(
                "Fuser3DConfig.aligned_sources and aligned_channels must both be empty (no alignment) "
                f"or both be given, got {len(sources)} sources and {len(channels)} factors"
            )
        object.__setattr__(self, "aligned_sources", sources)
        object.__setattr__(self, "aligned_channels", tuple(sorted(channels, reverse=True)))

    @property
    def levels(self) -> int:
        """Number of resolution levels."""
        return len(self.channel_mult)

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of each level, finest first."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def level_factors(self) -> tuple[int, ...]:
        """Downsampling factor of each level, finest first: 1, 2, 4, ..."""
        return tuple(2**level for level in range(self.levels))

    @property
    def required_divisor(self) -> int:
        """Every spatial side must be a multiple of this (one halving per level transition)."""
        return 2 ** (self.levels - 1)

    @property
    def embedding_channels(self) -> int:
        """Width of the time embedding given to every residual block."""
        return 4 * self.time_channels

    def injection_channels(self, factor: int) -> int:
        """Channels of the encoder activation that aligned features of ``factor`` are added to.

        As in the official network (method.md §4.5), every level but the coarsest gets them
        after its first residual block (that level's channels); the coarsest gets them
        straight after the last down-sampling conv, before its first residual block, so they
        have the previous level's channels. Paper: 8 -> 192, 4 -> 192, 2 -> 128, 1 -> 64.
        """
        if factor not in self.level_factors:
            raise InputError(f"factor {factor!r} is not a level of the fuser; expected one of {self.level_factors}")
        level = self.level_factors.index(factor)
        if level == self.levels - 1 and level > 0:
            return self.level_channels[level - 1]
        return self.level_channels[level]

    def to_dict(self) -> dict:
        """JSON-ready dictionary (tuples become lists)."""
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["aligned_sources"] = [list(pair) for pair in self.aligned_sources]
        d["aligned_channels"] = [list(pair) for pair in self.aligned_channels]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Fuser3DConfig:
        """Rebuild a configuration from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(d, dict):
            raise InputError(f"a Fuser3DConfig must be rebuilt from a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown Fuser3DConfig keys {unknown}; expected a subset of {sorted(known)}")
        missing = [key for key in ("in_channels", "n_estimates") if key not in d]
        if missing:
            raise InputError(f"Fuser3DConfig dictionary lacks {missing}")
        kwargs = dict(d)
        if isinstance(kwargs.get("channel_mult"), list):
            kwargs["channel_mult"] = tuple(kwargs["channel_mult"])
        for key in ("aligned_sources", "aligned_channels"):
            if key in kwargs:
                kwargs[key] = _pairs(key, kwargs[key])
        return cls(**kwargs)


def fuser_config(
    name: str,
    in_channels: int,
    n_estimates: int,
    aligned_sources: tuple[tuple[str, int], ...] = (),
    aligned_channels: tuple[tuple[int, int], ...] = (),
) -> Fuser3DConfig:
    """A named preset (``paper`` or ``tiny``) for the given channels and alignment.

    ``paper`` is the official fuser (§4.4): base 64, multipliers (1, 2, 3, 4), 2 residual
    blocks, GroupNorm(32), time features 64 -> 256. ``tiny`` is the CPU test fuser: base 8,
    multipliers (1, 2, 4), 1 residual block, GroupNorm(8). Its time features are 16 wide
    (MLP to 64), not 8: 8 sinusoids cover the step range 0..999 with frequencies from 1
    down to 10**-3.5, where 4 would leave only 1, 0.1, 0.01 and 0.001.
    """
    if name == "paper":
        return Fuser3DConfig(in_channels, n_estimates, base_channels=64, channel_mult=(1, 2, 3, 4),
                             num_res_blocks=2, norm_groups=32, dropout=0.0, time_channels=64,
                             aligned_sources=aligned_sources, aligned_channels=aligned_channels)
    if name == "tiny":
        return Fuser3DConfig(in_channels, n_estimates, base_channels=8, channel_mult=(1, 2, 4),
                             num_res_blocks=1, norm_groups=8, dropout=0.0, time_channels=16,
                             aligned_sources=aligned_sources, aligned_channels=aligned_channels)
    raise InputError(f"unknown fuser preset {name!r}; expected one of {FUSER_PRESETS}")
