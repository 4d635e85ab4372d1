"""Fetch one model archive, resumably, and accept it only when its sha256 is the registered one.

Model archives are large and connections drop: bytes go to ``<dest>.part``, an interrupted
transfer continues with an HTTP ``Range`` request (on the next attempt or the next run), transient
failures (connection errors, timeouts, 5xx) are retried with exponential backoff, and the file
appears under its final name only after its size and sha256 match, so a truncated or tampered
archive is never mistaken for a good one. Only plain GET requests are sent.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union
from urllib.parse import urlparse
from urllib.request import url2pathname

from ..bundle import sha256_file
from ..errors import ScoreFusionError

#: (connect, read) seconds; the read timeout bounds each wait for data, not the whole transfer
DEFAULT_TIMEOUT = (10.0, 60.0)
CHUNK = 1 << 16
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")

Timeout = Union[float, tuple[float, float]]


class DownloadError(ScoreFusionError):
    """A transfer that failed (network, HTTP status, missing file) after any retries."""


class ChecksumError(DownloadError):
    """A complete transfer whose size or sha256 is not the expected one; the file was deleted."""


class _Retryable(Exception):
    """A transient failure: try again after a pause."""


def part_path(dest: str | os.PathLike) -> Path:
    """Where the bytes of ``dest`` accumulate until they are verified."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


#: ``on_progress(bytes_done, bytes_total_or_None)``, called after every chunk; it may raise to abort.
ProgressCallback = Callable[[int, Optional[int]], None]


@dataclass(frozen=True)
class _Feedback:
    """How a transfer reports: a terminal progress bar and/or the caller's callback."""

    show: bool = True
    on_progress: ProgressCallback | None = None

    @contextmanager
    def bar(self, total: int | None, initial: int, name: str) -> Iterator[Callable[[int], None]]:
        """An ``update(n_bytes)`` function for one transfer."""
        from tqdm.auto import tqdm

        done = [initial]
        with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                  file=sys.stderr, disable=not self.show, dynamic_ncols=True) as tq:

            def update(n: int) -> None:
                tq.update(n)
                done[0] += n
                if self.on_progress is not None:
                    self.on_progress(done[0], total)

            yield update


def _timeouts(timeout: Timeout) -> tuple[float, float]:
    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    if not (connect > 0 and read > 0):
        raise DownloadError(f"timeouts must be positive, got {timeout!r}")
    return float(connect), float(read)


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str,
    size: int | None = None,
    *,
    timeout: Timeout = DEFAULT_TIMEOUT,
    retries: int = 4,
    backoff: float = 1.0,
    progress: bool = True,
    session: Any = None,
    on_progress: ProgressCallback | None = None,
) -> Path:
    """Download ``url`` to ``dest`` and check it against ``sha256`` (and ``size`` when not None).

    Parameters
    ----------
    url : ``http(s)://``, ``file://`` or a local path (copied, with the same checks).
    dest : final file; an existing one with the right checksum is kept without any request.
    timeout : seconds to connect and to wait for each piece of data, one number or (connect, read).
    retries : further attempts after a transient failure; the pauses are ``backoff * 2**k`` s.
    session : a ``requests.Session`` to use (one is created otherwise).
    on_progress : called with (bytes done, total bytes or None) after every chunk; an exception it
        raises aborts the transfer at once (no retry) and leaves the ``.part`` file for a resume.

    Raises :class:`ChecksumError` when the complete file does not match (the partial file is
    deleted) and :class:`DownloadError` for anything else; on an interruption the ``.part`` file
    stays so that the next call resumes it.
    """
    expected = str(sha256).lower()
    if not _SHA256.match(expected):
        raise DownloadError(f"invalid expected sha256 {sha256!r}: need 64 hexadecimal digits")
    if retries < 0 or backoff < 0:
        raise DownloadError("retries and backoff must not be negative")
    dest = Path(dest)
    if dest.is_file():
        if sha256_file(dest) == expected:
            return dest
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    feedback = _Feedback(progress, on_progress)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        _download_http(url, part, size, _timeouts(timeout), retries, backoff, feedback, session)
    elif parsed.scheme == "file":
        _copy_local(Path(url2pathname(parsed.path)), part, feedback)
    elif not parsed.scheme or (len(parsed.scheme) == 1 and os.name == "nt"):  # a path, C:\... included
        _copy_local(Path(url), part, feedback)
    else:
        raise DownloadError(f"unsupported url scheme {parsed.scheme!r} in {url}: use http(s)://, file:// or a path")
    _verify_and_move(part, dest, expected, size, url)
    return dest


def _verify_and_move(part: Path, dest: Path, expected: str, size: int | None, url: str) -> None:
    actual = sha256_file(part)
    n = part.stat().st_size
    if actual != expected or (size is not None and n != size):
        part.unlink(missing_ok=True)
        want = f" ({size} bytes)" if size is not None else ""
        raise ChecksumError(
            f"checksum mismatch for {url}: expected sha256 {expected}{want}, got {actual} ({n} bytes); "
            "the file was deleted (a corrupted transfer, or the file differs from the registered one)"
        )
    os.replace(part, dest)


def _copy_local(src: Path, part: Path, feedback: _Feedback) -> None:
    """Copy a local archive chunk by chunk (a progress bar for large embedded models)."""
    if not src.is_file():
        raise DownloadError(f"model archive {src} does not exist")
    try:
        with open(src, "rb") as fin, open(part, "wb") as fout, \
                feedback.bar(src.stat().st_size, 0, src.name) as update:
            while block := fin.read(CHUNK * 16):
                fout.write(block)
                update(len(block))
    except BaseException as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise DownloadError(f"cannot copy {src}: {exc}") from exc
        raise


def _download_http(url: str, part: Path, size: int | None, timeout: tuple[float, float], retries: int,
                   backoff: float, feedback: _Feedback, session: Any) -> None:
    """Fetch until ``part`` holds the whole file, retrying transient failures with backoff."""
    import requests

    own = session is None
    session = requests.Session() if own else session
    failures = 0
    try:
        while True:
            try:
                _fetch_once(session, url, part, size, timeout, feedback)
                return
            except _Retryable as exc:
                failures += 1
                if failures > retries:
                    raise DownloadError(
                        f"downloading {url} failed after {failures} attempt{'s' if failures > 1 else ''}: {exc}"
                    ) from None
                delay = backoff * 2 ** (failures - 1)
                if feedback.show:
                    print(f"{exc}; retrying in {delay:.1f} s ({failures}/{retries})", file=sys.stderr)
                time.sleep(delay)
    finally:
        if own:
            session.close()


def _describe(exc: Exception, timeout: tuple[float, float], host: str) -> str:
    """A short reason for a requests/urllib3 exception, naming timeouts as such."""
    import requests
    from urllib3.exceptions import ReadTimeoutError

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"timed out after {timeout[0]:g} s connecting to {host}"
    if isinstance(exc, requests.exceptions.ReadTimeout) or any(isinstance(a, ReadTimeoutError) for a in exc.args):
        return f"timed out: {host} sent no data for {timeout[1]:g} s"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"the connection to {host} broke off mid-transfer"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"cannot connect to {host} ({exc.__class__.__name__})"
    return f"{exc.__class__.__name__}: {exc}"


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range`` header; None where absent or ``*``."""
    m = _CONTENT_RANGE.match((header or "").strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


def _fetch_once(session: Any, url: str, part: Path, size: int | None, timeout: tuple[float, float],
                feedback: _Feedback) -> None:
    """One GET, resuming ``part`` with a Range request when it holds bytes already."""
    import requests

    host = urlparse(url).netloc
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:  # a stale partial of some other file
        part.unlink()
        have = 0
    if size is not None and have == size and have > 0:
        return  # complete already; the checksum decides
    headers = {"Accept-Encoding": "identity"}  # byte ranges of the file itself, never of a compressed form
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise _Retryable(_describe(exc, timeout, host)) from exc
    except requests.exceptions.RequestException as exc:
        raise DownloadError(f"cannot download {url}: {_describe(exc, timeout, host)}") from exc
    with resp:
        status = resp.status_code
        start, total = _content_range(resp.headers.get("Content-Range"))
        if status == 416 and have:
            if total is not None and total == have:
                return  # the partial file is already the whole file; the checksum decides
            part.unlink()  # longer than the server's file, or no size given: start again from zero
            raise _Retryable(f"{host} refused to resume at byte {have}; starting again from zero")
        if status == 206:
            if start != have:
                part.unlink(missing_ok=True)
                raise _Retryable(f"{host} answered a resume request with the wrong byte range; starting again")
            mode = "ab"
        elif status == 200:
            have, mode = 0, "wb"  # the server ignored Range (or there was none): the body is the whole file
        elif status >= 500 or status in (408, 429):
            raise _Retryable(f"{host} answered HTTP {status} {resp.reason}")
        else:
            hint = " (no such file on the server)" if status == 404 else ""
            raise DownloadError(f"cannot download {url}: HTTP {status} {resp.reason}{hint}")
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        expected_total = have + length if length is not None else total
        if size is not None and expected_total is not None and expected_total != size:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{url} is {expected_total} bytes long but the registry expects {size}: it is not the registered file"
            )
        received = 0
        with open(part, mode) as out, feedback.bar(expected_total or size, have, part.name[:-5]) as update:
            try:
                for chunk in resp.iter_content(CHUNK):
                    if size is not None and have + received + len(chunk) > size:
                        out.close()
                        part.unlink(missing_ok=True)
                        raise ChecksumError(f"{url} sent more than the {size} bytes the registry expects")
                    out.write(chunk)
                    received += len(chunk)
                    update(len(chunk))
            except requests.exceptions.RequestException as exc:
                raise _Retryable(f"{_describe(exc, timeout, host)} after {have + received} bytes") from exc
        if length is not None and received < length:
            raise _Retryable(f"the connection to {host} closed after {have + received} of {have + length} bytes")
        if size is not None and have + received < size:
            raise _Retryable(f"the transfer from {host} ended after {have + received} of {size} bytes")
