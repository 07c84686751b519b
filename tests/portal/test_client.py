"""``portal.client.Portal`` at the edge of the network: retries on 429 and 503 honouring Retry-After (a streamed
upload is sent again whole), errors carrying the HTTP status and the API's code, a 404 that says what was not
found, uploads streamed in chunks with a Content-Length, waits that report progress and time out. The client
against a running portal with a worker is walked by ``tests/registry/test_cli.py`` (the CLI is built on it)."""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from portal.client import MultipartStream, Portal, PortalError, WaitTimeout


class FakePortal(BaseHTTPRequestHandler):
    """Answers scripted (status, headers, body) replies in order and records what each request carried."""

    replies: list[tuple[int, dict[str, str], Any]] = []
    seen: list[dict[str, Any]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        received, biggest_read = 0, 0
        while received < length:
            chunk = self.rfile.read(min(256 * 1024, length - received))
            received += len(chunk)
            biggest_read = max(biggest_read, len(chunk))
        self.seen.append({"method": self.command, "path": self.path, "length": length, "received": received,
                          "chunked": self.headers.get("Transfer-Encoding"), "at": time.monotonic(),
                          "auth": self.headers.get("Authorization")})
        status, headers, body = self.replies.pop(0)
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[tuple[str, type[FakePortal]]]:
    FakePortal.replies, FakePortal.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePortal)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", FakePortal
    finally:
        server.shutdown()
        server.server_close()


VERSION = {"model": "churn", "number": 3, "status": "scanning", "status_detail": "", "sha256": "ab" * 32,
           "format": "joblib", "scan": {"trust_state": "not_needed"}, "metrics": {}}


def test_retries_errors_streaming_and_waits(fake: tuple[str, type[FakePortal]], tmp_path: Path) -> None:
    url, handler = fake
    portal = Portal(url, "mlp_test", retries=3, backoff=0.01, poll_interval=0.05)

    # 503 with Retry-After: 1, then 429 with Retry-After: 0, then the answer; the streamed body is sent whole each time.
    big = tmp_path / "model.joblib"
    with open(big, "wb") as out:
        for _ in range(24):
            out.write(b"\x01" * 2**20)
    handler.replies = [(503, {"Retry-After": "1"}, {"error": {"code": "unavailable", "message": "busy",
                                                              "details": None}}),
                       (429, {"Retry-After": "0"}, {"error": {"code": "throttled", "message": "slow down",
                                                              "details": None}}),
                       (201, {}, VERSION)]
    tracemalloc.start()
    try:
        version = portal.upload("churn", big, metrics={"auc": 0.9})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert version.number == 3 and version.status == "scanning" and version.raw["sha256"] == "ab" * 32
    assert [s["received"] for s in handler.seen] == [s["length"] for s in handler.seen]
    assert len(handler.seen) == 3 and all(s["length"] > 24 * 2**20 and s["chunked"] is None for s in handler.seen)
    assert handler.seen[1]["at"] - handler.seen[0]["at"] >= 0.95  # Retry-After honoured
    assert handler.seen[0]["auth"] == "Bearer mlp_test"
    assert peak < 8 * 2**20, f"the 24 MiB upload peaked at {peak / 2**20:.1f} MiB of Python memory"

    # Out of retries: the last refusal, with its status and code.
    handler.replies = [(503, {"Retry-After": "0"}, {"error": {"code": "unavailable", "message": "busy",
                                                              "details": {"x": 1}}})] * 4
    with pytest.raises(PortalError) as refused:
        portal.version("churn", 3)
    assert (refused.value.status, refused.value.code, refused.value.details) == (503, "unavailable", {"x": 1})

    # A bare "Not found." names what was looked for.
    handler.replies = [(404, {}, {"error": {"code": "not_found", "message": "Not found.", "details": None}})]
    with pytest.raises(PortalError) as missing:
        portal.version("churn", 9)
    assert missing.value.status == 404 and "version 9 of model 'churn'" in missing.value.message

    # A wait reports each new state and ends at ready; one that cannot end raises WaitTimeout with the last state.
    handler.replies = [(200, {}, VERSION), (200, {}, VERSION), (200, {}, {**VERSION, "status": "ready"})]
    seen: list[str] = []
    ready = portal.wait_version(version, timeout=30, progress=lambda v: seen.append(v.status))
    assert ready.status == "ready" and seen == ["scanning", "ready"]
    handler.replies = [(200, {}, VERSION)] * 50
    with pytest.raises(WaitTimeout) as waited:
        portal.wait_version(version, timeout=0.2)
    assert waited.value.last.status == "scanning"
    held = {**VERSION, "scan": {"trust_state": "pending"}}
    handler.replies = [(200, {}, held)]
    assert portal.wait_version(version, timeout=30).held_for_trust


def test_multipart_stream_reads_files_in_chunks(tmp_path: Path) -> None:
    data = tmp_path / "a.csv"
    data.write_bytes(b"x" * (3 * 2**20 + 5))
    stream = MultipartStream({"model": "churn"}, {"file": data})
    parts = list(stream)
    assert sum(len(p) for p in parts) == len(stream) and max(len(p) for p in parts) <= 2**20
    assert stream.content_type.startswith("multipart/form-data; boundary=")
