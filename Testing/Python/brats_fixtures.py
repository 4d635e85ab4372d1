"""Tiny generated BraTS-style and simulated case folders for the data tests.

Everything is written with nibabel into a temporary folder; CI never needs real BraTS data.
Arrays are given in (k, j, i) order, like the library's volumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: File suffix per canonical contrast, per naming scheme.
SUFFIXES = {
    "brats2021": {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"},
    "brats2023": {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f", "seg": "seg"},
    "simulated": {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f", "pdw": "pdw", "seg": "seg"},
}
SEPARATOR = {"brats2021": "_", "brats2023": "-", "simulated": "-"}
DEFAULT_IDS = {
    "brats2021": "BraTS2021_00000",
    "brats2023": "BraTS-GLI-00000-000",
    "simulated": "ScoreFusionSim-00001",
}

SHAPE_IJK = (12, 10, 8)


def affine_1mm(origin=(-5.0, 3.0, 10.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, 3] = origin
    return a


def image_kji(seed: int, shape_ijk=SHAPE_IJK, background: float = 0.0) -> np.ndarray:
    """A positive random "brain" inside a zero (or ``background``) border, (k, j, i) order."""
    rng = np.random.default_rng(seed)
    shape = tuple(shape_ijk[::-1])
    arr = np.full(shape, background, dtype=np.float32)
    inner = tuple(slice(1, n - 1) for n in shape)
    arr[inner] = background + 10.0 + 100.0 * rng.random(tuple(n - 2 for n in shape))
    return arr


def seg_kji(values=(0, 1, 2), shape_ijk=SHAPE_IJK) -> np.ndarray:
    arr = np.zeros(tuple(shape_ijk[::-1]), dtype=np.uint8)
    flat = arr.reshape(-1)
    for n, v in enumerate(values):
        flat[n * 3 : n * 3 + 3] = v
    return arr


def write_nifti(path: Path, array_kji: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = affine_1mm() if affine is None else affine
    img = nib.Nifti1Image(np.transpose(np.asarray(array_kji), (2, 1, 0)), affine)
    nib.save(img, str(path))
    return path


def case_file(folder: Path, scheme: str, contrast: str, ext: str = ".nii.gz") -> Path:
    case_id = folder.name
    return folder / f"{case_id}{SEPARATOR[scheme]}{SUFFIXES[scheme][contrast]}{ext}"


def make_case(
    root: Path,
    scheme: str,
    case_id: str | None = None,
    contrasts=None,
    seg: bool = True,
    seg_values=(0, 1, 2),
    shape_ijk=SHAPE_IJK,
    affine: np.ndarray | None = None,
    ext: str = ".nii.gz",
    seed: int = 0,
    sidecar: dict | None = None,
) -> Path:
    """Write one case folder; returns it. ``contrasts`` defaults to all of the scheme's images."""
    case_id = case_id or DEFAULT_IDS[scheme]
    folder = Path(root) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    names = [c for c in SUFFIXES[scheme] if c != "seg"] if contrasts is None else list(contrasts)
    for n, c in enumerate(names):
        write_nifti(case_file(folder, scheme, c, ext), image_kji(seed * 10 + n, shape_ijk), affine)
    if seg:
        write_nifti(case_file(folder, scheme, "seg", ext), seg_kji(seg_values, shape_ijk), affine)
    if sidecar is not None:
        (folder / f"{case_id}.json").write_text(json.dumps(sidecar), encoding="utf-8")
    return folder
