"""Pure-Python configurations of the networks (no torch import).

A configuration fully determines a network's architecture, so it is what a checkpoint or
bundle manifest records (via :meth:`UNet2DConfig.to_dict`) and what rebuilds the network
before its weights are loaded (via :meth:`UNet2DConfig.from_dict`). Presets follow
``docs/method.md`` §3.3: ``paper`` is the official plane-model U-Net, ``tiny`` exists for
CPU tests, ``small`` is a CPU-demo size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import InputError

#: Noise-level embeddings a plane model can use (method.md §2.4). The first is the default.
NOISE_EMBEDDINGS = ("gamma-sinusoidal", "log-snr")

#: Names accepted by :func:`unet2d_config`.
UNET2D_PRESETS = ("paper", "small", "tiny")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"UNet2DConfig.{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class UNet2DConfig:
    """Architecture of a guided-diffusion style 2D plane model (method.md §3.3).

    Parameters
    ----------
    in_channels
        Input channels: conditions, 3 coordinates, mask and the noisy slice (§3.2).
    out_channels
        Output channels (1: the predicted noise of the residual slice).
    base_channels
        Channels of the finest level; also the width of the sinusoidal noise features.
    channel_mult
        Per-level channel multipliers; level ``l`` runs at ``1 / 2**l`` resolution.
    num_res_blocks
        Residual blocks per encoder level (the decoder uses one more per level).
    attention_levels
        Level indices with self-attention after every residual block (paper: none).
    mid_attention
        Self-attention between the two middle residual blocks (paper: on).
    head_channels
        Channels per attention head.
    dropout
        Dropout probability inside residual blocks (active in train mode only).
    norm_groups
        GroupNorm groups; must divide every level's channel count.
    noise_embedding
        ``"gamma-sinusoidal"`` (sinusoid of the raw γ, the official behaviour) or
        ``"log-snr"`` (the same sinusoid of the clamped log(γ / (1 - γ))).
    """

    in_channels: int
    out_channels: int = 1
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = ()
    mid_attention: bool = True
    head_channels: int = 32
    dropout: float = 0.0
    norm_groups: int = 32
    noise_embedding: str = "gamma-sinusoidal"

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks",
                     "head_channels", "norm_groups"):
            _positive_int(name, getattr(self, name))
        if self.base_channels % 2:
            raise InputError(
                "UNet2DConfig.base_channels must be even (it is the sinusoid width), "
                f"got {self.base_channels}"
            )
        try:
            mult = tuple(self.channel_mult)
            levels = tuple(self.attention_levels)
        except TypeError:
            raise InputError(
                "UNet2DConfig.channel_mult and attention_levels must be sequences of ints"
            ) from None
        if not mult:
            raise InputError("UNet2DConfig.channel_mult must name at least one level")
        for m in mult:
            _positive_int("channel_mult entries", m)
        object.__setattr__(self, "channel_mult", mult)
        for level in levels:
            if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < len(mult):
                raise InputError(
                    f"UNet2DConfig.attention_levels entries must be level indices in 0..{len(mult) - 1}, "
                    f"got {level!r}"
                )
        object.__setattr__(self, "attention_levels", tuple(sorted(set(levels))))
        if not isinstance(self.mid_attention, bool):
            raise InputError(f"UNet2DConfig.mid_attention must be a bool, got {self.mid_attention!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= self.dropout < 1.0
        ):
            raise InputError(f"UNet2DConfig.dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.noise_embedding not in NOISE_EMBEDDINGS:
            raise InputError(
                f"UNet2DConfig.noise_embedding must be one of {NOISE_EMBEDDINGS}, "
                f"got {self.noise_embedding!r}"
            )
        for level, ch in enumerate(self.level_channels):
            if ch % self.norm_groups:
                raise InputError(
                    f"UNet2DConfig.norm_groups={self.norm_groups} does not divide the {ch} channels "
                    f"of level {level}"
                )
        attended = [self.level_channels[lv] for lv in self.attention_levels]
        if self.mid_attention:
            attended.append(self.level_channels[-1])
        for ch in attended:
            if ch % self.head_channels:
                raise InputError(
                    f"UNet2DConfig.head_channels={self.head_channels} does not divide {ch} attended channels"
                )

    @property
    def levels(self) -> int:
        """Number of resolution levels."""
        return len(self.channel_mult)

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of each level, finest first."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def required_divisor(self) -> int:
        """Height and width must be multiples of this (one halving per level transition)."""
        return 2 ** (self.levels - 1)

    @property
    def embedding_channels(self) -> int:
        """Width of the noise-level embedding fed to every residual block."""
        return 4 * self.base_channels

    @property
    def feature_channels(self) -> dict[int, int]:
        """Decoder feature channels keyed by downsampling factor, coarsest first (§3.3, §4.5)."""
        return {2**level: self.level_channels[level] for level in reversed(range(self.levels))}

    def to_dict(self) -> dict:
        """JSON-ready dictionary (tuples become lists)."""
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNet2DConfig:
        """Rebuild a configuration from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(d, dict):
            raise InputError(f"a UNet2DConfig must be rebuilt from a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown UNet2DConfig keys {unknown}; expected a subset of {sorted(known)}")
        if "in_channels" not in d:
            raise InputError("UNet2DConfig dictionary lacks 'in_channels'")
        kwargs = dict(d)
        for key in ("channel_mult", "attention_levels"):
            if key in kwargs and isinstance(kwargs[key], (list, tuple)):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def unet2d_config(name: str, in_channels: int, out_channels: int = 1) -> UNet2DConfig:
    """A named preset (``paper``, ``small`` or ``tiny``) for the given channel counts.

    Parameters with 6 inputs: ``paper`` 62.64 M (the official plane model), ``small``
    4.09 M (a CPU-demo size), ``tiny`` 0.33 M (the 3-level CPU test net of method.md §3.3,
    which estimates about 0.27 M; resampling residual blocks and scale-shift projections
    account for the difference).
    """
    if name == "paper":
        return UNet2DConfig(in_channels, out_channels, base_channels=64, channel_mult=(1, 2, 4, 8),
                            num_res_blocks=2, attention_levels=(), mid_attention=True, head_channels=32,
                            dropout=0.2, norm_groups=32)
    if name == "small":
        return UNet2DConfig(in_channels, out_channels, base_channels=32, channel_mult=(1, 2, 4),
                            num_res_blocks=2, attention_levels=(), mid_attention=True, head_channels=32,
                            dropout=0.1, norm_groups=8)
    if name == "tiny":
        return UNet2DConfig(in_channels, out_channels, base_channels=16, channel_mult=(1, 2, 2),
                            num_res_blocks=1, attention_levels=(), mid_attention=True, head_channels=32,
                            dropout=0.0, norm_groups=8)
    raise InputError(f"unknown UNet2D preset {name!r}; expected one of {UNET2D_PRESETS}")
