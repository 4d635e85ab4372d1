"""A local HTTP server on 127.0.0.1 that drops, stalls, fails and lies on purpose, for download tests."""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

# ---------------------------------------------------------------------------------------------
# a local server with injectable faults


class FaultyServer:
    """Serves ``files`` (url path -> bytes); ``faults[path]`` is a queue of per-request misbehaviours.

    Faults: ``("drop", n)`` send n body bytes then close; ``("status", code)``; ``("ignore-range",)``
    answer 200 with the whole file; ``("stall-headers", s)`` / ``("stall-body", s)`` wait s seconds
    before the headers / after the first 1000 body bytes; ``("corrupt",)`` flip the body's first byte.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[tuple]] = {}
        self.log: list[dict] = []  # one record per request: path, method, headers, status
        self.lock = threading.Lock()

    def next_fault(self, path: str) -> tuple:
        with self.lock:
            queue = self.faults.get(path) or []
            return queue.pop(0) if queue else ()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _headers(self, status: int, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()

    def do_GET(self) -> None:
        app: FaultyServer = self.server.app
        record = {"path": self.path, "method": "GET", "headers": dict(self.headers), "status": None}
        app.log.append(record)
        fault = app.next_fault(self.path)
        data = app.files.get(self.path)
        if fault[:1] == ("stall-headers",):
            time.sleep(fault[1])
        if data is None or fault[:1] == ("status",):
            record["status"] = fault[1] if fault else 404
            self._headers(record["status"], {"Content-Length": 0})
            return
        if fault[:1] == ("corrupt",):
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, status, extra = 0, 200, {}
        wanted = self.headers.get("Range")
        if wanted and fault[:1] != ("ignore-range",):
            m = re.fullmatch(r"bytes=(\d+)-", wanted)
            start = int(m.group(1))
            if start >= len(data):
                record["status"] = 416
                self._headers(416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": 0})
                return
            status, extra = 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        record["status"] = status
        self._headers(status, {"Content-Length": len(body), "Content-Type": "application/zip", **extra})
        if fault[:1] == ("drop",):
            self.wfile.write(body[: fault[1]])
            self.wfile.flush()
            self.close_connection = True
            return
        if fault[:1] == ("stall-body",):
            self.wfile.write(body[:1000])
            self.wfile.flush()
            time.sleep(fault[1])
            body = body[1000:]
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.server.app.log.append({"path": self.path, "method": "HEAD", "headers": dict(self.headers)})
        self._headers(405, {"Content-Length": 0})

    do_POST = do_PUT = do_HEAD


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that gave up: not a test failure
        pass


@pytest.fixture
def server(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    app = FaultyServer()
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.app = app
    app.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield app
    httpd.shutdown()
    httpd.server_close()
