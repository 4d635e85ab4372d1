"""Every model a user can pick: the registry's entries and the bundles imported into the cache.

One plain dictionary per model, so that the Slicer module (in Slicer's own Python, before torch is
installed) and ``worker.py models`` show the same list. Reading it never imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..bundle import MANIFEST
from .cache import installed_models, installed_path
from .catalog import Registry, load_registry


def _read_text(path: Path | None) -> str | None:
    try:
        return path.read_text(encoding="utf-8") if path is not None and path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _imported_entry(model_id: str, version: str, folder: Path) -> dict[str, Any] | None:
    """The listing entry of a cached bundle that is not in the registry, from its manifest; None if unreadable."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        task = manifest["task"]
        kind, inputs, target = task["kind"], list(task.get("inputs") or []), task["target"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    block = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    card = block.get("card")
    return {
        "id": model_id, "version": version, "title": block.get("title") or model_id, "task": kind,
        "inputs": inputs, "target": target, "license": manifest.get("license") or "",
        "description": manifest.get("intended_use") or "", "size": None, "embedded": False, "remote": False,
        "installed": True, "installed_path": str(folder), "source": "imported", "sampling": {},
        "card": _read_text(folder / card) if isinstance(card, str) and "/" not in card else None,
    }


def list_models(registry: Registry | str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The registry's models (installed or not) followed by imported ones, each as a plain dict.

    Keys: id, version, title, task, inputs, target, license, description, size, embedded, remote,
    installed, installed_path, source (``registry`` or ``imported``), sampling, card (Markdown or None).
    """
    reg = registry if isinstance(registry, Registry) else load_registry(registry)
    out = []
    for entry in reg:
        folder = installed_path(entry.id, entry.version)
        out.append({
            "id": entry.id, "version": entry.version, "title": entry.title, "task": entry.task,
            "inputs": list(entry.inputs), "target": entry.target, "license": entry.license,
            "description": entry.description, "size": entry.size, "embedded": entry.embedded,
            "remote": entry.is_remote, "installed": folder is not None,
            "installed_path": str(folder) if folder is not None else None, "source": "registry",
            "sampling": dict(entry.sampling), "card": _read_text(entry.card_path()),
        })
    registered = {(e.id, e.version) for e in reg}
    for model in installed_models():
        if (model.id, model.version) not in registered:
            entry = _imported_entry(model.id, model.version, model.path)
            if entry is not None:
                out.append(entry)
    return out
