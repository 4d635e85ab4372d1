"""Small segmenter bundles and tumour cases for segmentation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ScoreFusionLib.segmentation.model_bundle import SegmenterManifest, write_segmenter_bundle
from ScoreFusionLib.segmentation.network import SegmenterNetwork, build_segresnet
from ScoreFusionLib.volume import Volume


def tiny_network() -> SegmenterNetwork:
    """Two levels, 8 filters: fast on CPU, window sides multiples of 2."""
    return SegmenterNetwork(init_filters=8, blocks_down=(1, 1), blocks_up=(1,))


def make_random_segmenter(folder: Path, seed: int = 0, spacing: float = 2.0, roi: int = 16,
                          convention: str = "brats2023", channels=("t1n", "t1c", "t2w", "t2f")) -> Path:
    """A segmenter bundle with seeded random weights (a real network in the real pipeline)."""
    network = tiny_network()
    torch.manual_seed(seed)
    state = build_segresnet(network).state_dict()
    manifest = SegmenterManifest(network=network, channels=tuple(channels), spacing_mm=(spacing,) * 3,
                                 roi_size_ijk=(roi,) * 3, label_convention=convention, weights_sha256="",
                                 training={"note": "random weights for tests"})
    return write_segmenter_bundle(folder, manifest, {"ema": state, "raw": state})


def tumour_volumes(shape_kji=(20, 24, 22), spacing: float = 2.0, seed: int = 0,
                   centre=None) -> tuple[dict[str, Volume], np.ndarray]:
    """Four contrasts of a box "head" with a spherical lesion, and its brats2023 label map."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape_kji)
    centre = np.array(shape_kji) / 2 if centre is None else np.asarray(centre, dtype=float)
    r = np.sqrt((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
    labels = np.zeros(shape_kji, np.uint8)
    labels[r < 5] = 2
    labels[r < 3] = 3
    labels[r < 1.5] = 1
    affine = np.diag([spacing, spacing, spacing, 1.0])
    head = np.zeros(shape_kji, bool)
    head[2:-2, 2:-2, 2:-2] = True
    means = {"t1n": (100, 80, 90, 70), "t1c": (100, 80, 200, 70), "t2w": (60, 150, 120, 180), "t2f": (70, 200, 150, 60)}
    volumes = {}
    for name, (tissue, edema, enhancing, necrotic) in means.items():
        a = np.where(head, tissue, 0).astype(np.float32)
        a[labels == 2], a[labels == 3], a[labels == 1] = edema, enhancing, necrotic
        a += rng.normal(0, 3, a.shape).astype(np.float32) * head
        volumes[name] = Volume(a, affine)
    return volumes, labels


def write_tumour_cases(root: Path, n: int = 4, shape_kji=(24, 24, 24), spacing: float = 2.0) -> Path:
    """``n`` ScoreFusionSim-layout cases (four contrasts + seg, brats2023) with lesions at random places."""
    import nibabel as nib

    for c in range(1, n + 1):
        rng = np.random.default_rng(c)
        centre = rng.uniform(7, np.array(shape_kji) - 7)
        volumes, labels = tumour_volumes(shape_kji, spacing, seed=c, centre=centre)
        cid = f"ScoreFusionSim-{c:05d}"
        folder = root / cid
        folder.mkdir(parents=True, exist_ok=True)
        affine = np.diag([spacing, spacing, spacing, 1.0])
        for name, volume in {**volumes, "seg": labels}.items():
            array = np.transpose(np.asarray(volume.array if name != "seg" else volume), (2, 1, 0))
            nib.save(nib.Nifti1Image(array, affine), str(folder / f"{cid}-{name}.nii.gz"))
    return root
