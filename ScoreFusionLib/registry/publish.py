"""Pack a trained bundle for release and record the archive in a registry.

The registry entry's sha256 and size must be those of the exact archive users will fetch, so
they are taken from the archive just written rather than typed by hand; the manifest inside the
archive gets a ``model`` block (id, version, title, card) so an imported copy knows what it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..bundle import BundleError, read_manifest
from .catalog import RegistryError, check_model_id, check_version, load_registry
from .edit import update_registry_entry
from .install import read_model_block


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack_model` wrote: the archive, its sha256 and size, and the registry entry if any."""

    archive: Path
    sha256: str
    size: int
    entry: dict | None = None


def _relative_posix(path: Path, base: Path) -> str | None:
    """``path`` relative to ``base`` with forward slashes, or None when it lies outside."""
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return None


def pack_model(
    bundle_dir: str | os.PathLike,
    out_zip: str | os.PathLike,
    *,
    model_id: str | None = None,
    version: str | None = None,
    title: str | None = None,
    card: str | os.PathLike | None = None,
    keep_raw: bool = False,
    registry: str | os.PathLike | None = None,
    url: str | None = None,
    description: str | None = None,
    license: str | None = None,
) -> PackResult:
    """Zip ``bundle_dir`` (EMA weights only unless ``keep_raw``) and, with ``registry``, update its entry.

    The entry's url becomes ``url`` when given, else the archive's path relative to the registry's
    folder when it lies inside it (an embedded model), else it stays what it was. A new entry takes
    task, inputs and target from the bundle's manifest. The registry edit is checked before the
    archive is written, so a refused edit costs no packing.
    """
    from ..bundle_archive import pack_bundle

    bundle_dir, out_zip = Path(bundle_dir), Path(out_zip)
    manifest = read_manifest(bundle_dir)
    block = dict(read_model_block(bundle_dir))
    model_id = model_id or block.get("id")
    if model_id is not None:
        check_model_id(model_id)
    if version is not None:
        check_version(version)
    card_path = Path(card) if card is not None else None
    if card_path is not None and not card_path.is_file():
        raise BundleError(f"model card {card_path} does not exist")

    existing = None
    if registry is not None:
        if model_id is None:
            raise RegistryError("--registry needs the model's id: give --id (or pack a bundle whose manifest has one)")
        if Path(registry).exists():
            existing = load_registry(registry).find(model_id)
    version = version or block.get("version") or (existing.version if existing else None)
    for key, value in (("id", model_id), ("version", version), ("title", title), ("card", card_path)):
        if value is not None:
            block[key] = value.name if isinstance(value, Path) else value

    fields: dict = {}
    defaults: dict = {}
    if registry is not None:
        reg_dir = Path(registry).resolve().parent
        if url is not None:
            fields["url"] = url
            fields["embedded"] = not urlparse(url).scheme
        elif (rel := _relative_posix(out_zip, reg_dir)) is not None:
            fields["url"], fields["embedded"] = rel, True
        elif existing is None:
            raise RegistryError(
                f"{model_id!r} is a new registry entry: give --url (where the archive will be published) or write "
                f"the archive inside {reg_dir} to embed it"
            )
        if card_path is not None and (rel_card := _relative_posix(card_path, reg_dir)) is not None:
            fields["card"] = rel_card
        for key, value in (("version", version), ("title", title), ("description", description),
                           ("license", license)):
            if value is not None:
                fields[key] = value
        target = manifest.task.get("target")
        defaults = {
            "title": model_id, "task": manifest.task.get("kind"), "target": target,
            "inputs": [c for c in manifest.task.get("inputs", []) if c != target],
            "version": "1.0.0", "license": manifest.license or "unknown", "description": manifest.intended_use or "",
        }
        # refuse a bad edit before spending time on the archive (sha256/size stand in for the real ones)
        update_registry_entry(registry, model_id, {**fields, "sha256": "0" * 64, "size": 0}, defaults, dry_run=True)

    weight_sets = ("raw", "ema") if keep_raw else ("ema",)
    extra = (card_path,) if card_path is not None else ()
    sha = pack_bundle(bundle_dir, out_zip, weight_sets=weight_sets, model=block or None, extra_files=extra)
    size = out_zip.stat().st_size
    entry = None
    if registry is not None:
        entry = update_registry_entry(registry, model_id, {**fields, "sha256": sha, "size": size}, defaults)
    return PackResult(out_zip, sha, size, entry)
