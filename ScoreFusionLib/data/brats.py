"""Discovery of BraTS 2021, BraTS 2023+ and simulated case folders (data.md section 4).

Files are matched by the **exact suffix after the case id** (``_t1`` is not ``_t1ce``,
``-t1n`` is not ``-t1c``), case-insensitively, with ``.nii`` or ``.nii.gz``; a substring
such as "t1" is never used. Missing files are reported in :attr:`CaseRecord.missing`, not
raised, because validation folders have no ``seg`` and BraSyn drops one image per case.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DatasetError
from ..labels import CONVENTIONS
from .records import CASE_ID_PATTERNS, SCHEME_LABEL_CONVENTION, CaseRecord

#: File suffix after the case id -> canonical contrast, per naming scheme.
SCHEME_SUFFIXES: dict[str, dict[str, str]] = {
    "brats2021": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"},
    "brats2023": {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f", "seg": "seg"},
    "simulated": {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f", "pdw": "pdw", "seg": "seg"},
}
#: Separator between the case id and the suffix.
SCHEME_SEPARATOR = {"brats2021": "_", "brats2023": "-", "simulated": "-"}
_EXTENSIONS = (".nii.gz", ".nii")


def folder_scheme(name: str) -> str | None:
    """The naming scheme a case folder name follows, or ``None`` (not a case folder)."""
    for scheme in SCHEME_SUFFIXES:
        if CASE_ID_PATTERNS[scheme].match(name):
            return scheme
    return None


def match_case_file(case_id: str, scheme: str, filename: str) -> str | None:
    """The canonical contrast a file of case ``case_id`` holds, or ``None`` for a stray.

    The name must be exactly ``<case_id><sep><suffix>.nii[.gz]`` (case-insensitive).
    """
    lower = filename.lower()
    prefix = (case_id + SCHEME_SEPARATOR[scheme]).lower()
    if not lower.startswith(prefix):
        return None
    rest = lower[len(prefix):]
    for ext in _EXTENSIONS:
        if rest.endswith(ext):
            return SCHEME_SUFFIXES[scheme].get(rest[: -len(ext)])
    return None


def _sidecar_convention(sidecar: Path, case_id: str) -> str | None:
    """The label convention a simulator sidecar records (key ``label_convention``), if any."""
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"case {case_id}: cannot read the sidecar {sidecar.name} ({exc})") from exc
    conv = meta.get("label_convention") if isinstance(meta, dict) else None
    if conv is None:
        return None
    if conv not in CONVENTIONS:
        raise DatasetError(
            f"case {case_id}: sidecar {sidecar.name} names an unknown label convention {conv!r}"
        )
    return str(conv)


def scan_case_folder(folder: str | os.PathLike, scheme: str | None = None) -> CaseRecord:
    """Build the record of one case folder (the folder name is the case id).

    Raises :class:`DatasetError` when two files hold the same contrast (``x.nii`` next to
    ``x.nii.gz``, or names differing only in case).
    """
    folder = Path(folder)
    case_id = folder.name
    scheme = scheme or folder_scheme(case_id)
    if scheme is None:
        raise DatasetError(f"{folder} is not a BraTS 2021, BraTS 2023+ or ScoreFusionSim case folder")
    found: dict[str, Path] = {}
    strays: list[str] = []
    sidecar: Path | None = None
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.is_file():
            continue
        contrast = match_case_file(case_id, scheme, entry.name)
        if contrast is None:
            if entry.name.lower() == f"{case_id}.json".lower():
                sidecar = entry
            else:
                strays.append(entry.name)
            continue
        if contrast in found:
            raise DatasetError(
                f"case {case_id} has two files for {contrast!r}: {found[contrast].name} and "
                f"{entry.name}; remove one"
            )
        found[contrast] = entry
    order = list(SCHEME_SUFFIXES[scheme].values())
    paths = {c: found[c] for c in order if c in found}
    missing = tuple(c for c in order if c not in found)
    convention = SCHEME_LABEL_CONVENTION[scheme]
    if scheme == "simulated" and sidecar is not None:
        convention = _sidecar_convention(sidecar, case_id) or convention
    return CaseRecord(
        case_id=case_id,
        scheme=scheme,
        paths=paths,
        missing=missing,
        label_convention=convention,
        simulated=scheme == "simulated",
        folder=folder,
        sidecar=sidecar,
        strays=tuple(strays),
    )


def discover_cases(root: str | os.PathLike) -> list[CaseRecord]:
    """All case folders directly under ``root``, sorted by case id.

    Sub-folders whose names follow no known scheme (``__MACOSX``, ``derivatives``) and
    loose files are ignored. Raises :class:`DatasetError` for a missing or empty root, a
    root without any case folder, and duplicate case ids.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder (manifests: use load_manifest)")
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    if not entries:
        raise DatasetError(f"dataset folder {root} is empty")
    if folder_scheme(root.name) is not None and not any(e.is_dir() for e in entries):
        raise DatasetError(
            f"{root} looks like a single case folder; pass the folder that contains the case folders"
        )
    records: list[CaseRecord] = []
    seen: dict[str, str] = {}
    for entry in entries:
        if not entry.is_dir() or folder_scheme(entry.name) is None:
            continue
        key = entry.name.lower()
        if key in seen:
            raise DatasetError(f"duplicate case id: folders {seen[key]} and {entry.name} in {root}")
        seen[key] = entry.name
        records.append(scan_case_folder(entry))
    if not records:
        raise DatasetError(
            f"no case folders found in {root}; expected sub-folders such as BraTS2021_00000, "
            "BraTS-GLI-00000-000 or ScoreFusionSim-00001"
        )
    records.sort(key=lambda r: r.case_id)
    return records
