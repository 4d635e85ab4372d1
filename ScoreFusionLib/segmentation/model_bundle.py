"""Segmenter bundles: one safetensors file described by a ``manifest.json``.

A segmenter bundle records everything inference must reproduce: the network, the input
channel order, the intensity normalisation, the voxel size and orientation the network was
trained at, the sliding-window settings, the label convention it writes by default, and the
weights' sha256. It is a different format from the translation bundles
(``format: scorefusion-segmenter``), checked as completely before use: every field, the
weight file's name, sha256 and tensors (against the network built on the ``meta`` device).
Weights are safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..bundle import MANIFEST, BundleError, load_state_into, load_weights, save_weights
from ..errors import InputError
from ..labels import CONVENTIONS
from .network import REGION_CHANNELS, SegmenterNetwork

FORMAT_NAME = "scorefusion-segmenter"
FORMAT_VERSION = 1
WEIGHTS_FILE = "segmenter.safetensors"
#: Normalisations inference knows: z-score per channel over its nonzero voxels (MONAI's
#: ``NormalizeIntensity(nonzero=True, channel_wise=True)``); zeros stay zero.
NORMALIZATIONS = ("zscore-nonzero",)
#: Spatial layout of the tensors the network was trained on: ``kji`` (this library's arrays) or
#: ``ijk`` (nibabel/MONAI arrays, e.g. the MONAI model zoo); convolutions are not symmetric under
#: axis reversal, so inference must feed the layout the weights expect.
LAYOUTS = ("kji", "ijk")
INTENDED_USE = "Research and demonstration only; not for clinical use."


@dataclass
class SegmenterManifest:
    """The parsed manifest of a segmenter bundle."""

    network: SegmenterNetwork
    channels: tuple[str, ...]
    spacing_mm: tuple[float, float, float]
    roi_size_ijk: tuple[int, int, int]
    label_convention: str
    weights_sha256: str
    overlap: float = 0.5
    threshold: float = 0.5
    normalization: str = "zscore-nonzero"
    layout: str = "kji"
    weights_file: str = WEIGHTS_FILE
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    license: str = "MIT"
    intended_use: str = INTENDED_USE

    def __post_init__(self) -> None:
        from ..data.records import canonical_contrast

        self.channels = tuple(canonical_contrast(c) for c in self.channels)
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)
        self.roi_size_ijk = tuple(int(n) for n in self.roi_size_ijk)
        if len(set(self.channels)) != len(self.channels) or len(self.channels) != self.network.in_channels:
            raise InputError(f"channels {list(self.channels)} must name {self.network.in_channels} different "
                             "contrasts (the network's input channels)")
        if len(self.spacing_mm) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing_mm):
            raise InputError(f"spacing_mm must be three positive sizes, got {list(self.spacing_mm)}")
        d = self.network.divisor
        if len(self.roi_size_ijk) != 3 or any(n < d or n % d for n in self.roi_size_ijk):
            raise InputError(f"roi_size_ijk {list(self.roi_size_ijk)} must be three multiples of {d}")
        if self.label_convention not in CONVENTIONS:
            raise InputError(f"unknown label convention {self.label_convention!r}; use {sorted(CONVENTIONS)}")
        if self.layout not in LAYOUTS:
            raise InputError(f"unknown tensor layout {self.layout!r}; use {', '.join(LAYOUTS)}")
        if self.normalization not in NORMALIZATIONS:
            raise InputError(f"unknown normalization {self.normalization!r}; use {', '.join(NORMALIZATIONS)}")
        if not 0.0 <= float(self.overlap) < 1.0 or not 0.0 < float(self.threshold) < 1.0:
            raise InputError(f"overlap must lie in [0, 1) and threshold in (0, 1), got {self.overlap}, "
                             f"{self.threshold}")

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "network": {"architecture": "monai.networks.nets.SegResNet", **self.network.to_dict()},
            "channels": list(self.channels),
            "normalization": self.normalization,
            "orientation": "RAS",
            "layout": self.layout,
            "spacing_mm": list(self.spacing_mm),
            "outputs": {"regions": list(REGION_CHANNELS), "activation": "sigmoid", "threshold": self.threshold},
            "inference": {"roi_size_ijk": list(self.roi_size_ijk), "overlap": self.overlap, "blend": "gaussian"},
            "label_convention": self.label_convention,
            "weights": {"file": self.weights_file, "sha256": self.weights_sha256},
            **({"training": self.training} if self.training else {}),
            **({"metrics": self.metrics} if self.metrics else {}),
            **({"source": self.source} if self.source else {}),
            **({"model": self.model} if self.model else {}),
            "license": self.license,
            "intended_use": self.intended_use,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "manifest") -> SegmenterManifest:
        if not isinstance(d, dict):
            raise BundleError(f"{source} must hold a JSON object, not {type(d).__name__}")
        if d.get("format") != FORMAT_NAME:
            raise BundleError(f"{source} is not a ScoreFusion segmenter manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{source} has segmenter format version {d.get('format_version')!r}; this "
                              f"ScoreFusion reads version {FORMAT_VERSION}")
        try:
            network = {k: v for k, v in d["network"].items() if k != "architecture"}
            if d.get("orientation", "RAS") != "RAS" or d["outputs"]["regions"] != list(REGION_CHANNELS):
                raise InputError("only RAS-oriented networks with TC, WT, ET region outputs are supported")
            return cls(
                network=SegmenterNetwork.from_dict(network), channels=tuple(d["channels"]),
                spacing_mm=tuple(d["spacing_mm"]), roi_size_ijk=tuple(d["inference"]["roi_size_ijk"]),
                overlap=float(d["inference"].get("overlap", 0.5)), threshold=float(d["outputs"]["threshold"]),
                label_convention=d["label_convention"], normalization=d["normalization"],
                layout=d.get("layout", "kji"),
                weights_file=d["weights"]["file"], weights_sha256=d["weights"]["sha256"],
                training=dict(d.get("training", {})), metrics=dict(d.get("metrics", {})),
                source=dict(d.get("source", {})), model=dict(d.get("model", {})),
                license=d.get("license", "unknown"), intended_use=d.get("intended_use", ""),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{source} is missing or has a malformed field: {exc}") from exc


def is_segmenter_bundle(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder whose manifest declares the segmenter format."""
    manifest = Path(path) / MANIFEST
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def read_segmenter_manifest(bundle_dir: str | os.PathLike) -> SegmenterManifest:
    """Parse and check a segmenter bundle's manifest (weights are not read)."""
    root = Path(bundle_dir)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root} is not a segmenter bundle folder")
    if not path.is_file():
        raise BundleError(f"{root} is not a segmenter bundle: {MANIFEST} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    return SegmenterManifest.from_dict(data, str(path))


def validate_segmenter_bundle(bundle_dir: str | os.PathLike) -> SegmenterManifest:
    """Check a segmenter bundle completely (manifest, weight file, tensors, card) and return its manifest."""
    from ..bundle_validation import bundle_file, check_weight_file, expected_tensors

    manifest = read_segmenter_manifest(bundle_dir)
    root = Path(bundle_dir)
    expected = expected_tensors("segmenter", json.dumps(manifest.network.to_dict(), sort_keys=True),
                                "segmenter network")
    check_weight_file(root, "segmenter", manifest.weights_file, manifest.weights_sha256, expected)
    card = manifest.model.get("card")
    if card and not bundle_file(root, card, "model card").is_file():
        raise BundleError(f"the model card {card} named in {root / MANIFEST} is missing")
    return manifest


def write_segmenter_bundle(out: str | os.PathLike, manifest: SegmenterManifest, weights: dict[str, dict],
                           card: str | None = None, overwrite: bool = False) -> Path:
    """Write a complete bundle folder atomically: weights (``{"ema": sd[, "raw": sd]}``), manifest, card.

    ``manifest.weights_sha256`` is filled in here. An existing ``out`` is replaced only with
    ``overwrite``, and only once the new bundle is complete.
    """
    from ..atomic import publish_directory

    final = Path(out)
    if final.exists() and not overwrite:
        raise InputError(f"{final} already exists; pass --overwrite to replace it")

    def build(tmp: Path) -> None:
        manifest.weights_sha256 = save_weights(tmp / manifest.weights_file, weights,
                                               metadata={"format": FORMAT_NAME})
        if card is not None:
            (tmp / "card.md").write_text(card, encoding="utf-8")
            manifest.model = {**manifest.model, "card": "card.md"}
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")

    publish_directory(final, build, overwrite=overwrite)
    return final


@dataclass
class LoadedSegmenter:
    """A segmenter ready to run: its manifest, the network (eval mode) and where it came from."""

    manifest: SegmenterManifest
    network: Any
    path: Path
    device: str


def load_segmenter(bundle_dir: str | os.PathLike, device: str = "cpu") -> LoadedSegmenter:
    """Validate a segmenter bundle, build its network and load the verified weights onto ``device``."""
    from .network import build_segresnet

    manifest = validate_segmenter_bundle(bundle_dir)
    net = build_segresnet(manifest.network)
    state = load_weights(Path(bundle_dir) / manifest.weights_file, "ema", manifest.weights_sha256)
    load_state_into(net, state, f"segmenter weights in {bundle_dir}")
    return LoadedSegmenter(manifest, net.to(device).eval(), Path(bundle_dir), device)
