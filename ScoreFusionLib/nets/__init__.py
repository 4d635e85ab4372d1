"""Neural networks of Score-Fusion (method.md §3.3, §4.4).

Only the torch-free configurations are imported here, so ``import ScoreFusionLib.nets``
works without torch. Import the torch modules explicitly where torch is available::

    from ScoreFusionLib.nets.configs import unet2d_config
    from ScoreFusionLib.nets.unet2d import UNet2D, kaiming_reinit_
    from ScoreFusionLib.nets.embedding import sinusoidal_features
    from ScoreFusionLib.nets.fuser3d import FuserUNet3D
    from ScoreFusionLib.nets.alignment import FeatureAlignment
"""

from __future__ import annotations

from .configs import NOISE_EMBEDDINGS, UNET2D_PRESETS, UNet2DConfig, unet2d_config
from .fuser_config import FUSER_PRESETS, Fuser3DConfig, fuser_config

__all__ = [
    "FUSER_PRESETS",
    "NOISE_EMBEDDINGS",
    "UNET2D_PRESETS",
    "Fuser3DConfig",
    "UNet2DConfig",
    "fuser_config",
    "unet2d_config",
]
