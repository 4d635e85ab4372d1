"""The trainable part of Score-Fusion: the 3D fuser network plus its feature-alignment convolutions.

One module holds both so that one optimiser, one EMA and one weight file cover them; its
state-dict keys are ``net.*`` and ``alignment.*``. Phase B (method.md 5.4) builds it with
alignment layers and loads phase A's weights into ``net`` only: the alignment convolutions keep
their zero initialisation, so training starts exactly where phase A ended.

This module imports torch at file scope (like every network module).
"""

from __future__ import annotations

from torch import nn

from .alignment import FeatureAlignment
from .fuser3d import FuserUNet3D
from .fuser_config import Fuser3DConfig


class ScoreFuser(nn.Module):
    """Fuser network and (when ``config.aligned_sources`` is set) its alignment layers."""

    def __init__(self, config: Fuser3DConfig) -> None:
        super().__init__()
        self.config = config
        self.net = FuserUNet3D(config)
        self.alignment = FeatureAlignment(config) if config.aligned_sources else None

    def num_parameters(self) -> int:
        """Number of parameters (network and alignment)."""
        return sum(p.numel() for p in self.parameters())
