"""The local model cache: installed bundles under ``~/.scorefusion`` (``SCOREFUSION_HOME`` elsewhere).

Layout::

    <root>/models/<id>/<version>/   an unpacked, validated bundle (manifest.json + weights)
    <root>/archives/<sha256>/       a bundle unpacked from a .zip given by path (keyed by its content)
    <root>/downloads/               archives being downloaded (``*.part`` files resume)

Only complete folders ever carry a final name: work happens in hidden (``.``-prefixed) siblings that
are renamed into place, so a listing never shows a half-installed model, and hidden names are skipped.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from .catalog import RegistryError, check_model_id, check_version, version_key

HOME_ENV = "SCOREFUSION_HOME"


def cache_root() -> Path:
    """``$SCOREFUSION_HOME`` or ``~/.scorefusion`` (not created here)."""
    override = os.environ.get(HOME_ENV)
    return Path(override).expanduser() if override else Path.home() / ".scorefusion"


def models_dir() -> Path:
    return cache_root() / "models"


def downloads_dir() -> Path:
    return cache_root() / "downloads"


def archives_dir() -> Path:
    return cache_root() / "archives"


def model_dir(model_id: str, version: str) -> Path:
    """Where version ``version`` of ``model_id`` is (or would be) installed; both are checked to be safe names."""
    return models_dir() / check_model_id(model_id) / check_version(version)


def staging_path(final: Path) -> Path:
    """A fresh, not yet existing hidden sibling of ``final`` to build it in (same file system: atomic renames)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = final.parent / f".{final.name}.{secrets.token_hex(6)}.part"
        if not candidate.exists():
            return candidate


def discard(path: Path) -> None:
    """Delete a folder so that it vanishes from its final name at once (rename first, then remove)."""
    if not path.exists():
        return
    trash = path.parent / f".{path.name}.{secrets.token_hex(6)}.trash"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_empty(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``stop`` while they are empty."""
    folder, stop = Path(folder), Path(stop)
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


@dataclass(frozen=True)
class InstalledModel:
    """A model version present in the cache."""

    id: str
    version: str
    path: Path

    def size(self) -> int:
        """Bytes on disk."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def _visible_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]


def installed_models(model_id: str | None = None) -> list[InstalledModel]:
    """Installed models (all, or the versions of ``model_id``), by id then newest version first."""
    found = []
    for id_dir in sorted(_visible_dirs(models_dir())):
        if model_id is not None and id_dir.name != model_id:
            continue
        versions = sorted(_visible_dirs(id_dir), key=lambda p: version_key(p.name), reverse=True)
        found += [InstalledModel(id_dir.name, v.name, v) for v in versions]
    return found


def installed_path(model_id: str, version: str | None = None) -> Path | None:
    """The folder of an installed model (``version``, or the newest installed one), or None."""
    if version is not None:
        path = model_dir(model_id, version)
        return path if path.is_dir() else None
    versions = installed_models(check_model_id(model_id))
    return versions[0].path if versions else None


def remove_model(model_id: str, version: str | None = None) -> list[Path]:
    """Delete an installed model (one version, or all of them); return the removed folders.

    Unknown ids and versions are refused with the installed ones listed, so a typo never looks
    like a successful removal.
    """
    check_model_id(model_id)
    versions = installed_models(model_id)
    if not versions:
        installed = ", ".join(sorted({m.id for m in installed_models()})) or "none"
        raise RegistryError(f"model {model_id!r} is not installed (installed models: {installed})")
    if version is not None:
        check_version(version)
        versions = [m for m in versions if m.version == version]
        if not versions:
            have = ", ".join(m.version for m in installed_models(model_id))
            raise RegistryError(f"version {version!r} of {model_id!r} is not installed (installed versions: {have})")
    for m in versions:
        discard(m.path)
    prune_empty(models_dir() / model_id, models_dir())
    return [m.path for m in versions]
