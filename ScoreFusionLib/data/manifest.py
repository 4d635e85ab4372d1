"""Paired-case manifests (CSV or JSON) for data that does not follow a BraTS layout.

CSV: a header ``case_id,<contrast>...`` (aliases such as ``flair`` accepted, plus an
optional ``label_convention`` column); one row per case; an empty cell means the contrast
is missing for that case. JSON: a list of ``{"case_id", "images": {contrast: path},
"seg"?: path, "label_convention"?}`` (or ``{"cases": [...]}``). Relative paths are relative
to the manifest file. Both give the same :class:`CaseRecord` list as folder discovery.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import DatasetError, InputError
from ..labels import CONVENTIONS
from .records import (
    CONTRASTS,
    SCHEME_LABEL_CONVENTION,
    SEG,
    CaseRecord,
    canonical_contrast,
    scheme_of_case_id,
)

_JSON_KEYS = {"case_id", "images", "seg", "label_convention"}


def _contrast_or_error(name: str, where: str) -> str:
    try:
        return canonical_contrast(name)
    except InputError as exc:
        raise DatasetError(f"{where}: {exc}") from None


def _resolve(base: Path, value: str, case_id: str, contrast: str, manifest: Path) -> Path:
    p = Path(str(value).strip()).expanduser()
    if not p.is_absolute():
        p = base / p
    if not p.is_file():
        raise DatasetError(
            f"manifest {manifest.name}: case {case_id} {contrast!r} file {p} does not exist"
        )
    return p


def _record(
    case_id: str,
    paths: dict[str, Path],
    expected: list[str],
    convention: str | None,
    default_convention: str | None,
    manifest: Path,
) -> CaseRecord:
    scheme = scheme_of_case_id(case_id) or "manifest"
    if convention in (None, ""):
        convention = default_convention or SCHEME_LABEL_CONVENTION.get(scheme)
    if convention is not None and convention not in CONVENTIONS:
        raise DatasetError(
            f"manifest {manifest.name}: case {case_id} has unknown label convention {convention!r} "
            f"(use one of {sorted(CONVENTIONS)})"
        )
    if SEG in paths and convention is None:
        raise DatasetError(
            f"manifest {manifest.name}: case {case_id} has a segmentation but no label convention; "
            "label 4 means enhancing tumour in brats2021 and resection cavity in brats2023, so "
            "add label_convention ('brats2021' or 'brats2023')"
        )
    order = [c for c in CONTRASTS if c in paths]
    return CaseRecord(
        case_id=case_id,
        scheme=scheme,
        paths={c: paths[c] for c in order},
        missing=tuple(c for c in CONTRASTS if c in expected and c not in paths),
        label_convention=convention,
        simulated=scheme == "simulated",
        folder=None,
    )


def _check_ids(ids: list[str], manifest: Path) -> None:
    seen: set[str] = set()
    for cid in ids:
        if not cid:
            raise DatasetError(f"manifest {manifest.name}: a case has an empty case_id")
        if cid in seen:
            raise DatasetError(f"manifest {manifest.name}: duplicate case_id {cid!r}")
        seen.add(cid)


def _read_csv(path: Path, default_convention: str | None) -> list[CaseRecord]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = [row for row in csv.reader(fh) if any(cell.strip() for cell in row)]
    if not rows:
        raise DatasetError(f"manifest {path.name} is empty")
    header = [h.strip() for h in rows[0]]
    if not header or header[0].lower() != "case_id":
        raise DatasetError(f"manifest {path.name}: the first column must be 'case_id', got {header[:1]}")
    columns: list[str] = []
    for name in header[1:]:
        if name.lower() == "label_convention":
            columns.append("label_convention")
            continue
        columns.append(_contrast_or_error(name, f"manifest {path.name}: unknown column {name!r}"))
    dup = sorted({c for c in columns if columns.count(c) > 1})
    if dup:
        raise DatasetError(f"manifest {path.name}: column(s) {dup} appear more than once (aliases count)")
    if not any(c in CONTRASTS for c in columns):
        raise DatasetError(f"manifest {path.name}: no contrast columns after case_id")
    body = rows[1:]
    if not body:
        raise DatasetError(f"manifest {path.name} lists no cases")
    _check_ids([r[0].strip() for r in body], path)
    expected = [c for c in columns if c in CONTRASTS]
    records = []
    for lineno, row in enumerate(body, start=2):
        if len(row) > len(header):
            raise DatasetError(f"manifest {path.name} line {lineno}: more cells than header columns")
        case_id = row[0].strip()
        cells = dict(zip(columns, [c.strip() for c in row[1:]]))
        convention = cells.pop("label_convention", None)
        paths = {
            c: _resolve(path.parent, v, case_id, c, path) for c, v in cells.items() if v
        }
        records.append(_record(case_id, paths, expected, convention, default_convention, path))
    return records


def _read_json(path: Path, default_convention: str | None) -> list[CaseRecord]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DatasetError(f"manifest {path.name} is not valid JSON ({exc})") from exc
    if isinstance(data, dict) and "cases" in data:
        data = data["cases"]
    if not isinstance(data, list):
        raise DatasetError(f"manifest {path.name} must hold a list of cases (or {{'cases': [...]}})")
    if not data:
        raise DatasetError(f"manifest {path.name} lists no cases")
    entries: list[tuple[str, dict[str, str], str | None]] = []
    for n, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("case_id"), str):
            raise DatasetError(f"manifest {path.name}: entry {n} needs a string 'case_id'")
        cid = entry["case_id"].strip()
        unknown = sorted(set(entry) - _JSON_KEYS)
        if unknown:
            raise DatasetError(
                f"manifest {path.name}: case {cid} has unknown key(s) {unknown} "
                f"(allowed: {sorted(_JSON_KEYS)})"
            )
        images = entry.get("images", {})
        if not isinstance(images, dict):
            raise DatasetError(f"manifest {path.name}: case {cid} 'images' must map contrast -> path")
        files: dict[str, str] = {}
        for name, value in images.items():
            c = _contrast_or_error(name, f"manifest {path.name}: case {cid}")
            if c in files:
                raise DatasetError(f"manifest {path.name}: case {cid} lists {c!r} twice (aliases count)")
            files[c] = value
        if entry.get("seg") is not None:
            if SEG in files:
                raise DatasetError(f"manifest {path.name}: case {cid} gives 'seg' twice")
            files[SEG] = entry["seg"]
        for c, value in files.items():
            if not isinstance(value, str) or not value.strip():
                raise DatasetError(f"manifest {path.name}: case {cid} {c!r} path must be a non-empty string")
        entries.append((cid, files, entry.get("label_convention")))
    _check_ids([e[0] for e in entries], path)
    expected = sorted({c for _, files, _ in entries for c in files}, key=CONTRASTS.index)
    records = []
    for cid, files, convention in entries:
        paths = {c: _resolve(path.parent, v, cid, c, path) for c, v in files.items()}
        records.append(_record(cid, paths, expected, convention, default_convention, path))
    return records


def load_manifest(path: str | os.PathLike, label_convention: str | None = None) -> list[CaseRecord]:
    """Read a CSV or JSON manifest of paired cases (in file order).

    ``label_convention`` is the default for cases that neither state one nor follow a
    BraTS naming scheme; a case with a segmentation and no convention is an error, since
    the convention must never be guessed from label values. Raises :class:`DatasetError`
    for missing files, unknown columns or keys, and duplicate case ids.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"manifest {p} does not exist")
    name = p.name.lower()
    if name.endswith(".csv"):
        return _read_csv(p, label_convention)
    if name.endswith(".json"):
        return _read_json(p, label_convention)
    raise DatasetError(f"manifest {p.name}: unsupported type (use .csv or .json)")


def write_manifest(cases: list[CaseRecord], path: str | os.PathLike) -> Path:
    """Write ``cases`` as a JSON manifest (absolute paths), readable by :func:`load_manifest`.

    Handy to freeze a discovered dataset, or a split, into one reproducible file.
    """
    entries = []
    for rec in cases:
        entry: dict = {
            "case_id": rec.case_id,
            "images": {c: str(Path(p).resolve()) for c, p in rec.paths.items() if c != SEG},
        }
        if rec.has_seg:
            entry["seg"] = str(Path(rec.paths[SEG]).resolve())
        if rec.label_convention is not None:
            entry["label_convention"] = rec.label_convention
        entries.append(entry)
    p = Path(path)
    write_text_atomic(p, json.dumps(entries, indent=2) + "\n")
    return p
