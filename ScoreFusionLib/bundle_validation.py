"""Full check of a model bundle folder before it is used, packed or installed.

:func:`ScoreFusionLib.bundle.read_manifest` only parses the manifest, and loading checks one
weight file at a time, late. A bundle that arrives from elsewhere (a download, a zip, a
colleague's folder) is checked here once and completely, so that every problem is refused up
front with a message naming the file or field: the manifest against its JSON schema, the task
against the plane configurations, each weight file's safetensors header (names, shapes and
dtypes of every weight set against the network its configuration describes, built on the
``meta`` device so no memory is allocated) and its sha256, and a fuser against the plane files
it was trained for. Headers are read with ``safetensors.safe_open``; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .bundle import FORMAT_NAME, FORMAT_VERSION, MANIFEST, WEIGHT_SETS, BundleError, Manifest, sha256_file
from .errors import ScoreFusionError

#: File name of the manifest's JSON schema under ``Resources/schemas``.
SCHEMA_NAME = "bundle-manifest.schema.json"

#: safetensors dtype names of the torch dtypes a network may hold.
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


@dataclass(frozen=True)
class WeightFile:
    """One verified weight file of a bundle.

    Attributes
    ----------
    role : ``axial``, ``coronal``, ``sagittal`` or ``fuser``.
    file : its name inside the bundle folder.
    sha256 : its hex sha256 (equal to the manifest's).
    size : its size in bytes.
    weight_sets : the weight sets it holds, in :data:`~ScoreFusionLib.bundle.WEIGHT_SETS` order.
    """

    role: str
    file: str
    sha256: str
    size: int
    weight_sets: tuple[str, ...]


@dataclass(frozen=True)
class BundleReport:
    """What :func:`inspect_bundle` verified: the manifest, its raw JSON and every weight file."""

    path: Path
    manifest: Manifest
    #: the manifest as stored (keeps fields :class:`Manifest` does not model, e.g. ``model``)
    data: dict
    files: tuple[WeightFile, ...]
    #: bytes of the manifest, the weight files and the model card
    total_bytes: int

    @property
    def weight_sets(self) -> dict[str, tuple[str, ...]]:
        """Weight sets held by each file, keyed by file name."""
        return {f.file: f.weight_sets for f in self.files}

    @property
    def common_weight_sets(self) -> tuple[str, ...]:
        """Weight sets every file holds (always includes ``ema``)."""
        return tuple(s for s in WEIGHT_SETS if all(s in f.weight_sets for f in self.files))

    @property
    def model(self) -> dict:
        """The manifest's optional ``model`` block (id, title, version, ...), or {}."""
        return dict(self.data.get("model") or {})


def validate_bundle(bundle_dir: str | os.PathLike) -> Manifest:
    """Check a bundle folder completely and return its manifest.

    Raises
    ------
    BundleError
        With a message naming the file or manifest field at fault (see :func:`inspect_bundle`).
    """
    return inspect_bundle(bundle_dir).manifest


def inspect_bundle(bundle_dir: str | os.PathLike) -> BundleReport:
    """Check a bundle folder completely and report its weight files and weight sets.

    Checks, in order: the manifest exists and is JSON; its format and version; the JSON schema
    (the first violation's path is reported); the task against the plane input channels; each
    weight file's name (a plain name inside the folder), presence, safetensors header, sha256
    and tensors (per weight set: ``ema`` required, ``raw`` optional; no missing, unexpected,
    misshapen or wrongly typed tensor); that the fuser was trained for these plane files; and
    that a named model card exists.

    Raises
    ------
    BundleError
        On the first problem found.
    """
    root = Path(bundle_dir)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root} is not a model bundle folder")
    if not path.is_file():
        raise BundleError(f"{root} is not a model bundle: {MANIFEST} not found")
    source = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    check_manifest_data(data, source)
    manifest = Manifest.from_dict(data, source)
    _check_task(manifest, source)

    files: list[WeightFile] = []
    for plane, entry in manifest.planes.items():
        expected = expected_tensors("plane", json.dumps(entry.config, sort_keys=True), f"{plane} config")
        files.append(check_weight_file(root, plane, entry.file, entry.sha256, expected))
    if manifest.fuser:
        fuser = manifest.fuser
        _check_fuser_planes(manifest, source)
        expected = expected_tensors("fuser", json.dumps(fuser["config"], sort_keys=True), "fuser config")
        files.append(check_weight_file(root, "fuser", fuser["file"], fuser["sha256"], expected))
        if fuser["plane_weights"] == "raw":
            for wf in files:
                if wf.role != "fuser" and "raw" not in wf.weight_sets:
                    raise BundleError(
                        f"the fuser runs with the 'raw' plane weights, but weight file {wf.file} ({wf.role}) "
                        "holds no 'raw' set"
                    )
    seen: dict[str, str] = {}
    for wf in files:
        if wf.file in seen:
            raise BundleError(f"weight file {wf.file} is named by both the {seen[wf.file]} and the {wf.role} entries "
                              f"of {source}")
        seen[wf.file] = wf.role

    total = path.stat().st_size + sum(wf.size for wf in files)
    card = (data.get("model") or {}).get("card")
    if card:
        card_path = bundle_file(root, card, "model card")
        if not card_path.is_file():
            raise BundleError(f"the model card {card} named in {source} is missing")
        total += card_path.stat().st_size
    return BundleReport(root, manifest, data, tuple(files), total)


def bundle_file(bundle_dir: str | os.PathLike, name: str, what: str = "file") -> Path:
    """``bundle_dir / name`` after checking that ``name`` is a plain file name that stays in the folder.

    Raises
    ------
    BundleError
        For path separators, ``.``/``..``, drive letters, or a link resolving outside the folder.
    """
    root = Path(bundle_dir)
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\:\x00"):
        raise BundleError(f"{what} {name!r} is not a plain file name inside the bundle folder {root}")
    path = root / name
    resolved = path.resolve()
    if resolved.parent != root.resolve():
        raise BundleError(f"{what} {name} escapes the bundle folder {root} (it resolves to {resolved})")
    return path


@lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    from .resources import resource_path

    schema_path = resource_path("schemas", SCHEMA_NAME)
    try:
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ScoreFusionError(f"cannot read the bundle manifest schema {schema_path}: {exc}") from exc
    return Draft202012Validator(schema)


def manifest_schema() -> dict:
    """The bundle manifest's JSON schema (draft 2020-12)."""
    return _validator().schema


def check_manifest_data(data: Any, source: str) -> None:
    """Check a parsed manifest's format, version and JSON schema (no files are read).

    Raises
    ------
    BundleError
        Naming ``source`` and, for a schema violation, the JSON path of the offending field.
    """
    _check_format(data, source)
    _check_schema(data, source)


def _check_format(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise BundleError(f"{source} must hold a JSON object, not {type(data).__name__}")
    if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
        Manifest.from_dict(data, source)  # raises the clear "not a bundle" / "format version" message


def _check_schema(data: dict, source: str) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(data))
    if error is not None:
        message = error.message if len(error.message) <= 300 else error.message[:297] + "..."
        raise BundleError(f"{source} violates the bundle manifest schema at {error.json_path}: {message}")


def _check_task(manifest: Manifest, source: str) -> None:
    """The task must be usable and every plane network must take its input channels."""
    from .data.slices import plane_input_channels
    from .data.task import TaskSpec

    try:
        spec = TaskSpec.from_dict(manifest.task)
        channels = plane_input_channels(spec.n_conditions, manifest.neighbors)
    except (ScoreFusionError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"the task in {source} is invalid: {exc}") from exc
    for plane, entry in manifest.planes.items():
        if entry.config["in_channels"] != channels:
            raise BundleError(
                f"the {plane} network of {source} takes {entry.config['in_channels']} input channels, but its task "
                f"({spec.n_conditions} condition(s), neighbors={manifest.neighbors}) gives {channels}"
            )


def _check_fuser_planes(manifest: Manifest, source: str) -> None:
    """The fuser learned to correct specific plane weights: they must be the bundle's plane files."""
    fuser = manifest.fuser or {}
    trained = fuser["plane_sha256"]
    lacking = sorted(set(trained) - set(manifest.planes))
    if lacking:
        raise BundleError(f"the fuser of {source} was trained with the {', '.join(lacking)} plane model(s), "
                          "which the bundle does not have")
    untrained = sorted(set(manifest.planes) - set(trained))
    if untrained:
        raise BundleError(f"the fuser of {source} was trained without the {', '.join(untrained)} plane model(s); "
                          "retrain the fuser for the current plane models")
    for plane, sha in trained.items():
        if manifest.planes[plane].sha256 != sha:
            raise BundleError(
                f"the {plane} plane model changed after the fuser was trained (sha256 mismatch in {source}); "
                "retrain the fuser for the current plane models"
            )
    n = fuser["config"]["n_estimates"]
    if n != len(trained):
        raise BundleError(f"the fuser of {source} fuses {n} plane estimates, but the bundle has {len(trained)} "
                          "plane models")


def expected_tensors(kind: str, config_json: str, what: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and safetensors dtypes of the state dict of the network a config describes.

    ``kind`` is ``plane``, ``fuser`` or ``segmenter``; ``config_json`` the configuration as sorted JSON.
    """
    try:
        return _state_layout(kind, config_json)
    except (ScoreFusionError, TypeError, ValueError) as exc:
        raise BundleError(f"the {what} in the manifest is invalid: {exc}") from exc


@lru_cache(maxsize=16)
def _state_layout(kind: str, config_json: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Build the network on the ``meta`` device (no memory is allocated) and list its state dict."""
    import torch

    if kind == "plane":
        from .nets.configs import UNet2DConfig
        from .nets.unet2d import UNet2D

        config, net_class = UNet2DConfig.from_dict(json.loads(config_json)), UNet2D
    elif kind == "segmenter":
        from .segmentation.network import SegmenterNetwork, build_segresnet

        config, net_class = SegmenterNetwork.from_dict(json.loads(config_json)), build_segresnet
    else:
        from .nets.fuser_config import Fuser3DConfig
        from .nets.score_fuser import ScoreFuser

        config, net_class = Fuser3DConfig.from_dict(json.loads(config_json)), ScoreFuser
    with torch.device("meta"):
        net = net_class(config)
    return {k: (tuple(v.shape), _ST_DTYPES.get(str(v.dtype).removeprefix("torch."), str(v.dtype)))
            for k, v in net.state_dict().items()}


def _read_header(path: Path, label: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` of a safetensors file, from its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for key in f.keys():
                view = f.get_slice(key)
                out[key] = (tuple(view.get_shape()), view.get_dtype())
            return out
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{label} is truncated or not a safetensors file: {exc}") from exc


def check_weight_file(root: Path, role: str, name: str, sha256: str,
                       expected: dict[str, tuple[tuple[int, ...], str]]) -> WeightFile:
    label = f"weight file {name} ({role})"
    path = bundle_file(root, name, f"the {role} weight file")
    if not path.is_file():
        raise BundleError(f"{label} is missing from {root}")
    header = _read_header(path, label)
    actual = sha256_file(path)
    if actual != sha256:
        raise BundleError(f"{label} is corrupted or was replaced: sha256 {actual[:16]}... does not match the "
                          f"manifest's {sha256[:16]}...")
    sets: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    for key, info in header.items():
        set_name, sep, param = key.partition("/")
        if not sep or set_name not in WEIGHT_SETS:
            raise BundleError(f"{label} holds tensor {key!r} outside the {' and '.join(WEIGHT_SETS)} weight sets")
        sets.setdefault(set_name, {})[param] = info
    if "ema" not in sets:
        raise BundleError(f"{label} holds no 'ema' weights (present: {sorted(sets)})")
    for set_name in sorted(sets, key=lambda s: s != "ema"):  # the set inference uses first
        _compare(sets[set_name], expected, f"{label}, {set_name!r} set")
    return WeightFile(role, name, actual, path.stat().st_size, tuple(s for s in WEIGHT_SETS if s in sets))


def _compare(got: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, tuple[tuple[int, ...], str]],
             source: str) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise BundleError(
            f"{source} does not fit the network its config describes: {len(missing)} missing tensors {missing[:3]}, "
            f"{len(extra)} unexpected tensors {extra[:3]}"
        )
    for key, (shape, dtype) in got.items():
        want_shape, want_dtype = expected[key]
        if shape != want_shape:
            raise BundleError(f"{source}: tensor {key} has shape {shape}, the network expects {want_shape}")
        if dtype != want_dtype:
            raise BundleError(f"{source}: tensor {key} has dtype {dtype}, the network expects {want_dtype}")
