"""Model bundles: a folder of safetensors weights described by one ``manifest.json``.

A bundle is everything needed to run a trained model without the training code's memory:
the task (inputs, target, degradation, normalisation), the plane networks' configurations
and weights (raw and EMA), the diffusion conventions and the training provenance. Weights
are safetensors only (never pickle); every weight file's sha256 is recorded in the manifest
and checked on load, so a corrupted or swapped file is refused with a specific message.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import atomic_path, write_text_atomic
from .errors import ScoreFusionError

FORMAT_NAME = "scorefusion-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHT_SETS = ("raw", "ema")


class BundleError(ScoreFusionError):
    """A bundle that is missing, incomplete, corrupted or of an unknown format."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def plane_file_name(plane: str) -> str:
    return f"plane-{plane}.safetensors"


#: Weight file of the fuser (network and alignment layers, raw and EMA sets).
FUSER_FILE = "fuser.safetensors"


@dataclass
class PlaneEntry:
    """One plane network of a bundle."""

    config: dict
    file: str
    sha256: str = ""
    steps: int = 0
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"config": self.config, "file": self.file, "sha256": self.sha256, "steps": self.steps,
                "metrics": self.metrics}


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of a bundle."""

    task: dict
    neighbors: int
    planes: dict[str, PlaneEntry]
    grid: dict = field(default_factory=dict)
    diffusion: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    #: the trained fuser, when there is one: ``config``, ``file``, ``sha256``, ``phase``, ``steps``,
    #: ``plane_weights`` (the set it was trained with), ``plane_sha256``, ``metrics``, ``training``
    fuser: dict | None = None
    license: str = "MIT"
    intended_use: str = "Research and demonstration only; not for clinical use."

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "task": self.task,
            "neighbors": self.neighbors,
            "coordinates": {"formula": "2*idx/n - 1", "order": ["x", "y", "z"]},
            "grid": self.grid,
            "diffusion": self.diffusion,
            "planes": {p: e.to_dict() for p, e in self.planes.items()},
            "training": self.training,
            **({"fuser": self.fuser} if self.fuser else {}),
            "license": self.license,
            "intended_use": self.intended_use,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "manifest") -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise BundleError(f"{source} is not a ScoreFusion bundle manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{source} has format version {d.get('format_version')!r}; this ScoreFusion reads "
                f"version {FORMAT_VERSION}"
            )
        try:
            planes = {
                p: PlaneEntry(e["config"], e["file"], e.get("sha256", ""), int(e.get("steps", 0)),
                              dict(e.get("metrics", {})))
                for p, e in d["planes"].items()
            }
            return cls(
                task=d["task"], neighbors=int(d["neighbors"]), planes=planes, grid=d.get("grid", {}),
                diffusion=d.get("diffusion", {}), training=d.get("training", {}), fuser=d.get("fuser"),
                license=d.get("license", "unknown"), intended_use=d.get("intended_use", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{source} is missing or has a malformed field: {exc}") from exc


def read_manifest(bundle_dir: str | os.PathLike) -> Manifest:
    """Parse and validate a bundle's manifest (no weights are read)."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a model bundle: {MANIFEST} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    return Manifest.from_dict(data, str(path))


def write_manifest(bundle_dir: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / MANIFEST
    write_text_atomic(path, json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n")
    return path


def save_weights(path: str | os.PathLike, sets: dict[str, dict[str, Any]], metadata: dict | None = None) -> str:
    """Write named state dicts (``{"raw": sd, "ema": sd}``) into one safetensors file atomically.

    Keys are stored as ``<set>/<parameter name>``. Returns the file's sha256.
    """
    from safetensors.torch import save_file

    flat = {}
    for name, state in sets.items():
        if name not in WEIGHT_SETS:
            raise BundleError(f"unknown weight set {name!r}; use {WEIGHT_SETS}")
        for key, tensor in state.items():
            flat[f"{name}/{key}"] = tensor.detach().to("cpu").clone().contiguous()
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(flat, str(tmp), metadata=meta)
    return sha256_file(path)


def load_weights(path: str | os.PathLike, which: str = "ema", expected_sha256: str | None = None) -> dict:
    """One weight set from a safetensors file, after checking its sha256 when given."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise BundleError(f"weight file {p} is missing")
    if expected_sha256:
        actual = sha256_file(p)
        if actual != expected_sha256:
            raise BundleError(
                f"weight file {p.name} is corrupted or was replaced: sha256 {actual[:16]}... "
                f"does not match the manifest's {expected_sha256[:16]}..."
            )
    try:
        flat = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"cannot read weight file {p.name}: {exc}") from exc
    prefix = f"{which}/"
    state = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    if not state:
        present = sorted({k.split("/", 1)[0] for k in flat})
        raise BundleError(f"weight file {p.name} holds no {which!r} weights (present: {present})")
    return state


def load_state_into(model: Any, state: dict, source: str) -> None:
    """``model.load_state_dict`` with a specific message for missing, extra or misshapen tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise BundleError(
            f"{source} does not fit the network: {len(missing)} missing tensors {missing[:3]}, "
            f"{len(extra)} unexpected tensors {extra[:3]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise BundleError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)}, the network expects "
                f"{tuple(own[key].shape)}"
            )
        if tensor.dtype != own[key].dtype:
            raise BundleError(f"{source}: tensor {key} has dtype {tensor.dtype}, expected {own[key].dtype}")
    model.load_state_dict(state)


def load_plane_models(bundle_dir: str | os.PathLike, planes: list[str] | None = None,
                      which: str = "ema", device: str = "cpu") -> tuple[Manifest, dict[str, Any]]:
    """Build each plane network of a bundle and load its verified weights (eval mode)."""
    from .nets.configs import UNet2DConfig
    from .nets.unet2d import UNet2D

    manifest = read_manifest(bundle_dir)
    chosen = planes or list(manifest.planes)
    models = {}
    for plane in chosen:
        if plane not in manifest.planes:
            raise BundleError(f"bundle has no {plane} model (it has {', '.join(manifest.planes)})")
        entry = manifest.planes[plane]
        model = UNet2D(UNet2DConfig.from_dict(entry.config))
        state = load_weights(Path(bundle_dir) / entry.file, which, entry.sha256 or None)
        load_state_into(model, state, f"{plane} weights in {bundle_dir}")
        models[plane] = model.to(device).eval()
    return manifest, models


def load_fuser(bundle_dir: str | os.PathLike, which: str = "ema", plane_weights: str = "ema",
               device: str = "cpu") -> tuple[Manifest, Any]:
    """Build a bundle's :class:`~ScoreFusionLib.nets.score_fuser.ScoreFuser` and load its verified weights.

    The fuser learned to correct specific plane weights (method.md pitfall 7), so it is refused
    when the plane files changed since it was trained or ``plane_weights`` (the set the plane
    models will run with) differs from the set it was trained with.
    """
    from .nets.fuser_config import Fuser3DConfig
    from .nets.score_fuser import ScoreFuser

    manifest = read_manifest(bundle_dir)
    entry = manifest.fuser
    if not entry:
        raise BundleError(f"bundle {bundle_dir} has no trained fuser; train one with `scorefusion train fuser`")
    if entry.get("plane_weights", "ema") != plane_weights:
        raise BundleError(
            f"the fuser was trained with the {entry.get('plane_weights')!r} plane weights; running the planes "
            f"with {plane_weights!r} weights would not match it"
        )
    for plane, sha in entry.get("plane_sha256", {}).items():
        current = manifest.planes.get(plane)
        if current is None or current.sha256 != sha:
            raise BundleError(
                f"the {plane} plane model changed after the fuser was trained (sha256 mismatch); "
                "retrain the fuser for the current plane models"
            )
    try:
        config = Fuser3DConfig.from_dict(entry["config"])
        file, sha = entry["file"], entry.get("sha256") or None
    except (KeyError, TypeError) as exc:
        raise BundleError(f"the fuser entry of {bundle_dir}/{MANIFEST} is malformed: {exc}") from exc
    model = ScoreFuser(config)
    state = load_weights(Path(bundle_dir) / file, which, sha)
    load_state_into(model, state, f"fuser weights in {bundle_dir}")
    return manifest, model.to(device).eval()
