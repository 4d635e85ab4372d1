"""Which segmenter bundle a name means: a folder, or ``default`` for the one shipped in Resources."""

from __future__ import annotations

import os
from pathlib import Path

from ..bundle import BundleError

#: Folder of the shipped segmenter under ``Resources/models``.
DEFAULT_SEGMENTER = "tumour-seg-sim"


def default_segmenter_path() -> Path:
    from ..resources import resource_path

    return resource_path("models", DEFAULT_SEGMENTER)


def resolve_segmenter(spec: str | os.PathLike = "default") -> Path:
    """The bundle folder of ``spec``: ``default`` (or the default's name) or a segmenter bundle folder."""
    from .model_bundle import is_segmenter_bundle

    text = os.fspath(spec)
    path = default_segmenter_path() if text in ("default", DEFAULT_SEGMENTER) else Path(text).expanduser()
    if not path.is_dir():
        raise BundleError(f"segmenter {text!r} not found: give a segmenter bundle folder or 'default'")
    if not is_segmenter_bundle(path):
        raise BundleError(f"{path} is not a segmenter bundle (its manifest.json does not declare the "
                          "scorefusion-segmenter format; translation models go to --translation-model)")
    return path
