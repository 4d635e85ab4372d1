"""Downloads and installs against a local HTTP server that drops, stalls, fails and lies on purpose.

Nothing here reaches the internet: the server listens on 127.0.0.1 on a free port, and every
transfer resumes, retries or fails exactly as a real flaky mirror would make it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zipfile
from pathlib import Path

import pytest

from ScoreFusionLib.errors import ScoreFusionError
from ScoreFusionLib.registry import download as download_module
from ScoreFusionLib.registry.cache import cache_root, installed_models
from ScoreFusionLib.registry.catalog import parse_registry
from ScoreFusionLib.registry.download import ChecksumError, DownloadError, download, part_path
from ScoreFusionLib.registry.install import install_model


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A private cache for every test (autouse: set before any other fixture), never the real home."""
    monkeypatch.setenv("SCOREFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SCOREFUSION_REGISTRY", raising=False)
    return tmp_path / "home"


@pytest.fixture
def payload():
    data = bytes(range(256)) * 1200 + b"tail"  # ~300 kB: several 64 kB chunks
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def sleeps(monkeypatch):
    """Record the backoff pauses instead of sleeping them."""
    delays: list[float] = []
    monkeypatch.setattr(download_module.time, "sleep", delays.append)
    return delays


def _range_start(record: dict) -> int:
    """First byte a request asked for with ``Range: bytes=N-``."""
    return int(re.fullmatch(r"bytes=(\d+)-", record["headers"]["Range"]).group(1))


def fetch(url, dest, sha, size, **kw):
    kw.setdefault("retries", 3)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    return download(url, dest, sha, size, progress=False, **kw)


# ---------------------------------------------------------------------------------------------
# download()


def test_plain_download_sends_only_a_get(server, payload, tmp_path):
    data, sha = payload
    server.files["/m.zip"] = data
    out = fetch(server.url("/m.zip"), tmp_path / "m.zip", sha, len(data))
    assert out.read_bytes() == data
    assert [r["method"] for r in server.log] == ["GET"]
    assert "Range" not in server.log[0]["headers"]
    assert not part_path(out).exists()
    # already there with the right checksum: no request at all
    fetch(server.url("/m.zip"), out, sha, len(data))
    assert len(server.log) == 1


def test_interrupted_transfer_resumes_with_range(server, payload, tmp_path, sleeps):
    data, sha = payload
    server.files["/m.zip"] = data
    server.faults["/m.zip"] = [("drop", 100_000)]
    out = fetch(server.url("/m.zip"), tmp_path / "m.zip", sha, len(data))
    assert out.read_bytes() == data
    assert len(server.log) == 2
    assert 0 < _range_start(server.log[1]) <= 100_000  # what arrived before the drop (whole chunks)
    assert server.log[1]["status"] == 206
    assert sleeps == [0.01]


def test_resume_across_runs_and_server_ignoring_range(server, payload, tmp_path, sleeps):
    data, sha = payload
    server.files["/m.zip"] = data
    server.faults["/m.zip"] = [("drop", 70_000)]
    dest = tmp_path / "m.zip"
    with pytest.raises(DownloadError, match="after 1 attempt"):
        fetch(server.url("/m.zip"), dest, sha, len(data), retries=0)
    kept = part_path(dest).stat().st_size
    assert not dest.exists() and 0 < kept <= 70_000
    # next run: the server ignores Range and sends everything: the partial file is restarted, not appended to
    server.faults["/m.zip"] = [("ignore-range",)]
    fetch(server.url("/m.zip"), dest, sha, len(data))
    assert dest.read_bytes() == data
    assert _range_start(server.log[1]) == kept and server.log[1]["status"] == 200


def test_partial_file_longer_than_the_server_file_restarts_after_416(server, payload, tmp_path, sleeps):
    data, sha = payload
    server.files["/m.zip"] = data
    dest = tmp_path / "m.zip"
    part_path(dest).write_bytes(data + b"stale extra bytes")
    fetch(server.url("/m.zip"), dest, sha, None)  # size unknown: only the server can say the partial is wrong
    assert dest.read_bytes() == data
    assert [r["status"] for r in server.log] == [416, 200]


def test_complete_partial_file_is_accepted_after_416(server, payload, tmp_path, sleeps):
    data, sha = payload
    server.files["/m.zip"] = data
    dest = tmp_path / "m.zip"
    part_path(dest).write_bytes(data)
    fetch(server.url("/m.zip"), dest, sha, None)
    assert dest.read_bytes() == data
    assert [r["status"] for r in server.log] == [416]


def test_wrong_checksum_names_both_hashes_and_deletes_the_file(server, payload, tmp_path):
    data, sha = payload
    server.files["/m.zip"] = data
    server.faults["/m.zip"] = [("corrupt",)]
    dest = tmp_path / "dl" / "m.zip"
    with pytest.raises(ChecksumError) as info:
        fetch(server.url("/m.zip"), dest, sha, len(data))
    corrupted = hashlib.sha256(bytes([data[0] ^ 0xFF]) + data[1:]).hexdigest()
    assert sha in str(info.value) and corrupted in str(info.value)
    assert list((tmp_path / "dl").iterdir()) == []


def test_size_announced_by_the_server_is_checked_before_the_transfer(server, payload, tmp_path):
    data, sha = payload
    server.files["/m.zip"] = data
    dest = tmp_path / "m.zip"
    with pytest.raises(ChecksumError, match=f"{len(data)} bytes long but the registry expects 1000"):
        fetch(server.url("/m.zip"), dest, sha, 1000)
    assert not dest.exists() and not part_path(dest).exists()


def test_server_errors_are_retried_with_exponential_backoff(server, payload, tmp_path, sleeps):
    data, sha = payload
    server.files["/m.zip"] = data
    server.faults["/m.zip"] = [("status", 500), ("status", 503)]
    out = fetch(server.url("/m.zip"), tmp_path / "m.zip", sha, len(data), backoff=0.01)
    assert out.read_bytes() == data
    assert [r["status"] for r in server.log] == [500, 503, 200]
    assert sleeps == [0.01, 0.02]


def test_server_errors_give_up_after_the_retries(server, payload, tmp_path, sleeps):
    data, sha = payload
    server.files["/m.zip"] = data
    server.faults["/m.zip"] = [("status", 500)] * 3
    with pytest.raises(DownloadError, match=r"failed after 3 attempts: .*HTTP 500"):
        fetch(server.url("/m.zip"), tmp_path / "m.zip", sha, len(data), retries=2)
    assert len(server.log) == 3 and sleeps == [0.01, 0.02]


def test_not_found_fails_at_once(server, payload, tmp_path, sleeps):
    _, sha = payload
    with pytest.raises(DownloadError, match=r"HTTP 404 .*no such file on the server"):
        fetch(server.url("/missing.zip"), tmp_path / "m.zip", sha, 10)
    assert len(server.log) == 1 and sleeps == []


@pytest.mark.parametrize("stall", ["stall-headers", "stall-body"])
def test_stalled_server_times_out_quickly(server, payload, tmp_path, stall):
    data, sha = payload
    server.files["/m.zip"] = data
    server.faults["/m.zip"] = [(stall, 3.0), (stall, 3.0)]
    begin = time.monotonic()
    with pytest.raises(DownloadError, match="timed out") as info:
        fetch(server.url("/m.zip"), tmp_path / "m.zip", sha, len(data), timeout=0.2, retries=1)
    assert time.monotonic() - begin < 2.0
    assert "0.2 s" in str(info.value) and "2 attempts" in str(info.value)
    assert not (tmp_path / "m.zip").exists()


def test_refused_connection_is_a_clear_error(payload, tmp_path, sleeps):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, sha = payload
    with pytest.raises(DownloadError, match=r"after 2 attempts: cannot connect to 127\.0\.0\.1"):
        fetch(f"http://127.0.0.1:{port}/m.zip", tmp_path / "m.zip", sha, 10, retries=1)


def test_an_exception_from_the_progress_callback_aborts_and_the_next_run_resumes(server, payload, tmp_path):
    """Ctrl-C, or a cancel raised from ``on_progress``, stops the transfer at once: no retry, no final file."""
    data, sha = payload
    server.files["/m.zip"] = data
    calls = []

    def interrupt_on_second_chunk(done, total):
        calls.append((done, total))
        if len(calls) == 2:
            raise KeyboardInterrupt

    dest = tmp_path / "m.zip"
    with pytest.raises(KeyboardInterrupt):
        fetch(server.url("/m.zip"), dest, sha, len(data), on_progress=interrupt_on_second_chunk)
    assert not dest.exists() and len(server.log) == 1
    assert calls[0][1] == len(data) and calls[1][0] > calls[0][0] > 0
    kept = part_path(dest).stat().st_size
    assert 0 < kept < len(data)
    # the next run picks up where the interrupted one stopped, and reports from there to the end
    progress = []
    fetch(server.url("/m.zip"), dest, sha, len(data), on_progress=lambda done, total: progress.append(done))
    assert dest.read_bytes() == data
    assert server.log[-1]["headers"]["Range"] == f"bytes={kept}-"
    assert progress[0] > kept and progress[-1] == len(data)


def test_local_paths_and_file_urls_are_checked_too(payload, tmp_path):
    data, sha = payload
    src = tmp_path / "src.zip"
    src.write_bytes(data)
    assert fetch(str(src), tmp_path / "a.zip", sha, len(data)).read_bytes() == data
    assert fetch(src.as_uri(), tmp_path / "b.zip", sha, len(data)).read_bytes() == data
    with pytest.raises(ChecksumError):
        fetch(str(src), tmp_path / "c.zip", "f" * 64, len(data))
    assert not (tmp_path / "c.zip").exists() and not part_path(tmp_path / "c.zip").exists()
    with pytest.raises(DownloadError, match="does not exist"):
        fetch(str(tmp_path / "nope.zip"), tmp_path / "d.zip", sha, 1)
    with pytest.raises(DownloadError, match="unsupported url scheme"):
        fetch("ftp://example.org/m.zip", tmp_path / "e.zip", sha, 1)
    with pytest.raises(DownloadError, match="64 hexadecimal"):
        fetch(str(src), tmp_path / "f.zip", "abc", 1)


# ---------------------------------------------------------------------------------------------
# install_model() over HTTP


@pytest.fixture(scope="module")
def bundle_zip(tmp_path_factory) -> Path:
    """A real (tiny, random-weight) bundle packed as a release archive."""
    from bundle_fixtures import make_random_bundle
    from ScoreFusionLib.bundle_archive import pack_bundle
    from ScoreFusionLib.data.task import TaskSpec
    from ScoreFusionLib.degradation import AveragePool

    root = tmp_path_factory.mktemp("bundle")
    spec = TaskSpec(kind="sr", inputs=[], target="t1n", degradation=AveragePool(2))
    folder = make_random_bundle(root / "b", spec, planes=("axial",))
    pack_bundle(folder, root / "b.zip")
    return root / "b.zip"


def _remote_registry(url: str, data: bytes, model_id: str = "remote-sr") -> object:
    entry = {"id": model_id, "title": "t", "task": "sr", "inputs": [], "target": "t1n", "version": "1.0.0",
             "url": url, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "license": "MIT",
             "description": "test"}
    return parse_registry({"format": "scorefusion-registry", "format_version": 1, "models": [entry]})


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_install_resumes_and_unpacks_into_the_cache(server, bundle_zip, home, sleeps):
    data = bundle_zip.read_bytes()
    server.files["/b.zip"] = data
    server.faults["/b.zip"] = [("drop", len(data) // 2)]
    registry = _remote_registry(server.url("/b.zip"), data)
    path = install_model("remote-sr", registry=registry, progress=False, backoff=0.01)
    assert cache_root() == home
    assert path == home / "models" / "remote-sr" / "1.0.0"
    assert (path / "manifest.json").is_file()
    assert 0 < _range_start(server.log[1]) <= len(data) // 2
    assert not (home / "downloads").exists()  # the verified archive is not kept once unpacked
    # installed: a second call makes no request
    assert install_model("remote-sr", registry=registry, progress=False) == path
    assert len(server.log) == 2


def test_install_with_wrong_checksum_leaves_nothing(server, bundle_zip, home):
    data = bundle_zip.read_bytes()
    server.files["/b.zip"] = data
    server.faults["/b.zip"] = [("corrupt",)]
    registry = _remote_registry(server.url("/b.zip"), data)
    with pytest.raises(ChecksumError, match=registry.get("remote-sr").sha256):
        install_model("remote-sr", registry=registry, progress=False)
    assert _files_under(home) == []
    assert installed_models() == []


def test_malicious_archive_with_the_right_checksum_is_refused(server, home, tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("manifest.json", json.dumps({"format": "scorefusion-bundle", "format_version": 1}))
        z.writestr("../evil", b"escaped")
        z.writestr("../../evil2", b"escaped")
    data = evil.read_bytes()
    server.files["/evil.zip"] = data
    registry = _remote_registry(server.url("/evil.zip"), data)
    with pytest.raises(ScoreFusionError):
        install_model("remote-sr", registry=registry, progress=False)
    assert _files_under(home) == []
    assert installed_models() == []
    assert not any(p.name.startswith("evil") and p != evil for p in tmp_path.rglob("*"))


def test_keyboard_interrupt_during_install_leaves_no_model(server, bundle_zip, home, monkeypatch):
    data = bundle_zip.read_bytes()
    server.files["/b.zip"] = data
    registry = _remote_registry(server.url("/b.zip"), data)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    import ScoreFusionLib.bundle_archive as bundle_archive

    monkeypatch.setattr(bundle_archive, "unpack_bundle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        install_model("remote-sr", registry=registry, progress=False)
    assert installed_models() == []
    assert not (home / "models").exists() or _files_under(home / "models") == []
    assert not any(p.name.endswith(".part") and p.is_dir() for p in home.rglob("*"))


def test_cli_download_reports_http_errors_in_one_line(server, home, tmp_path, capsys):
    from ScoreFusionLib.cli.main import main

    data = b"x" * 100
    registry = tmp_path / "registry.json"
    entry = {"id": "gone", "title": "t", "task": "sr", "inputs": [], "target": "t1n", "version": "1.0.0",
             "url": server.url("/gone.zip"), "sha256": hashlib.sha256(data).hexdigest(), "size": 100,
             "license": "MIT", "description": "test"}
    registry.write_text(json.dumps({"format": "scorefusion-registry", "format_version": 1, "models": [entry]}))
    assert main(["models", "download", "gone", "--registry", str(registry), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scorefusion models: error: ") and "HTTP 404" in err and err.count("\n") == 1
    assert _files_under(home) == []
