"""Atomic file output: write to a temporary sibling, then rename into place.

A crash, a cancel or a full disk therefore never leaves a half-written file under the
final name, and an existing file is only replaced by a complete new one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _new_sibling(final: Path, suffix: str, directory: bool) -> Path:
    """Create a uniquely named hidden sibling of ``final`` (a file or a directory).

    Unlike ``tempfile.mkstemp``/``mkdtemp`` (always 0600/0700), the mode is what a plain
    ``open``/``mkdir`` gives under the user's umask, so the renamed output is not private.
    """
    for _ in range(1000):
        tmp = final.parent / f".{final.name}.{secrets.token_hex(6)}{suffix}"
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary name next to {final}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``final``; move it onto ``final`` on success.

    The temporary name keeps ``suffix`` (e.g. ``.nii.gz``) so writers that pick a format
    from the file name still work. On any exception the temporary file is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_sibling(final, f".part{suffix}", directory=False)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; rename it onto ``final`` on success.

    ``final`` must not exist yet (a directory cannot be replaced atomically).
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} already exists; refusing to overwrite a directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(final, ".part", directory=True)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_directory(final: str | os.PathLike, build: Callable[[Path], None], overwrite: bool = False) -> None:
    """Build a folder with ``build(tmp)`` and move it to ``final`` in one rename.

    An existing ``final`` is only replaced (``overwrite``) once the new folder is complete, so
    a failed or cancelled build leaves the old folder untouched and nothing half-written.
    Raises ``FileExistsError`` when ``final`` exists and ``overwrite`` is false, and
    ``NotADirectoryError`` when it is a file.
    """
    final = Path(final)
    if not final.exists():
        with atomic_directory(final) as tmp:
            build(tmp)
        return
    if not overwrite:
        raise FileExistsError(f"{final} already exists")
    if not final.is_dir():
        raise NotADirectoryError(f"{final} exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    old = None
    try:
        build(tmp)
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / final.name).exists() and not final.exists():
            os.replace(old / final.name, final)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8, LF line endings)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
