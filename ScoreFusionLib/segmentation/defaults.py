"""Which segmenter bundle a name means: a folder, a ``.zip``, or ``default`` for the one shipped in Resources."""

from __future__ import annotations

import os
from pathlib import Path

from ..bundle import BundleError

#: Archive of the shipped segmenter under ``Resources/models``.
DEFAULT_SEGMENTER = "tumour-seg-sim"


def default_segmenter_path() -> Path:
    from ..resources import resource_path

    return resource_path("models", f"{DEFAULT_SEGMENTER}.zip")


def resolve_segmenter(spec: str | os.PathLike = "default") -> Path:
    """The bundle folder of ``spec``: ``default`` (or the default's name), a segmenter bundle folder or ``.zip``.

    A zip is unpacked safely into the model cache once (keyed by its sha256) and validated there.
    """
    import zipfile

    from .model_bundle import is_segmenter_bundle, validate_segmenter_bundle

    text = os.fspath(spec)
    path = default_segmenter_path() if text in ("default", DEFAULT_SEGMENTER) else Path(text).expanduser()
    if path.is_file():
        from ..registry.install import resolve_archive

        if not zipfile.is_zipfile(path):
            raise BundleError(f"{path} is neither a segmenter bundle folder nor a bundle .zip")
        return resolve_archive(path, validate_segmenter_bundle)
    if not path.is_dir():
        raise BundleError(f"segmenter {text!r} not found: give a segmenter bundle folder or .zip, or 'default'")
    if not is_segmenter_bundle(path):
        raise BundleError(f"{path} is not a segmenter bundle (its manifest.json does not declare the "
                          "scorefusion-segmenter format; translation models go to --translation-model)")
    return path
