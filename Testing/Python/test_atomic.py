"""Tests of atomic file and directory output."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from ScoreFusionLib.atomic import atomic_directory, atomic_path, write_text_atomic


class Boom(Exception):
    pass


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_success_writes_and_leaves_no_temporary(tmp_path):
    final = tmp_path / "out" / "vol.nii.gz"
    with atomic_path(final, suffix=".nii.gz") as tmp:
        assert tmp.parent == final.parent  # same filesystem: rename is atomic
        assert tmp != final and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
        assert not final.exists()
        tmp.write_bytes(b"payload")
        assert not final.exists()  # nothing under the final name until the body succeeds
    assert final.read_bytes() == b"payload"
    assert _entries(final.parent) == ["vol.nii.gz"]


def test_atomic_path_success_replaces_existing(tmp_path):
    final = tmp_path / "a.txt"
    final.write_bytes(b"old")
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new"
    assert _entries(tmp_path) == ["a.txt"]


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_atomic_path_failure_leaves_nothing(tmp_path, exc):
    final = tmp_path / "a.txt"
    with pytest.raises(exc):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise exc()
    assert not final.exists()
    assert _entries(tmp_path) == []


def test_atomic_path_failure_keeps_existing_destination(tmp_path):
    final = tmp_path / "a.txt"
    final.write_bytes(b"precious")
    mtime = final.stat().st_mtime_ns
    with pytest.raises(Boom):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half-written")
            raise Boom()
    assert final.read_bytes() == b"precious"
    assert final.stat().st_mtime_ns == mtime
    assert _entries(tmp_path) == ["a.txt"]


def test_concurrent_temporaries_do_not_collide(tmp_path):
    final = tmp_path / "a.txt"
    with atomic_path(final) as t1, atomic_path(final) as t2:
        assert t1 != t2 and t1.exists() and t2.exists()
        t1.write_text("1")
        t2.write_text("2")
    assert final.read_text() == "1"  # t2's context exits first, then t1's replaces it
    assert _entries(tmp_path) == ["a.txt"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_outputs_get_the_permissions_of_a_plain_write(tmp_path):
    plain_file = tmp_path / "plain.txt"
    plain_file.write_text("x")
    plain_dir = tmp_path / "plain_dir"
    plain_dir.mkdir()
    write_text_atomic(tmp_path / "atomic.txt", "x")
    with atomic_directory(tmp_path / "atomic_dir"):
        pass
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "atomic.txt") == mode(plain_file)
    assert mode(tmp_path / "atomic_dir") == mode(plain_dir)


def test_atomic_directory_success(tmp_path):
    final = tmp_path / "parent" / "bundle"
    with atomic_directory(final) as tmp:
        assert tmp.is_dir() and tmp.parent == final.parent and not final.exists()
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "meta.json").write_text("{}")
    assert (final / "weights.bin").read_bytes() == b"w"
    assert (final / "sub" / "meta.json").read_text() == "{}"
    assert _entries(final.parent) == ["bundle"]


def test_atomic_directory_refuses_existing_destination(tmp_path):
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "keep.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        with atomic_directory(final) as tmp:
            (tmp / "x").write_text("x")  # pragma: no cover - must not run
    assert _entries(final) == ["keep.txt"]
    assert _entries(tmp_path) == ["bundle"]


def test_atomic_directory_failure_cleans_up(tmp_path):
    final = tmp_path / "bundle"
    with pytest.raises(Boom):
        with atomic_directory(final) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "half.bin").write_bytes(b"h")
            raise Boom()
    assert not final.exists()
    assert _entries(tmp_path) == []


def test_write_text_atomic_utf8_lf(tmp_path):
    path = tmp_path / "prov.json"
    write_text_atomic(path, "line one\nÜnïcode ✓\n")
    assert path.read_bytes() == "line one\nÜnïcode ✓\n".encode()
    write_text_atomic(path, "second")
    assert path.read_text(encoding="utf-8") == "second"
    assert _entries(tmp_path) == ["prov.json"]
