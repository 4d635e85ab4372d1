"""Contrast names and the :class:`CaseRecord` that every case source produces.

Discovery (:mod:`.brats`) and manifests (:mod:`.manifest`) both return case records, so
splitting, loading and preparation never depend on how a dataset was laid out on disk.
Contrasts are always named canonically (BraTS 2023 names plus ``pdw``); user spellings
such as ``flair`` or ``t1ce`` are mapped once, at the boundary, by
:func:`canonical_contrast`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError, InputError

#: Canonical image contrasts, in BraTS 2023 order plus the simulator's proton density.
IMAGE_CONTRASTS = ("t1n", "t1c", "t2w", "t2f", "pdw")
#: Name of the tumour label map.
SEG = "seg"
#: Every canonical name a case record may hold.
CONTRASTS = (*IMAGE_CONTRASTS, SEG)

#: Naming schemes a case can come from (``manifest``: custom ids from a manifest file).
SCHEMES = ("brats2021", "brats2023", "simulated", "manifest")

_ALIASES = {
    "t1": "t1n", "t1w": "t1n", "t1n": "t1n", "t1native": "t1n",
    "t1ce": "t1c", "t1c": "t1c", "t1gd": "t1c", "t1post": "t1c",
    "t2": "t2w", "t2w": "t2w",
    "flair": "t2f", "t2f": "t2f", "t2flair": "t2f",
    "pd": "pdw", "pdw": "pdw",
    "seg": "seg", "label": "seg", "labels": "seg",
}

#: Case id patterns of the known naming schemes (matched case-insensitively).
CASE_ID_PATTERNS = {
    "brats2021": re.compile(r"^BraTS2021_\d+$", re.IGNORECASE),
    # Cohorts GLI, MEN, MET, PED, SSA (any alphabetic cohort is accepted); the last three
    # digits are the time point.
    "brats2023": re.compile(r"^BraTS-[A-Z]+-\d+-\d+$", re.IGNORECASE),
    "simulated": re.compile(r"^ScoreFusionSim-\d+$", re.IGNORECASE),
}

#: Label convention implied by each naming scheme (data.md section 4, rule 5).
SCHEME_LABEL_CONVENTION = {"brats2021": "brats2021", "brats2023": "brats2023", "simulated": "brats2023"}


def canonical_contrast(name: str) -> str:
    """Map a user spelling (``t1``, ``T1ce``, ``FLAIR``, ``pd`` ...) to the canonical name.

    Separators (``-``, ``_``, spaces) and case are ignored. Raises :class:`InputError` for
    names that are not a known contrast, so a typo never silently selects nothing.
    """
    key = re.sub(r"[\s_\-]", "", str(name)).lower()
    try:
        return _ALIASES[key]
    except KeyError:
        raise InputError(
            f"unknown contrast {name!r}; use one of {', '.join(CONTRASTS)} "
            "(aliases: t1, t1w, t1ce, t2, flair, pd)"
        ) from None


def canonical_contrasts(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Canonicalise a list of contrasts and reject duplicates (``t1ce`` and ``t1c`` together)."""
    out = tuple(canonical_contrast(n) for n in names)
    dup = sorted({c for c in out if out.count(c) > 1})
    if dup:
        raise InputError(f"contrast(s) {dup} requested more than once in {list(names)}")
    return out


def scheme_of_case_id(case_id: str) -> str | None:
    """The naming scheme a case id follows, or ``None`` for a custom id."""
    for scheme, pattern in CASE_ID_PATTERNS.items():
        if pattern.match(case_id):
            return scheme
    return None


@dataclass(frozen=True)
class CaseRecord:
    """One paired case: where its files are and how to interpret its labels.

    Attributes
    ----------
    case_id : the folder name (BraTS, simulated) or the manifest's id.
    scheme : ``brats2021``, ``brats2023``, ``simulated`` or ``manifest``.
    paths : canonical contrast name -> file, for the files that exist.
    missing : expected contrasts that are absent (normal for validation folders and BraSyn).
    label_convention : ``brats2021`` or ``brats2023``; ``None`` only when the case has no
        segmentation and nothing implies a convention.
    simulated : true for simulator output; metrics and figures must say so.
    folder, sidecar, strays : the case folder, the simulator's JSON sidecar and ignored files.
    """

    case_id: str
    scheme: str
    paths: dict[str, Path]
    missing: tuple[str, ...] = ()
    label_convention: str | None = None
    simulated: bool = False
    folder: Path | None = None
    sidecar: Path | None = None
    strays: tuple[str, ...] = field(default=(), compare=False)

    @property
    def contrasts(self) -> tuple[str, ...]:
        """Available image contrasts (canonical order, seg excluded)."""
        return tuple(c for c in IMAGE_CONTRASTS if c in self.paths)

    @property
    def has_seg(self) -> bool:
        return SEG in self.paths

    def path(self, contrast: str) -> Path:
        """The file of ``contrast`` (aliases accepted); :class:`DatasetError` if it is absent."""
        name = canonical_contrast(contrast)
        try:
            return self.paths[name]
        except KeyError:
            have = ", ".join(self.paths) or "none"
            raise DatasetError(
                f"case {self.case_id} has no {name!r} file (available: {have})"
            ) from None

    def to_dict(self) -> dict:
        """JSON-friendly form (absolute paths as strings), e.g. for provenance records."""
        return {
            "case_id": self.case_id,
            "scheme": self.scheme,
            "images": {c: str(p) for c, p in self.paths.items() if c != SEG},
            **({"seg": str(self.paths[SEG])} if SEG in self.paths else {}),
            "missing": list(self.missing),
            "label_convention": self.label_convention,
            "simulated": self.simulated,
        }
