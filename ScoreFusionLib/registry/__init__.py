"""Model registry, local cache, resumable downloads and installation of model bundles.

``catalog`` reads the registry, ``cache`` knows the cache layout, ``download`` fetches one
verified archive, ``install`` turns archives and folders into installed bundles, and
``edit``/``publish`` write registry entries when a bundle is packed for release.
(``download.download`` is not re-exported, so that ``registry.download`` stays the module.)
"""

from __future__ import annotations

from .cache import cache_root, installed_models, installed_path, model_dir, remove_model
from .catalog import ModelEntry, Registry, RegistryError, load_registry, registry_path
from .download import ChecksumError, DownloadError
from .install import import_bundle, install_model, resolve_model

__all__ = [
    "ChecksumError",
    "DownloadError",
    "ModelEntry",
    "Registry",
    "RegistryError",
    "cache_root",
    "import_bundle",
    "install_model",
    "installed_models",
    "installed_path",
    "load_registry",
    "model_dir",
    "registry_path",
    "remove_model",
    "resolve_model",
]
