"""Safe extraction of zip archives that come from elsewhere (downloaded or user-given models).

``zipfile.extractall`` trusts the archive: it follows no policy on member names beyond
stripping some of them, writes links' targets as files, and lets a small archive expand
without bound. :func:`safe_extract_zip` checks every member's name and type and the total
size before it writes anything, counts the bytes it actually decompresses (a member may lie
about its size), and extracts into a temporary sibling folder that is renamed onto ``dest``
only when everything succeeded, so a refused or failed extraction leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
import zipfile
import zlib
from pathlib import Path

from .atomic import atomic_directory
from .errors import ScoreFusionError

#: Default limit on the number of members (a bundle has a handful of files).
MAX_MEMBERS = 1000
#: Default limit on the total uncompressed size (a paper-size bundle with raw weights is about 2 GiB).
MAX_TOTAL_BYTES = 16 << 30
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveError(ScoreFusionError):
    """An archive that is not a zip, is damaged, or holds a member that is refused."""


def safe_extract_zip(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> list[Path]:
    """Extract ``archive`` into the new folder ``dest``; return the extracted files' paths.

    Refused, with an :class:`ArchiveError` naming the member: absolute names, ``..`` or ``.``
    components, backslashes, drive letters or ``:``, control characters, symbolic links and
    other special files, encrypted members, duplicate names (also differing only in case or
    Unicode form), a name used both as a file and a folder, more than ``max_members`` members,
    and more than ``max_total_bytes`` declared or actually decompressed bytes.

    Parameters
    ----------
    archive : the zip file.
    dest : folder to create; it must not exist. It appears (by one rename) only once every
        member is extracted; on any failure nothing is left there or in the temporary folder.
    max_members, max_total_bytes : limits against archive bombs.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() or dest.is_symlink():
        raise ArchiveError(f"cannot extract {archive.name} into {dest}: it already exists")
    with _open_zip(archive) as zf:
        members = _checked_members(zf, archive, max_members, max_total_bytes)
        out: list[Path] = []
        with atomic_directory(dest) as tmp:
            total = 0
            for info, parts in members:
                target = tmp.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                total = _extract_member(zf, info, target, total, max_total_bytes)
                out.append(dest.joinpath(*parts))
    return out


def _open_zip(archive: Path) -> zipfile.ZipFile:
    if not archive.is_file():
        raise ArchiveError(f"archive {archive} does not exist or is not a file")
    try:
        return zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        with open(archive, "rb") as f:
            magic = f.read(4)
        if magic in (b"PK\x03\x04", b"PK\x05\x06"):
            raise ArchiveError(f"{archive} is a truncated or damaged zip archive: {exc}") from exc
        raise ArchiveError(f"{archive} is not a zip archive") from exc
    except (OSError, ValueError, EOFError) as exc:
        raise ArchiveError(f"cannot read the zip archive {archive}: {exc}") from exc


def _checked_members(zf: zipfile.ZipFile, archive: Path, max_members: int,
                     max_total_bytes: int) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Every member with its name split into parts, after all checks that need no extraction."""
    infos = zf.infolist()
    if len(infos) > max_members:
        raise ArchiveError(f"{archive.name} has {len(infos)} members, more than the limit of {max_members}")
    members = []
    seen: dict[str, str] = {}
    files: set[str] = set()
    folders: set[str] = set()
    declared = 0
    for info in infos:
        name = info.orig_filename
        parts = _name_parts(name, archive)
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise ArchiveError(f"{archive.name}: member {name!r} is a symbolic link; links are refused")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(f"{archive.name}: member {name!r} is a special file (mode {oct(kind)}); refused")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{archive.name}: member {name!r} is encrypted; encrypted archives are refused")
        key = unicodedata.normalize("NFC", "/".join(parts)).casefold()
        if key in seen:
            raise ArchiveError(f"{archive.name}: duplicate member name {name!r} (also given as {seen[key]!r})")
        seen[key] = name
        for i in range(1, len(parts)):
            folders.add(unicodedata.normalize("NFC", "/".join(parts[:i])).casefold())
        if info.is_dir():
            folders.add(key)
        else:
            files.add(key)
            declared += info.file_size
            if declared > max_total_bytes:
                raise ArchiveError(
                    f"{archive.name}: member {name!r} brings the uncompressed size to {declared} bytes, above the "
                    f"limit of {max_total_bytes}"
                )
        members.append((info, parts))
    clash = sorted(files & folders)
    if clash:
        raise ArchiveError(f"{archive.name}: member {seen[clash[0]]!r} is used both as a file and as a folder")
    return members


def _name_parts(name: str, archive: Path) -> tuple[str, ...]:
    """The components of a member name, refusing anything that could leave the folder."""
    if not name or name.startswith("/") or _DRIVE.match(name):
        raise ArchiveError(f"{archive.name}: member {name!r} has an absolute path")
    if "\\" in name or ":" in name:
        raise ArchiveError(f"{archive.name}: member {name!r} contains a backslash or ':'; refused")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ArchiveError(f"{archive.name}: member {name!r} contains a control character")
    parts = name[:-1].split("/") if name.endswith("/") else name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ArchiveError(
                f"{archive.name}: member {name!r} has an empty, '.' or '..' path component; it could escape the folder"
            )
    return tuple(parts)


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, total: int, limit: int) -> int:
    """Stream one member to ``target`` counting its bytes; return the new running total."""
    written = 0
    try:
        with zf.open(info) as src, open(target, "xb") as dst:
            while block := src.read(_CHUNK):
                written += len(block)
                total += len(block)
                if written > info.file_size:
                    raise ArchiveError(f"member {info.orig_filename!r} is larger than the {info.file_size} bytes "
                                       "it declares")
                if total > limit:
                    raise ArchiveError(f"extracting member {info.orig_filename!r} exceeds the limit of {limit} "
                                       "uncompressed bytes")
                dst.write(block)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise ArchiveError(f"member {info.orig_filename!r} is damaged or cannot be read: {exc}") from exc
    if written != info.file_size:
        raise ArchiveError(f"member {info.orig_filename!r} holds {written} bytes, not the {info.file_size} it declares")
    return total
