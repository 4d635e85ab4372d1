"""DICOM series: reading through SimpleITK (GDCM), writing classic MR Image Storage files.

Reading a directory uses ITK's series reader, so slice ordering, rescaling and the
LPS geometry follow ITK; the LPS->RAS conversion is done once in
:func:`ScoreFusionLib.volume_io.sitk_to_volume`.

Writing produces one file per k-slice (explicit VR little endian, MR Image Storage,
Modality MR) with freshly generated UIDs. The files are encoded here rather than by
GDCM, because GDCM turns an MR image with a rescale slope into an Enhanced MR object
whose geometry lives in functional-group sequences that many viewers ignore; classic
files carry ImagePositionPatient, ImageOrientationPatient, PixelSpacing and
SliceThickness at the top level, as every reader expects.

What round trips: voxels are stored as int16 with RescaleSlope/RescaleIntercept chosen
to cover the data range, so values come back within ``slope / 2`` (exactly for integer
data spanning at most 65536 values); geometry comes back to DICOM decimal-string
precision (16 characters, far below 1e-4 mm). Readers order slices along the normal
``row x column``, so a left-handed grid (for example a LAS NIfTI) reloads with its k axis
reversed: the same voxels at the same RAS positions, in the other index order.
"""

from __future__ import annotations

import datetime
import os
import struct
import uuid
from pathlib import Path

import numpy as np

from .atomic import atomic_directory
from .errors import GeometryError, InputError, VolumeFileError
from .geometry import LPS_TO_RAS
from .volume import Volume
from .volume_io import _itk_message, _storable_array, sitk_to_volume

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_IMPLEMENTATION_UID = "2.25.186621119871328226335163273832645658037"
_LONG_VRS = frozenset({"OB", "OW", "OF", "SQ", "UT", "UN", "OD", "OL", "UC", "UR", "OV", "SV", "UV"})
_INT16_MIN, _INT16_MAX = -32768, 32767


# --------------------------------------------------------------------------- reading


def list_dicom_series(directory: str | os.PathLike) -> list[str]:
    """SeriesInstanceUIDs of the DICOM series found directly in ``directory``."""
    import SimpleITK as sitk

    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory)))


def _series_listing(directory: Path, uids: list[str]) -> str:
    import SimpleITK as sitk

    parts = []
    for uid in uids:
        n = len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), uid))
        parts.append(f"{uid} ({n} files)")
    return "; ".join(parts)


def _unreadable_dicom_files(directory: Path, uids: list[str]) -> list[str]:
    """Files with the DICOM magic that GDCM put in no series: it silently skips damaged ones."""
    import SimpleITK as sitk

    grouped = set()
    for uid in uids:
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), uid)
        grouped.update(Path(f).name for f in names)
    bad = []
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name not in grouped and f.name.upper() != "DICOMDIR":
            with open(f, "rb") as fh:
                if fh.read(132)[128:] == b"DICM":
                    bad.append(f.name)
    return bad


def _check_slice_positions(positions: list[str], name: str) -> None:
    """Refuse series whose slices are not evenly spaced (gaps, duplicates, several volumes)."""
    try:
        pts = np.array([[float(v) for v in p.split("\\")] for p in positions], dtype=np.float64)
    except ValueError:
        return  # unparsable positions: leave it to ITK's own geometry
    if pts.shape[0] < 3 or pts.shape[1] != 3:
        return
    steps = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    typical = float(np.median(steps))
    if typical <= 1e-6 or float(np.min(steps)) <= 1e-6:
        raise InputError(
            f"{name}: several slices share one position (a multi-echo, multi-volume or "
            "duplicated series?); export one 3D volume per series"
        )
    if float(np.max(np.abs(steps - typical))) > max(1e-2 * typical, 1e-3):
        raise InputError(
            f"{name}: slices are unevenly spaced ({steps.min():.4g} to {steps.max():.4g} mm apart); "
            "slices may be missing, so the geometry would be wrong"
        )


def load_dicom_series(directory: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read one DICOM series from ``directory`` into a RAS :class:`Volume`.

    With several series present, ``series_uid`` must name one; the error lists them.
    """
    import SimpleITK as sitk

    d = Path(directory)
    if not d.exists():
        raise VolumeFileError(f"no such directory: {d}")
    if not d.is_dir():
        raise VolumeFileError(f"{d} is a file; give the directory that holds the DICOM series")
    uids = list_dicom_series(d)
    unreadable = _unreadable_dicom_files(d, uids)
    if unreadable:
        shown = ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
        raise VolumeFileError(
            f"{len(unreadable)} DICOM file(s) in {d} cannot be read (corrupt or truncated): {shown}"
        )
    if not uids:
        raise VolumeFileError(f"no DICOM series found in {d}")
    if series_uid is None:
        if len(uids) > 1:
            raise VolumeFileError(
                f"{d} holds {len(uids)} DICOM series; choose one with series_uid: {_series_listing(d, uids)}"
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise VolumeFileError(f"series {series_uid} is not in {d}; found: {_series_listing(d, uids)}")
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(d), series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeFileError(
            f"cannot read the DICOM series in {d}: a file is corrupt or truncated ({_itk_message(exc)})"
        ) from exc
    key = "0020|0032"
    if all(reader.HasMetaDataKey(i, key) for i in range(len(names))):
        _check_slice_positions([reader.GetMetaData(i, key) for i in range(len(names))], d.name)
    return sitk_to_volume(image, d.name)


# --------------------------------------------------------------------------- writing


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) as precise as fits."""
    x = float(value)
    for digits in range(16, 0, -1):
        text = f"{x:.{digits}g}"
        if len(text) <= 16:
            return "0" if text in ("-0", "0") else text
    raise ValueError(f"cannot format {x} as a DICOM decimal string")  # pragma: no cover


def _ds_list(values) -> str:
    return "\\".join(_ds(v) for v in values)


def _new_uid() -> str:
    """A globally unique UID under the UUID-derived root 2.25 (no registered root needed)."""
    return f"2.25.{uuid.uuid4().int}"


def _quantise(data: np.ndarray) -> tuple[np.ndarray, str, str]:
    """int16 stored values plus the slope and intercept strings that map them back.

    Integer data spanning at most 65536 values is stored exactly (slope 1). Otherwise the
    range is spread over all 65536 codes; the decimal strings are fixed first and the
    quantisation uses their parsed values, so the error is at most ``slope / 2``.
    """
    values = np.asarray(data, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    integral = np.issubdtype(data.dtype, np.integer) or bool(np.all(values == np.round(values)))
    if integral and hi - lo <= _INT16_MAX - _INT16_MIN:
        in_range = lo >= _INT16_MIN and hi <= _INT16_MAX
        slope_s, inter_s = "1", "0" if in_range else _ds(lo - _INT16_MIN)
    elif hi == lo:
        slope_s, inter_s = "1", _ds(lo)
    else:
        slope_s = _ds((hi - lo) / (_INT16_MAX - _INT16_MIN) * (1.0 + 1e-9))
        inter_s = _ds(lo - _INT16_MIN * float(slope_s))
    slope, intercept = float(slope_s), float(inter_s)
    stored = np.clip(np.rint((values - intercept) / slope), _INT16_MIN, _INT16_MAX).astype("<i2")
    return stored, slope_s, inter_s


def _element(group: int, elem: int, vr: str, value: str | bytes) -> bytes:
    """One explicit-VR little-endian data element, padded to even length."""
    raw = value.encode("ascii") if isinstance(value, str) else value
    if len(raw) % 2:
        raw += b"\0" if vr in ("UI", "OB") else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(raw)) + raw
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(raw)) + raw


def _encode(elements: dict[tuple[int, int], tuple[str, str | bytes]]) -> bytes:
    return b"".join(_element(g, e, vr, v) for (g, e), (vr, v) in sorted(elements.items()))


def _clean_text(text: str, limit: int) -> str:
    """Printable ASCII without the DICOM value separator, cut to the VR's length."""
    ascii_text = text.encode("ascii", "replace").decode("ascii")
    return "".join(c if c.isprintable() and c != "\\" else " " for c in ascii_text).strip()[:limit]


def _slice_file(common: dict, k: int, position: np.ndarray, normal: np.ndarray, pixels: np.ndarray) -> bytes:
    """The bytes of the DICOM file for slice ``k``."""
    sop_uid = _new_uid()
    dataset = dict(common)
    dataset.update(
        {
            (0x0008, 0x0018): ("UI", sop_uid),
            (0x0020, 0x0013): ("IS", str(k + 1)),
            (0x0020, 0x0032): ("DS", _ds_list(position)),
            (0x0020, 0x1041): ("DS", _ds(float(position @ normal))),
            (0x7FE0, 0x0010): ("OW", pixels.astype("<i2").tobytes()),
        }
    )
    body = _encode(dataset)
    meta = _encode(
        {
            (0x0002, 0x0001): ("OB", b"\x00\x01"),
            (0x0002, 0x0002): ("UI", MR_IMAGE_STORAGE),
            (0x0002, 0x0003): ("UI", sop_uid),
            (0x0002, 0x0010): ("UI", EXPLICIT_VR_LITTLE_ENDIAN),
            (0x0002, 0x0012): ("UI", _IMPLEMENTATION_UID),
            (0x0002, 0x0013): ("SH", "SCOREFUSION"),
        }
    )
    group_length = _element(0x0002, 0x0000, "UL", struct.pack("<I", len(meta)))
    return b"\0" * 128 + b"DICM" + group_length + meta + body


def save_dicom_series(volume: Volume, directory: str | os.PathLike, description: str | None = None) -> Path:
    """Write ``volume`` as a new DICOM series directory, one file per k-slice, atomically.

    Voxels are quantised to int16 with a rescale slope/intercept (round trip within
    ``slope / 2``); geometry round trips to decimal-string precision. The IJK axes must
    be perpendicular (DICOM has no shear); ``directory`` must not exist yet.
    """
    d = Path(directory)
    data = _storable_array(volume)
    if not np.isfinite(data).all():
        raise InputError("cannot write NaN or infinite voxels to DICOM")
    nk, nj, ni = data.shape
    if max(nj, ni) > 65535:
        raise InputError(f"a DICOM slice is limited to 65535 rows and columns, got {nj} x {ni}")
    m_lps = LPS_TO_RAS @ volume.affine
    spacing = np.linalg.norm(m_lps[:3, :3], axis=0)
    axes = m_lps[:3, :3] / spacing
    row, col = axes[:, 0], axes[:, 1]
    normal = np.cross(row, col)
    gram = axes.T @ axes
    if float(np.max(np.abs(gram - np.eye(3)))) > 1e-6:
        raise GeometryError(
            "a DICOM series needs perpendicular i, j and k axes, but this grid is sheared or "
            "tilted; save it as NIfTI or NRRD instead"
        )
    stored, slope_s, inter_s = _quantise(data)
    lo, hi = float(data.min()), float(data.max())
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    text = _clean_text(description or "ScoreFusion output", 64)
    common = {
        (0x0008, 0x0008): ("CS", "DERIVED\\SECONDARY"),
        (0x0008, 0x0016): ("UI", MR_IMAGE_STORAGE),
        (0x0008, 0x0020): ("DA", date),
        (0x0008, 0x0021): ("DA", date),
        (0x0008, 0x0023): ("DA", date),
        (0x0008, 0x0030): ("TM", time),
        (0x0008, 0x0031): ("TM", time),
        (0x0008, 0x0033): ("TM", time),
        (0x0008, 0x0050): ("SH", ""),
        (0x0008, 0x0060): ("CS", "MR"),
        (0x0008, 0x0070): ("LO", "ScoreFusion"),
        (0x0008, 0x0090): ("PN", ""),
        (0x0008, 0x103E): ("LO", text),
        (0x0010, 0x0010): ("PN", ""),
        (0x0010, 0x0020): ("LO", ""),
        (0x0010, 0x0030): ("DA", ""),
        (0x0010, 0x0040): ("CS", ""),
        (0x0018, 0x0020): ("CS", "RM"),
        (0x0018, 0x0021): ("CS", "NONE"),
        (0x0018, 0x0022): ("CS", ""),
        (0x0018, 0x0023): ("CS", ""),
        (0x0018, 0x0050): ("DS", _ds(spacing[2])),
        (0x0018, 0x0081): ("DS", ""),
        (0x0018, 0x0088): ("DS", _ds(spacing[2])),
        (0x0018, 0x0091): ("IS", ""),
        (0x0020, 0x000D): ("UI", _new_uid()),
        (0x0020, 0x000E): ("UI", _new_uid()),
        (0x0020, 0x0010): ("SH", ""),
        (0x0020, 0x0011): ("IS", "1"),
        (0x0020, 0x0037): ("DS", _ds_list(np.concatenate([row, col]))),
        (0x0020, 0x0052): ("UI", _new_uid()),
        (0x0020, 0x1040): ("LO", ""),
        (0x0028, 0x0002): ("US", struct.pack("<H", 1)),
        (0x0028, 0x0004): ("CS", "MONOCHROME2"),
        (0x0028, 0x0010): ("US", struct.pack("<H", nj)),
        (0x0028, 0x0011): ("US", struct.pack("<H", ni)),
        (0x0028, 0x0030): ("DS", _ds_list((spacing[1], spacing[0]))),  # row spacing (j), column (i)
        (0x0028, 0x0100): ("US", struct.pack("<H", 16)),
        (0x0028, 0x0101): ("US", struct.pack("<H", 16)),
        (0x0028, 0x0102): ("US", struct.pack("<H", 15)),
        (0x0028, 0x0103): ("US", struct.pack("<H", 1)),
        (0x0028, 0x1050): ("DS", _ds((lo + hi) / 2.0)),
        (0x0028, 0x1051): ("DS", _ds(max(hi - lo, 1.0))),
        (0x0028, 0x1052): ("DS", inter_s),
        (0x0028, 0x1053): ("DS", slope_s),
        (0x0028, 0x1054): ("LO", "US"),
    }
    try:
        with atomic_directory(d) as tmp:
            for k in range(nk):
                position = m_lps[:3, 3] + m_lps[:3, 2] * k
                (tmp / f"IM{k + 1:05d}.dcm").write_bytes(_slice_file(common, k, position, normal, stored[k]))
    except FileExistsError as exc:
        raise VolumeFileError(f"{d} already exists; a DICOM series is written to a new directory") from exc
    except OSError as exc:
        if isinstance(exc, VolumeFileError):
            raise
        raise VolumeFileError(f"cannot write the DICOM series {d}: {exc}") from exc
    return d
