"""Create or update one entry of a registry file without disturbing the others.

Used when a trained bundle is packed for release: its archive's url, sha256 and size must reach
the registry exactly, and a registry that would no longer validate is never written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import write_text_atomic
from .catalog import REGISTRY_FORMAT, REGISTRY_FORMAT_VERSION, check_model_id, read_json, validate_registry_data

#: key order of written entries (the schema's order; unknown keys keep theirs, after these)
_ORDER = ("id", "title", "task", "inputs", "target", "version", "url", "sha256", "size", "license", "description",
          "embedded", "card", "method", "sampling")


def _ordered(entry: dict) -> dict:
    return {**{k: entry[k] for k in _ORDER if k in entry}, **{k: v for k, v in entry.items() if k not in _ORDER}}


def update_registry_entry(registry_file: str | os.PathLike, model_id: str, fields: dict,
                          defaults: dict | None = None, *, dry_run: bool = False) -> dict:
    """Set ``fields`` on entry ``model_id`` of ``registry_file`` (created, with the file, when missing).

    ``defaults`` fill a new entry's remaining fields (task, inputs, license, ...) and are ignored
    for an existing one. The result is validated against the schema before the file is replaced
    atomically; the other entries and their order are kept. Returns the written entry (with
    ``dry_run`` only the checks are done and nothing is written).
    """
    check_model_id(model_id)
    file = Path(registry_file)
    if file.exists():
        data = read_json(file, "model registry")
        validate_registry_data(data, str(file))
    else:
        data = {"format": REGISTRY_FORMAT, "format_version": REGISTRY_FORMAT_VERSION, "models": []}
    models = data["models"]
    index = next((i for i, e in enumerate(models) if e.get("id") == model_id), None)
    if index is None:
        entry = _ordered({**(defaults or {}), **fields, "id": model_id})
        models.append(entry)
    else:
        entry = _ordered({**models[index], **fields, "id": model_id})
        models[index] = entry
    validate_registry_data(data, f"{file} (after updating {model_id!r})")
    if dry_run:
        return entry
    write_text_atomic(file, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return entry
