"""Reading and writing volumes with their exact geometry.

Formats, chosen from the file name (:func:`volume_format`):

* NIfTI (``.nii``, ``.nii.gz``) through nibabel, which already reports a RAS affine.
* NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) through SimpleITK.
* DICOM series: a directory, through :mod:`ScoreFusionLib.dicom_io`.

SimpleITK (like ITK, DICOM and most NRRD files) works in LPS. The conversion to the RAS
IJK->RAS matrix of :class:`Volume` happens exactly once, here at the boundary
(``M_ras = diag(-1, -1, 1, 1) @ M_lps``); SimpleITK arrays are already in (k, j, i) order.

Every write is atomic: a failed or interrupted save leaves no partial file and leaves any
existing file at the destination untouched. Loading always returns a fresh, native-endian
array; saving never modifies the volume passed in. Voxel types are kept, except that
float64 is written as float32, bool as uint8 and int64 as int32 when the values fit (the
types other tools read reliably).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_path
from .errors import InputError, VolumeFileError
from .geometry import LPS_TO_RAS
from .volume import Volume

if TYPE_CHECKING:
    import SimpleITK

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: File-name endings and the format they select (longest first, so ``.nii.gz`` wins).
_SUFFIX_FORMATS = (
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".nrrd", "nrrd"),
    (".nhdr", "nrrd"),
    (".mha", "metaimage"),
    (".mhd", "metaimage"),
)
_DETACHED = (".nhdr", ".mhd")  # header plus a separate data file
SUPPORTED_FORMATS = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), "
    "DICOM series (a directory, or a name without extension when saving)"
)


def volume_format(path: str | os.PathLike) -> str:
    """The format a path selects: ``nifti``, ``nrrd``, ``metaimage`` or ``dicom``.

    An existing directory, or a name without any extension, means a DICOM series
    directory. Anything else raises :class:`VolumeFileError` listing what is supported.
    """
    p = Path(path)
    name = p.name.lower()
    for suffix, fmt in _SUFFIX_FORMATS:
        if name.endswith(suffix):
            return fmt
    if p.is_dir() or (name and "." not in name.lstrip(".")):
        return "dicom"
    raise VolumeFileError(f"unsupported volume file type: {p.name}; supported: {SUPPORTED_FORMATS}")


def _squeeze_to_3d(data: np.ndarray, name: str) -> np.ndarray:
    """Drop trailing singleton axes (x, y, z, 1, 1); refuse 2D and true 4D+ images."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{name} holds a {data.ndim}D image of shape {data.shape}; a 3D volume is needed")
    return data


def _native(array: np.ndarray) -> np.ndarray:
    """A C-contiguous array in native byte order (a copy only where needed)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))


def _itk_message(exc: BaseException) -> str:
    """The useful part of a long multi-line ITK exception text."""
    kept = []
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or line.startswith(("Exception thrown in SimpleITK", "Reason:")):
            continue
        if line.startswith("Description:"):
            return line[len("Description:") :].strip()
        kept.append(re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-fA-F]+\): |sitk::ERROR: )", "", line))
    return " ".join(kept) if kept else type(exc).__name__


def _storable_array(volume: Volume) -> np.ndarray:
    """The (k, j, i) array as it will be written: a native-endian copy in a portable type.

    A new array is always returned, so writers can never touch the caller's data.
    """
    arr = np.asarray(volume.array)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputError(f"cannot save voxels of type {arr.dtype}; real numbers are needed")
    if arr.dtype == np.float64 or arr.dtype == np.float16:
        return arr.astype(np.float32)
    if arr.dtype.kind in "iu" and arr.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if info.min <= arr.min() and arr.max() <= info.max:
            return arr.astype(np.int32)
    return np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C", copy=True)


# --------------------------------------------------------------------------- SimpleITK


def sitk_to_volume(image: SimpleITK.Image, name: str = "image") -> Volume:
    """Convert a SimpleITK image (LPS) into a :class:`Volume` (RAS, (k, j, i) array).

    Trailing singleton dimensions are dropped; 2D, 4D+ and multi-component images raise
    :class:`InputError`.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(a colour or vector image); a scalar volume is needed"
        )
    dim = image.GetDimension()
    size = tuple(image.GetSize())
    while dim > 3 and size[dim - 1] == 1:
        dim -= 1
    if dim != 3:
        raise InputError(f"{name} holds a {dim}D image of size {size}; a 3D volume is needed")
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)  # fresh copy, (..., k, j, i)
    array = array.reshape(array.shape[array.ndim - 3 :])
    full = image.GetDimension()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(full, full)[:3, :3]
    m_lps = np.eye(4)
    m_lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)[:3]
    m_lps[:3, 3] = np.array(image.GetOrigin(), dtype=np.float64)[:3]
    return Volume(_native(array), LPS_TO_RAS @ m_lps)


def volume_to_sitk(volume: Volume) -> SimpleITK.Image:
    """Build a SimpleITK image (LPS geometry) holding a copy of the volume's voxels."""
    import SimpleITK as sitk

    data = _storable_array(volume)
    m_lps = LPS_TO_RAS @ volume.affine
    spacing = np.linalg.norm(m_lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(x) for x in (m_lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(x) for x in m_lps[:3, 3]])
    return image


def _load_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise VolumeFileError(
            f"cannot read {path.name}: the file is corrupt, truncated or not a valid "
            f"{volume_format(path)} file ({_itk_message(exc)})"
        ) from exc
    return sitk_to_volume(image, path.name)


def _save_itk(volume: Volume, target: Path, fmt: str, description: str | None) -> None:
    import SimpleITK as sitk

    image = volume_to_sitk(volume)
    if description:
        text = " ".join(description.split())
        image.SetMetaData("NRRD_content" if fmt == "nrrd" else "Description", text)
    try:
        sitk.WriteImage(image, str(target), True)
    except RuntimeError as exc:
        raise VolumeFileError(f"cannot write {target.name}: {_itk_message(exc)}") from exc


@contextlib.contextmanager
def _atomic_detached(final: Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a header plus data file (``.nhdr``, ``.mhd``).

    Both are written under their final names in a hidden staging directory next to
    ``final``; the data file is moved into place first and the header last, so a header
    never points at a missing or partial data file. On failure nothing is moved.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = final.parent / f".{final.name}.{secrets.token_hex(6)}.part"
    os.mkdir(stage)
    try:
        yield stage / final.name
        for produced in sorted(stage.iterdir()):
            if produced.name != final.name:
                os.replace(produced, final.parent / produced.name)
        os.replace(stage / final.name, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --------------------------------------------------------------------------- NIfTI


def _load_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path), mmap=False)  # no memory map: never alias the file
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except MemoryError:
        raise
    except Exception as exc:  # nibabel/gzip/zlib raise many unrelated types for bad files
        raise VolumeFileError(
            f"cannot read {path.name}: the file is corrupt, truncated or not NIfTI "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    data = _squeeze_to_3d(np.asarray(data), path.name)
    return Volume(_native(np.transpose(data, (2, 1, 0))), affine)


def _is_sheared(affine: np.ndarray, tol: float = 1e-6) -> bool:
    """True when the IJK axes are not mutually perpendicular (a qform cannot hold it)."""
    block = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.max(np.abs(block.T @ block - np.eye(3))) > tol)


def _save_nifti(volume: Volume, tmp: Path, description: str | None) -> None:
    import nibabel as nib

    data = np.transpose(_storable_array(volume), (2, 1, 0))
    affine = np.array(volume.affine, dtype=np.float64)
    img = nib.Nifti1Image(data, affine, dtype=data.dtype)
    img.set_sform(affine, code=1)
    if _is_sheared(affine):
        img.set_qform(None, code=0)  # a quaternion cannot hold shear; the sform is exact
    else:
        img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    if description is not None:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    try:
        nib.save(img, str(tmp))
    except OSError as exc:
        raise VolumeFileError(f"cannot write {tmp.name}: {exc}") from exc


# --------------------------------------------------------------------------- public API


def load_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read a volume file or DICOM series directory into a :class:`Volume`.

    The array is in (k, j, i) order, native byte order and owned by the result; the
    affine is the RAS IJK->RAS matrix. ``series_uid`` picks one series when a DICOM
    directory holds several (an error lists them otherwise).
    """
    p = Path(path)
    fmt = volume_format(p)
    if not p.exists():
        raise VolumeFileError(f"no such file or directory: {p}")
    if series_uid is not None and fmt != "dicom":
        raise InputError(f"series_uid applies to DICOM directories only, not to {p.name}")
    if fmt == "dicom":
        from .dicom_io import load_dicom_series

        return load_dicom_series(p, series_uid=series_uid)
    if not p.is_file():
        raise VolumeFileError(f"{p} is not a file")
    if p.stat().st_size == 0:
        raise VolumeFileError(f"cannot read {p.name}: the file is empty")
    if fmt == "nifti":
        return _load_nifti(p)
    return _load_itk(p)


def sidecar_path(output: str | os.PathLike) -> Path:
    """The JSON provenance file that accompanies an output volume: its name with ``.json`` instead of
    the volume suffix (``x.nii.gz`` -> ``x.json``)."""
    output = Path(output)
    name = output.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")


def save_volume(volume: Volume, path: str | os.PathLike, description: str | None = None) -> Path:
    """Write ``volume`` to ``path`` atomically; the format follows the name.

    ``description`` goes to the NIfTI ``descrip`` field (at most 79 ASCII characters), the
    NRRD ``content`` field, a MetaImage ``Description`` line or the DICOM SeriesDescription.
    A DICOM series (an extension-less name) goes to a new directory; see
    :func:`ScoreFusionLib.dicom_io.save_dicom_series` for its quantisation.
    """
    if not isinstance(volume, Volume):
        raise InputError(f"save_volume needs a Volume, got {type(volume).__name__}")
    p = Path(path)
    fmt = volume_format(p)
    if fmt == "dicom":
        from .dicom_io import save_dicom_series

        return save_dicom_series(volume, p, description=description)
    name = p.name.lower()
    if fmt == "nifti":
        with atomic_path(p, suffix=".nii.gz" if name.endswith(".gz") else ".nii") as tmp:
            _save_nifti(volume, tmp, description)
    elif name.endswith(_DETACHED):
        with _atomic_detached(p) as target:
            _save_itk(volume, target, fmt, description)
    else:
        with atomic_path(p, suffix=p.suffix.lower()) as tmp:
            _save_itk(volume, tmp, fmt, description)
    return p
