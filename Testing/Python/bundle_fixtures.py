"""Build small model bundles with random (re-initialised) plane weights for pipeline tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ScoreFusionLib.bundle import (
    Manifest,
    PlaneEntry,
    plane_file_name,
    read_manifest,
    save_weights,
    write_manifest,
)
from ScoreFusionLib.data.slices import plane_input_channels
from ScoreFusionLib.data.task import TaskSpec
from ScoreFusionLib.nets.configs import unet2d_config
from ScoreFusionLib.nets.unet2d import UNet2D, kaiming_reinit_


def make_random_bundle(
    folder: Path,
    spec: TaskSpec,
    planes: Sequence[str] = ("axial", "coronal", "sagittal"),
    neighbors: int = 0,
    seed: int = 0,
    scale: float = 0.05,
    grid: dict | None = None,
) -> Path:
    """A bundle of ``tiny`` plane nets whose weights are Kaiming re-initialised and scaled down.

    Scaling keeps the noise estimates small and finite, so sampling stays well behaved;
    the point is a real network in the real pipeline, not a useful model.
    """
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for i, plane in enumerate(planes):
        config = unet2d_config("tiny", plane_input_channels(spec.n_conditions, neighbors))
        model = UNet2D(config)
        kaiming_reinit_(model, generator=torch.Generator().manual_seed(seed + i))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale ** (1.0 / 8))
        state = model.state_dict()
        sha = save_weights(folder / plane_file_name(plane), {"raw": state, "ema": state})
        entries[plane] = PlaneEntry(config.to_dict(), plane_file_name(plane), sha, steps=0)
    write_manifest(folder, Manifest(task=spec.to_dict(), neighbors=neighbors, planes=entries, grid=grid or {},
                                    training={"note": "random weights for tests"}))
    return folder


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised head included) with small seeded Gaussian values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def add_fuser(bundle: Path, preset: str = "tiny", aligned: bool = False, random_seed: int | None = None) -> Path:
    """Add a freshly built fuser (zero head: exactly the plane average) or, with ``random_seed``,
    a randomised one to a bundle, recorded as a finished phase-crops fuser."""
    from ScoreFusionLib.data.slices import plane_axis
    from ScoreFusionLib.nets.configs import UNet2DConfig
    from ScoreFusionLib.nets.fuser_config import fuser_config
    from ScoreFusionLib.nets.score_fuser import ScoreFuser

    manifest = read_manifest(bundle)
    n = len(manifest.planes)
    m = TaskSpec.from_dict(manifest.task).n_conditions
    sources, channels = (), ()
    if aligned:
        sources = tuple((p, plane_axis(p)) for p in manifest.planes)
        plane_cfg = UNet2DConfig.from_dict(next(iter(manifest.planes.values())).config)
        channels = tuple(plane_cfg.feature_channels.items())
    config = fuser_config(preset, 1 + m + 3 + 1 + n, n, aligned_sources=sources, aligned_channels=channels)
    torch.manual_seed(0)
    model = ScoreFuser(config)
    if random_seed is not None:
        randomize_(model, random_seed)
    state = model.state_dict()
    sha = save_weights(bundle / "fuser-crops.safetensors", {"raw": state, "ema": state})
    entry = {"config": config.to_dict(), "file": "fuser-crops.safetensors", "sha256": sha, "steps": 0, "metrics": {}}
    manifest.fuser = {**entry, "phase": "crops", "plane_weights": "ema",
                      "plane_sha256": {p: e.sha256 for p, e in manifest.planes.items()}, "phases": {"crops": entry}}
    write_manifest(bundle, manifest)
    return bundle


def blob(shape_kji: Sequence[int], rng: np.random.Generator, offset: float = 0.0) -> np.ndarray:
    """A smooth positive test image (Gaussian bump plus a little noise) with a zero border."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_kji], indexing="ij")
    body = np.exp(-(k**2 + j**2 + i**2) * 2.0) * 100.0 + offset
    body += rng.random(tuple(shape_kji)) * 5.0
    body[0], body[:, 0], body[:, :, 0] = 0.0, 0.0, 0.0
    return body.astype(np.float32)
