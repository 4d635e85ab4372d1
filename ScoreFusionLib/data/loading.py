"""Loading one case onto the model grid, with every geometry and label check up front.

All contrasts of a case must share shape and IJK->RAS matrix (within 1e-3 mm; data.md
section 4, rule 4); a mismatch names the offending file instead of producing silently
misaligned training pairs. The model grid is reached by a centred crop or pad
(192x192x152 for BraTS, method.md section 7.1), which never resamples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import DatasetError, GeometryError, InputError
from ..grid import Reorientation, crop_or_pad, reorient_to_ras
from ..labels import validate_labels
from ..volume import Volume, require_usable_intensities
from ..volume_io import load_volume
from .records import SEG, CaseRecord, canonical_contrast

#: The paper's model grid in (i, j, k) order (method.md section 7.1).
PAPER_GRID_IJK = (192, 192, 152)


@dataclass(frozen=True)
class LoadedCase:
    """A case's volumes on one common grid, ready for task preparation.

    It can also be built directly from in-memory volumes (simulator, Slicer), as long as
    they already share a grid.
    """

    case_id: str
    volumes: dict[str, Volume]
    seg: Volume | None = None
    label_convention: str | None = None
    simulated: bool = False
    reorientation: Reorientation | None = None
    original_affine: np.ndarray | None = None
    original_shape_ijk: tuple[int, int, int] | None = None

    @property
    def affine(self) -> np.ndarray:
        """IJK->RAS matrix of the (cropped) grid all volumes share."""
        return next(iter(self.volumes.values())).affine

    def volume(self, contrast: str) -> Volume:
        """The volume of ``contrast`` (aliases accepted); :class:`DatasetError` if absent."""
        name = canonical_contrast(contrast)
        if name not in self.volumes:
            raise DatasetError(
                f"case {self.case_id} has no {name!r} loaded (loaded: {', '.join(self.volumes)})"
            )
        return self.volumes[name]


def _check_grids(named: list[tuple[str, Volume]], case_id: str, atol_mm: float) -> None:
    ref_name, ref = named[0]
    for name, vol in named[1:]:
        if vol.shape_ijk != ref.shape_ijk:
            raise GeometryError(
                f"case {case_id}: {name} has shape {vol.shape_ijk} (i, j, k) but {ref_name} has "
                f"{ref.shape_ijk}; all images of a case must share one grid"
            )
        diff = float(np.max(np.abs(vol.affine - ref.affine)))
        if diff > atol_mm:
            raise GeometryError(
                f"case {case_id}: {name} and {ref_name} have different IJK->RAS matrices "
                f"(max difference {diff:.4g} > {atol_mm} mm); resample them onto one grid first"
            )


def _as_labels(array: np.ndarray, case_id: str, filename: str) -> np.ndarray:
    """Integer label array; fractional or non-finite values are an error, not rounded."""
    a = np.asarray(array)
    if np.issubdtype(a.dtype, np.integer):
        return a
    if (
        not np.issubdtype(a.dtype, np.floating)
        or not np.all(np.isfinite(a))
        or np.any(a != np.round(a))
        or np.any(np.abs(a) > 2**31 - 1)
    ):
        raise InputError(f"case {case_id}: segmentation {filename} holds non-integer label values")
    return a.astype(np.int32)


def load_case(
    record: CaseRecord,
    contrasts: Sequence[str],
    grid_shape_ijk: Sequence[int] | None = PAPER_GRID_IJK,
    seg: bool = False,
    reorient: bool = False,
    atol_mm: float = 1e-3,
) -> LoadedCase:
    """Load ``contrasts`` (and the segmentation if ``seg``) of one case onto the model grid.

    Steps: read each file; check that all share shape and affine (:class:`GeometryError`
    naming the file); reject NaN/Inf or constant images (:class:`InputError`); optionally
    permute/flip to RAS-aligned axes (``reorient``; off by default, as in the paper);
    centre crop or pad to ``grid_shape_ijk`` (``None`` keeps the native grid), padding
    images with their minimum (background) and the segmentation with 0; validate the labels
    with the record's convention. A requested contrast the case lacks raises
    :class:`DatasetError` naming the case and the contrast.
    """
    names = [canonical_contrast(c) for c in contrasts]
    if SEG in names:
        names.remove(SEG)
        seg = True
    if len(set(names)) != len(names):
        raise InputError(f"contrasts {list(contrasts)} name a contrast twice")
    if not names:
        raise InputError("load_case needs at least one image contrast")
    for name in names + ([SEG] if seg else []):
        if name not in record.paths:
            raise DatasetError(
                f"case {record.case_id} has no {name!r} file"
                + (f" (missing: {', '.join(record.missing)})" if record.missing else "")
            )
    if seg and record.label_convention is None:
        raise DatasetError(f"case {record.case_id} has no label convention; cannot interpret its labels")

    loaded: list[tuple[str, str, Volume]] = []
    for name in names + ([SEG] if seg else []):
        path = record.paths[name]
        loaded.append((name, path.name, load_volume(path)))
    _check_grids([(fn, v) for _, fn, v in loaded], record.case_id, atol_mm)
    for name, fn, vol in loaded:
        if name != SEG:
            require_usable_intensities(vol.array, f"case {record.case_id} {name} ({fn})")

    original = loaded[0][2]
    reorientation = None
    out: dict[str, Volume] = {}
    seg_volume = None
    for name, fn, vol in loaded:
        if name == SEG:
            # Validate the whole map, before cropping: a foreign value anywhere means the
            # convention is wrong for this case.
            vol = vol.with_array(_as_labels(vol.array, record.case_id, fn))
            try:
                validate_labels(vol.array, record.label_convention)
            except InputError as exc:
                raise InputError(f"case {record.case_id} ({fn}): {exc}") from None
        if reorient:
            vol, reorientation = reorient_to_ras(vol)
        if grid_shape_ijk is not None:
            vol = crop_or_pad(vol, grid_shape_ijk, fill=0 if name == SEG else None)
        if name == SEG:
            seg_volume = vol
        else:
            out[name] = vol
    return LoadedCase(
        case_id=record.case_id,
        volumes=out,
        seg=seg_volume,
        label_convention=record.label_convention,
        simulated=record.simulated,
        reorientation=reorientation,
        original_affine=original.affine.copy(),
        original_shape_ijk=original.shape_ijk,
    )
