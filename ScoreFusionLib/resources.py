"""Where the repository's ``Resources/`` folder (registry, schemas, embedded models) is found.

The folder is the sibling of the ``ScoreFusionLib`` package in a source checkout, an editable
install and a Slicer extension build alike; ``SCOREFUSION_RESOURCES`` points elsewhere (a
packaged install, tests).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ScoreFusionError

RESOURCES_ENV = "SCOREFUSION_RESOURCES"


def resources_dir() -> Path:
    """The ``Resources`` folder, checked to exist."""
    override = os.environ.get(RESOURCES_ENV)
    folder = Path(override) if override else Path(__file__).resolve().parents[1] / "Resources"
    if not folder.is_dir():
        raise ScoreFusionError(
            f"the ScoreFusion Resources folder {folder} is missing; set {RESOURCES_ENV} to its location"
        )
    return folder


def resource_path(*parts: str) -> Path:
    """A file under ``Resources/`` (not checked to exist)."""
    return resources_dir().joinpath(*parts)
