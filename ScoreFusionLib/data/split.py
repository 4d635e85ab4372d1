"""Deterministic train/test splits.

The paper protocol (method.md section 7.1) sorts the case folders by name and takes the
first ``int(0.8 * n)`` for training (BraTS 2021: 1000 of 1251), the rest for testing; the
2D and 3D stages must share that split. Explicit id lists are the alternative, validated
so that a typo or an overlap cannot leak test cases into training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from .records import CaseRecord


@dataclass(frozen=True)
class CaseSplit:
    """The two halves of a split, each a list of case records."""

    train: list[CaseRecord]
    test: list[CaseRecord]

    @property
    def train_ids(self) -> list[str]:
        return [c.case_id for c in self.train]

    @property
    def test_ids(self) -> list[str]:
        return [c.case_id for c in self.test]


def _check_list(ids: Sequence[str], name: str, known: dict[str, CaseRecord]) -> list[str]:
    if isinstance(ids, str):
        raise DatasetError(f"{name} must be a list of case ids, not the string {ids!r}")
    out = [str(i).strip() for i in ids]
    dup = sorted({i for i in out if out.count(i) > 1})
    if dup:
        raise DatasetError(f"{name} lists case id(s) {dup} more than once")
    unknown = [i for i in out if i not in known]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise DatasetError(f"{name} names {len(unknown)} unknown case id(s): {shown}")
    return out


def split_cases(
    cases: Sequence[CaseRecord],
    mode: str = "paper",
    train_fraction: float = 0.8,
    train_ids: Sequence[str] | None = None,
    test_ids: Sequence[str] | None = None,
) -> CaseSplit:
    """Split ``cases`` by the paper rule (``mode="paper"``) or by id lists (``"lists"``).

    ``paper``: sort by case id, first ``int(train_fraction * n)`` train, the rest test.
    ``lists``: the given ids in the given order; with only one list the other half is
    every remaining case (sorted by id). Unknown ids, duplicates and overlaps raise
    :class:`DatasetError`.
    """
    known: dict[str, CaseRecord] = {}
    for c in cases:
        if c.case_id in known:
            raise DatasetError(f"case id {c.case_id!r} occurs more than once; cannot split")
        known[c.case_id] = c
    if not known:
        raise DatasetError("no cases to split")
    if mode == "paper":
        if train_ids is not None or test_ids is not None:
            raise DatasetError("train_ids/test_ids are only used with mode='lists'")
        if not 0.0 < float(train_fraction) <= 1.0:
            raise DatasetError(f"train_fraction must be in (0, 1], got {train_fraction}")
        ordered = sorted(known.values(), key=lambda c: c.case_id)
        n_train = int(float(train_fraction) * len(ordered))
        if n_train == 0:
            raise DatasetError(
                f"{len(ordered)} case(s) with train_fraction {train_fraction} leave no training case"
            )
        return CaseSplit(ordered[:n_train], ordered[n_train:])
    if mode == "lists":
        if train_ids is None and test_ids is None:
            raise DatasetError("mode='lists' needs train_ids, test_ids or both")
        train = _check_list(train_ids, "train_ids", known) if train_ids is not None else None
        test = _check_list(test_ids, "test_ids", known) if test_ids is not None else None
        if train is not None and test is not None:
            overlap = sorted(set(train) & set(test))
            if overlap:
                raise DatasetError(f"case id(s) {overlap[:5]} are in both train_ids and test_ids")
        rest = sorted(set(known) - set(train or []) - set(test or []))
        train = train if train is not None else rest
        test = test if test is not None else rest
        if not train:
            raise DatasetError("the split has no training case")
        return CaseSplit([known[i] for i in train], [known[i] for i in test])
    raise DatasetError(f"unknown split mode {mode!r}; use 'paper' or 'lists'")


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Case ids from a text file: one per line; blank lines and ``#`` comments ignored."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"id list {p} does not exist")
    ids = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    return ids
