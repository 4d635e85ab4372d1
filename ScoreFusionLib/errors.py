"""Exception types shared by the library, the CLI and the Slicer worker.

Every error a user can cause derives from :class:`ScoreFusionError`, so the CLI and the
worker can turn it into a clear one-line message (and a distinct exit code) instead of a
traceback.
"""

from __future__ import annotations


class ScoreFusionError(Exception):
    """Base class of every error the library raises on purpose."""


class InputError(ScoreFusionError, ValueError):
    """Bad input data: wrong dimensionality, NaN/Inf, constant volume, bad geometry."""


class GeometryError(InputError):
    """A grid or affine that cannot be used (singular, mismatched, not divisible)."""


class VolumeFileError(ScoreFusionError, OSError):
    """A volume file that is missing, unreadable, truncated or of an unknown format."""


class DatasetError(ScoreFusionError):
    """A dataset folder or manifest that cannot be used as asked."""
