"""ScoreFusionLib: Score-Fusion volume-to-volume translation for MRI.

The package is importable without torch; modules that need torch import it inside
functions. Arrays are numpy (or torch) in (k, j, i) memory order with a 4x4 float64
IJK->RAS matrix; see :mod:`ScoreFusionLib.volume`.
"""

from __future__ import annotations

__version__ = "0.1.0"
