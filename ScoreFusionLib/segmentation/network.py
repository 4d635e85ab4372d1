"""The segmentation network: MONAI's SegResNet with three sigmoid region outputs.

The outputs are the nested BraTS evaluation regions in the order of MONAI's
``brats_mri_segmentation`` bundle, **TC, WT, ET** (tumour core, whole tumour, enhancing
tumour), each an independent sigmoid; :mod:`.regions` turns them into a label map. Region
outputs rather than a softmax over compartments make the zoo weights usable unchanged and
let the nesting ET in TC in WT be enforced at decoding.

MONAI is imported only when a network is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InputError

#: Output channels, in order.
REGION_CHANNELS = ("TC", "WT", "ET")

#: Network presets: ``tiny`` for CPU training on 2 mm data, ``monai-brats`` = MONAI's bundle.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"init_filters": 8, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1), "dropout": 0.0},
    "monai-brats": {"init_filters": 16, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1), "dropout": 0.2},
}


@dataclass(frozen=True)
class SegmenterNetwork:
    """Architecture of a SegResNet segmenter (everything needed to rebuild it)."""

    init_filters: int = 8
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)
    dropout: float = 0.0
    in_channels: int = 4
    out_channels: int = len(REGION_CHANNELS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks_down", tuple(int(b) for b in self.blocks_down))
        object.__setattr__(self, "blocks_up", tuple(int(b) for b in self.blocks_up))
        if self.init_filters < 8 or self.init_filters % 8:
            raise InputError(f"init_filters must be a multiple of 8 (group norm), got {self.init_filters}")
        if not self.blocks_down or min(self.blocks_down) < 1 or len(self.blocks_up) != len(self.blocks_down) - 1:
            raise InputError(f"blocks_down {self.blocks_down} / blocks_up {self.blocks_up}: need one more down "
                             "level than up levels, each with at least one block")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise InputError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.in_channels < 1 or self.out_channels != len(REGION_CHANNELS):
            raise InputError(f"a segmenter takes >= 1 input channels and gives {len(REGION_CHANNELS)} region "
                             f"outputs, got {self.in_channels} -> {self.out_channels}")

    @property
    def divisor(self) -> int:
        """Window sides must be multiples of this (one halving per extra down level)."""
        return 2 ** (len(self.blocks_down) - 1)

    @classmethod
    def preset(cls, name: str, in_channels: int = 4) -> SegmenterNetwork:
        if name not in PRESETS:
            raise InputError(f"unknown segmenter preset {name!r}; use one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name], in_channels=in_channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks_down"], d["blocks_up"] = list(self.blocks_down), list(self.blocks_up)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SegmenterNetwork:
        if not isinstance(d, dict):
            raise InputError(f"a segmenter network configuration is a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"unknown segmenter network fields {unknown}")
        return cls(**d)


def build_segresnet(config: SegmenterNetwork) -> Any:
    """A freshly initialised ``monai.networks.nets.SegResNet`` for ``config`` (3D, group norm)."""
    from monai.networks.nets import SegResNet

    return SegResNet(
        spatial_dims=3, init_filters=config.init_filters, in_channels=config.in_channels,
        out_channels=config.out_channels, dropout_prob=float(config.dropout) or None,
        blocks_down=config.blocks_down, blocks_up=config.blocks_up,
    )
