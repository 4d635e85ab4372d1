"""Reading and writing volumes with their exact geometry.

NIfTI (``.nii``, ``.nii.gz``) goes through nibabel; the returned :class:`Volume` holds the
array in (k, j, i) order and the RAS affine nibabel reports. Writes are atomic.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import InputError, VolumeFileError
from .volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def volume_format(path: str | os.PathLike) -> str:
    """File format from the name: ``nifti`` (more formats are added in this module)."""
    name = Path(path).name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    raise VolumeFileError(f"unsupported volume file type: {Path(path).name} (expected .nii or .nii.gz)")


def _squeeze_to_3d(data: np.ndarray, path: Path) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path.name} holds a {data.ndim}D image of shape {data.shape}; a 3D volume is needed")
    return data


def _load_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise VolumeFileError(f"cannot read {path.name}: the file is corrupt or truncated ({exc})") from exc
    data = _squeeze_to_3d(np.asarray(data), path)
    array = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    return Volume(array, np.asarray(img.affine, dtype=np.float64))


def load_volume(path: str | os.PathLike) -> Volume:
    """Read a volume file into a :class:`Volume` (array in (k, j, i) order, RAS affine)."""
    p = Path(path)
    if not p.exists():
        raise VolumeFileError(f"no such file: {p}")
    fmt = volume_format(p)
    if fmt == "nifti":
        return _load_nifti(p)
    raise VolumeFileError(f"unsupported volume format {fmt}")  # pragma: no cover


def _save_nifti(volume: Volume, tmp: Path, description: str | None) -> None:
    import nibabel as nib

    data = np.transpose(np.asarray(volume.array), (2, 1, 0))
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    img = nib.Nifti1Image(data, volume.affine)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    if description is not None:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    nib.save(img, str(tmp))


def save_volume(volume: Volume, path: str | os.PathLike, description: str | None = None) -> Path:
    """Write ``volume`` to ``path`` atomically; the format follows the file name.

    ``description`` goes to the NIfTI ``descrip`` field (at most 79 ASCII characters).
    """
    p = Path(path)
    fmt = volume_format(p)
    suffix = ".nii.gz" if p.name.lower().endswith(".gz") else ".nii"
    with atomic_path(p, suffix=suffix) as tmp:
        if fmt == "nifti":
            _save_nifti(volume, tmp, description)
    return p
