"""Tiny generated cohorts in the simulated (BraTS-2023-style) layout, for fast training tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

SHAPE_IJK = (16, 24, 16)


def write_cases(root: Path, n: int = 3, shape_ijk: Sequence[int] = SHAPE_IJK,
                contrasts: Sequence[str] = ("t1n", "t2f"), first: int = 1) -> Path:
    """Cases ``first .. first + n - 1``: smooth random tissue in an ellipsoid brain, t2f a function of t1n.

    The same case number always gives the same images, so two cohorts overlapping in ids agree.
    """
    import nibabel as nib
    from scipy import ndimage

    kji = tuple(shape_ijk[::-1])
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in kji], indexing="ij")
    brain = (x**2 + y**2 + z**2) < 0.8
    for c in range(first, first + n):
        rng = np.random.default_rng(100 + c)
        tissue = ndimage.gaussian_filter(rng.normal(size=kji), 2.0)
        tissue = (tissue - tissue.min()) / np.ptp(tissue)
        vols = {"t1n": brain * (50 + 100 * tissue), "t2f": brain * (200 - 120 * tissue**2)}
        cid = f"ScoreFusionSim-{c:05d}"
        folder = root / cid
        folder.mkdir(parents=True, exist_ok=True)
        for con in contrasts:
            img = nib.Nifti1Image(np.transpose(vols[con].astype(np.float32), (2, 1, 0)), np.eye(4))
            nib.save(img, str(folder / f"{cid}-{con}.nii.gz"))
    return root
