"""Put model bundles into the cache, and turn what a user names (folder, .zip, id) into a bundle folder.

Every path into the cache is the same: fetch and verify the archive, unpack and validate it in a
hidden staging folder next to its destination, then rename it into place. A wrong checksum, a
malicious or invalid archive or an interruption therefore never leaves a half-installed model
under ``models/<id>/<version>/``; at most a resumable ``downloads/*.part`` file stays behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..bundle import MANIFEST, BundleError, sha256_file
from ..errors import ScoreFusionError
from .cache import (
    archives_dir,
    cache_root,
    downloads_dir,
    installed_models,
    installed_path,
    model_dir,
    models_dir,
    prune_empty,
    staging_path,
)
from .catalog import ID_PATTERN, ModelEntry, Registry, RegistryError, check_model_id, check_version, load_registry
from .download import DEFAULT_TIMEOUT, ProgressCallback, Timeout, download, part_path

#: version given to an imported bundle whose manifest has no ``model.version`` (and no --version)
LOCAL_VERSION = "local"


def _registry(registry: Registry | str | os.PathLike | None) -> Registry:
    return registry if isinstance(registry, Registry) else load_registry(registry)


def _move_into_place(staging: Path, final: Path, replace: bool) -> None:
    """Rename a complete staging folder onto ``final``; with ``replace`` an existing one is swapped out."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        if not replace:  # installed meanwhile by another process: theirs is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
            return
        old = final.parent / f".{final.name}.{secrets.token_hex(6)}.old"
        os.replace(final, old)
        try:
            os.replace(staging, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(staging, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def _unpack_into_place(archive: Path, final: Path, replace: bool,
                       validate: Callable[[Path], Any] | None = None) -> None:
    """Unpack and validate ``archive`` beside ``final``, then rename it into place."""
    from ..bundle_archive import unpack_bundle
    from ..bundle_validation import validate_bundle

    staging = staging_path(final)
    try:
        unpack_bundle(archive, staging, validate or validate_bundle)
        _move_into_place(staging, final, replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        prune_empty(final.parent, cache_root())
        raise


def install_model(
    model: str | ModelEntry,
    *,
    registry: Registry | str | os.PathLike | None = None,
    force: bool = False,
    timeout: Timeout = DEFAULT_TIMEOUT,
    retries: int = 4,
    backoff: float = 1.0,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> Path:
    """Install a registry model into ``models/<id>/<version>/`` and return that folder.

    An installed model is returned as is unless ``force``. Embedded models are copied from the
    registry's folder, remote ones downloaded (resuming a previous partial download); either way
    the archive must match the registered sha256 and unpack into a valid bundle.
    """
    entry = model if isinstance(model, ModelEntry) else _registry(registry).get(model)
    if entry.is_placeholder:
        raise RegistryError(
            f"model {entry.id!r} has no packed archive yet (its registry entry still has the placeholder "
            "checksum); pack it with `scorefusion models pack BUNDLE --out ZIP --id "
            f"{entry.id} --registry REGISTRY`"
        )
    final = model_dir(entry.id, entry.version)
    if final.is_dir() and not force:
        return final
    archive = downloads_dir() / f"{entry.id}-{entry.version}-{entry.sha256[:12]}.zip"
    if force:
        part_path(archive).unlink(missing_ok=True)
        archive.unlink(missing_ok=True)
    try:
        download(entry.location(), archive, entry.sha256, entry.size, timeout=timeout, retries=retries,
                 backoff=backoff, progress=progress, on_progress=on_progress)
        _unpack_into_place(archive, final, replace=force)
    except ScoreFusionError:
        archive.unlink(missing_ok=True)  # a verified archive that does not unpack will not do better next time
        prune_empty(downloads_dir(), cache_root())
        raise
    archive.unlink(missing_ok=True)
    prune_empty(downloads_dir(), cache_root())
    return final


def read_model_block(bundle_dir: Path) -> dict:
    """The manifest's optional ``model`` block (``id``, ``version``, ``title``, ...), or {}."""
    try:
        data = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {bundle_dir / MANIFEST}: {exc}") from exc
    block = data.get("model") if isinstance(data, dict) else None
    return block if isinstance(block, dict) else {}


def _copy_bundle_tree(src: Path, dest: Path) -> None:
    """Copy a bundle folder's regular files; links are refused (they could point anywhere)."""
    dest.mkdir()
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        for name in dirs + files:
            path = Path(root, name)
            if path.is_symlink():
                raise BundleError(f"{path} is a symbolic link; bundles are copied from regular files only")
        for name in dirs:
            (dest / rel / name).mkdir()
        for name in files:
            path = Path(root, name)
            if not path.is_file():
                raise BundleError(f"{path} is not a regular file")
            shutil.copyfile(path, dest / rel / name)


def import_bundle(
    path: str | os.PathLike,
    *,
    model_id: str | None = None,
    version: str | None = None,
    force: bool = False,
) -> Path:
    """Copy a bundle folder or bundle .zip from anywhere into the cache; return the installed folder.

    The id and version come from ``model_id``/``version`` or else the manifest's ``model`` block
    (version ``local`` when neither says). The copy is validated (weights checked against the
    manifest's sha256) before it is renamed into place; an installed version is replaced only with
    ``force``.
    """
    src = Path(path)
    if not src.exists():
        raise BundleError(f"{src} does not exist")
    if model_id is not None:
        check_model_id(model_id)
    if version is not None:
        check_version(version)
    staging = staging_path(models_dir() / "import")
    try:
        if src.is_dir():
            from ..bundle_validation import validate_bundle

            _copy_bundle_tree(src, staging)
            validate_bundle(staging)
        else:
            from ..bundle_archive import unpack_bundle

            unpack_bundle(src, staging)
        block = read_model_block(staging)
        chosen_id = model_id or block.get("id")
        if not chosen_id:
            raise BundleError(f"{src} does not say which model it is (no model.id in its manifest); give one with --id")
        chosen_version = version or str(block.get("version") or LOCAL_VERSION)
        final = model_dir(str(chosen_id), chosen_version)
        if final.exists() and not force:
            raise BundleError(
                f"{chosen_id} {chosen_version} is already installed at {final}; use --force to replace it"
            )
        _move_into_place(staging, final, replace=force)
        return final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        prune_empty(models_dir(), cache_root())
        raise


def resolve_archive(archive: Path, validate: Callable[[Path], Any] | None = None) -> Path:
    """Unpack a bundle .zip into ``archives/<sha256>/`` once; later calls reuse that folder.

    ``validate`` checks the extracted bundle (default: a translation bundle).
    """
    final = archives_dir() / sha256_file(archive)
    if not final.is_dir():
        _unpack_into_place(archive, final, replace=False, validate=validate)
    return final


def resolve_model(
    spec: str | os.PathLike,
    *,
    registry: Registry | str | os.PathLike | None = None,
    progress: bool = False,
) -> Path:
    """The bundle folder that ``spec`` names, ready to load.

    ``spec`` is a bundle folder (validated and used in place), a bundle ``.zip`` (unpacked into the
    cache, keyed by its sha256), or a model id, optionally ``id@version``: an installed model, or
    an embedded registry model, which is installed on first use without any network access.
    Remote models must be downloaded first, explicitly.
    """
    path = Path(spec)
    if path.is_dir():
        from ..bundle_validation import validate_bundle

        validate_bundle(path)
        return path
    if path.is_file():
        import zipfile

        if not zipfile.is_zipfile(path):
            raise BundleError(f"{path} is neither a bundle folder nor a bundle .zip")
        return resolve_archive(path)
    text = os.fspath(spec)
    model_id, _, version = text.partition("@")
    if not ID_PATTERN.match(model_id) or (version and not check_version(version)):
        raise BundleError(f"{text} does not exist (expected a bundle folder, a bundle .zip or a model id)")
    entry = _registry(registry).find(model_id)
    if entry is not None and version in ("", entry.version):
        installed = installed_path(model_id, entry.version)
        if installed is not None:
            return installed
        if entry.is_remote:
            raise RegistryError(
                f"model {model_id!r} is not installed; download it first with: scorefusion models download {model_id}"
            )
        return install_model(entry, progress=progress)  # embedded: a local copy, no network
    installed = installed_path(model_id, version or None)
    if installed is not None:
        return installed
    if version:
        have = ", ".join(m.version for m in installed_models(model_id)) or "none"
        raise RegistryError(f"version {version!r} of model {model_id!r} is not installed (installed versions: {have})")
    known = ", ".join(sorted(set(_registry(registry).ids) | {m.id for m in installed_models()})) or "none"
    raise RegistryError(f"{text!r} is not a bundle folder, a bundle .zip or a known model id; known models: {known}")
