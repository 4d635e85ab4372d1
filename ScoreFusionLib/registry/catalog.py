"""The model registry: which trained bundles exist, where their archives are and how to check them.

The registry is a JSON file (``Resources/models.json`` by default, ``SCOREFUSION_REGISTRY`` or an
explicit path to use another) validated against ``Resources/schemas/models.schema.json`` before
anything in it is trusted: an entry with a malformed id, url or checksum is refused with the
field's location rather than failing later in a download or a cache path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import ScoreFusionError
from ..resources import resource_path

REGISTRY_ENV = "SCOREFUSION_REGISTRY"
REGISTRY_FORMAT = "scorefusion-registry"
REGISTRY_FORMAT_VERSION = 1
#: sha256 of entries whose archive has not been packed yet (``size`` is then 0 as well).
PLACEHOLDER_SHA256 = "0" * 64

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
#: versions used as cache folder names: semver from the registry, or a free label for imported bundles
VERSION_PATTERN = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]*$")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


class RegistryError(ScoreFusionError):
    """A registry file that is missing or invalid, or a model id it does not know."""


def check_model_id(model_id: str) -> str:
    """``model_id`` if it is a valid id; ids become folder names, so nothing else is accepted."""
    if not isinstance(model_id, str) or not ID_PATTERN.match(model_id) or len(model_id) > 64:
        raise RegistryError(
            f"invalid model id {model_id!r}: use lower-case letters, digits and '-' (starting with a letter or digit)"
        )
    return model_id


def check_version(version: str) -> str:
    """``version`` if it is safe as a folder name (no separators, no leading dot)."""
    if not isinstance(version, str) or not VERSION_PATTERN.match(version) or len(version) > 64:
        raise RegistryError(f"invalid model version {version!r}: use letters, digits, '.', '+', '_' and '-'")
    return version


def version_key(version: str) -> tuple:
    """Sort key ranking semantic versions by precedence, above any non-semver label."""
    m = _SEMVER.match(version)
    if not m:
        return (0, (), 0, version)
    release = tuple(int(m.group(i)) for i in (1, 2, 3))
    pre = m.group(4)
    # a pre-release ranks below its release; numeric identifiers compare as numbers
    pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")) if pre else ()
    return (1, release, 0 if pre else 1, pre_key)


@dataclass(frozen=True)
class ModelEntry:
    """One registry entry. ``base_dir`` is the registry's folder, against which relative urls resolve."""

    id: str
    title: str
    task: str
    inputs: tuple[str, ...]
    target: str
    version: str
    url: str
    sha256: str
    size: int
    license: str
    description: str
    embedded: bool = False
    card: str | None = None
    method: str | None = None
    sampling: dict = field(default_factory=dict)
    base_dir: Path | None = None

    @classmethod
    def from_dict(cls, d: dict, base_dir: Path | None = None) -> ModelEntry:
        """An entry from its (already schema-validated) JSON object."""
        return cls(
            id=d["id"], title=d["title"], task=d["task"], inputs=tuple(d["inputs"]), target=d["target"],
            version=d["version"], url=d["url"], sha256=d["sha256"], size=int(d["size"]), license=d["license"],
            description=d["description"], embedded=bool(d.get("embedded", False)), card=d.get("card"),
            method=d.get("method"), sampling=dict(d.get("sampling", {})), base_dir=base_dir,
        )

    def to_dict(self) -> dict:
        """The JSON object of the entry (optional fields only when set)."""
        d: dict[str, Any] = {
            "id": self.id, "title": self.title, "task": self.task, "inputs": list(self.inputs),
            "target": self.target, "version": self.version, "url": self.url, "sha256": self.sha256,
            "size": self.size, "license": self.license, "description": self.description,
        }
        if self.embedded:
            d["embedded"] = True
        for key in ("card", "method"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.sampling:
            d["sampling"] = dict(self.sampling)
        return d

    @property
    def is_remote(self) -> bool:
        """True when the archive is fetched over http(s) (``models download`` needs the network)."""
        return urlparse(self.url).scheme in ("http", "https")

    @property
    def is_placeholder(self) -> bool:
        """True for an entry whose archive has not been packed yet (placeholder checksum)."""
        return self.sha256 == PLACEHOLDER_SHA256

    @property
    def source(self) -> str:
        """``remote`` (http/https) or ``embedded`` (a file shipped with, or next to, the registry)."""
        return "remote" if self.is_remote else "embedded"

    def location(self) -> str:
        """The archive's absolute URL, or its local path with relative urls resolved against ``base_dir``."""
        if urlparse(self.url).scheme in ("http", "https", "file"):
            return self.url
        base = self.base_dir if self.base_dir is not None else resource_path()
        return str(Path(base, *self.url.split("/")))

    def card_path(self) -> Path | None:
        """The model card's path, when the entry names one."""
        if not self.card:
            return None
        base = self.base_dir if self.base_dir is not None else resource_path()
        return Path(base, *self.card.split("/"))

    def io_summary(self) -> str:
        """``inputs -> target`` for listings (plain super-resolution reads the degraded target)."""
        sources = list(self.inputs) if self.inputs else [self.target]
        if self.task == "both" and self.target not in sources:
            sources = [self.target, *sources]
        return f"{'+'.join(sources)} -> {self.target}"


@dataclass(frozen=True)
class Registry:
    """A loaded registry: its file and its entries in file order."""

    path: Path | None
    entries: tuple[ModelEntry, ...]

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.entries]

    def find(self, model_id: str) -> ModelEntry | None:
        """The entry with ``model_id``, or None."""
        return next((e for e in self.entries if e.id == model_id), None)

    def get(self, model_id: str) -> ModelEntry:
        """The entry with ``model_id``; an unknown id is an error that lists the known ones."""
        entry = self.find(model_id)
        if entry is None:
            known = ", ".join(self.ids) or "none"
            where = f" in {self.path}" if self.path else ""
            raise RegistryError(f"unknown model {model_id!r}{where}; known models: {known}")
        return entry


def registry_path(path: str | os.PathLike | None = None) -> Path:
    """The registry file to use: ``path``, else ``$SCOREFUSION_REGISTRY``, else ``Resources/models.json``."""
    if path is not None:
        return Path(path)
    override = os.environ.get(REGISTRY_ENV)
    return Path(override) if override else resource_path("models.json")


def schema_path() -> Path:
    return resource_path("schemas", "models.schema.json")


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"cannot read {what} {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{what} {path} is not valid JSON: {exc}") from exc


def _where(error: Any) -> str:
    """``models[2].sha256`` from a jsonschema error's path."""
    text = ""
    for part in error.absolute_path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _check_required_fields(data: Any, schema: dict, source: str) -> None:
    """Without jsonschema: the schema's required keys, so that listing models never crashes on a bad file.

    The worker, which always has jsonschema, validates the registry fully before installing anything.
    """
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise RegistryError(f"{source} is not a valid model registry: it needs a 'models' list")
    missing = [k for k in schema["required"] if k not in data]
    required = schema["$defs"]["model"]["required"]
    for i, entry in enumerate(data["models"]):
        if not isinstance(entry, dict):
            raise RegistryError(f"{source} is not a valid model registry: models[{i}] is not an object")
        missing += [f"models[{i}].{k}" for k in required if k not in entry]
    if missing:
        raise RegistryError(f"{source} is not a valid model registry: missing {', '.join(missing[:5])}")


def validate_registry_data(data: Any, source: str = "registry") -> None:
    """Check a registry's JSON against the schema and the rules a schema cannot say.

    Those rules: ids are unique, ``mt`` models have inputs that do not include the target, and
    an ``embedded`` model's url is a relative path (it must ship with the registry).
    """
    schema = read_json(schema_path(), "registry schema")
    try:
        import jsonschema
    except ImportError:  # Slicer's own Python before the first Apply installed the worker's packages
        _check_required_fields(data, schema, source)
    else:
        validator = jsonschema.Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.message))
        if errors:
            shown = "; ".join(f"{_where(e)}: {e.message}" for e in errors[:5])
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise RegistryError(f"{source} is not a valid model registry: {shown}{more}")
    seen: set[str] = set()
    for i, entry in enumerate(data["models"]):
        where = f"{source}: models[{i}] ({entry['id']})"
        if entry["id"] in seen:
            raise RegistryError(f"{where}: the id is used twice")
        seen.add(entry["id"])
        if entry["task"] == "mt" and (not entry["inputs"] or entry["target"] in entry["inputs"]):
            raise RegistryError(f"{where}: an mt model needs inputs other than its target")
        if entry.get("embedded") and urlparse(entry["url"]).scheme:
            raise RegistryError(f"{where}: an embedded model's url must be a path relative to the registry folder")


def parse_registry(data: Any, path: Path | None = None, source: str = "registry") -> Registry:
    """A :class:`Registry` from JSON data, validated first; relative urls resolve against ``path``'s folder."""
    validate_registry_data(data, source)
    base = path.resolve().parent if path is not None else None
    return Registry(path, tuple(ModelEntry.from_dict(d, base) for d in data["models"]))


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """Load and validate the registry file chosen by :func:`registry_path`."""
    file = registry_path(path)
    return parse_registry(read_json(file, "model registry"), file, str(file))
