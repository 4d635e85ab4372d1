"""One entry point for "where are the cases": a dataset folder or a manifest file."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DatasetError
from .brats import discover_cases
from .manifest import load_manifest
from .records import CaseRecord


def load_cases(source: str | os.PathLike, label_convention: str | None = None) -> list[CaseRecord]:
    """Case records from a folder of BraTS/simulated cases or a ``.csv``/``.json`` manifest.

    ``label_convention`` is only used for manifest cases without one (see
    :func:`load_manifest`); folder layouts imply their convention.
    """
    p = Path(source).expanduser()
    if p.is_dir():
        return discover_cases(p)
    if p.is_file():
        return load_manifest(p, label_convention=label_convention)
    raise DatasetError(f"{p} is neither a dataset folder nor a manifest file")
