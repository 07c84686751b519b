"""The portal's side of the model-host service (``service.py``): used instead of a local bubblewrap whenever
``PORTAL_MODEL_HOST_URL`` is set, as in docker compose and Kubernetes, where the portal's own containers may not
create namespaces and the model-host container holds no credential.

The artifact goes to the service as a tar over the connection (the service has no access to the portal's storage);
what comes back is treated exactly like what a local sandbox sends: hostile until checked. A one-shot run's
``/out`` folder comes back as a tar too, and only plain files with plain names are taken from it.
"""

from __future__ import annotations

import json
import socket
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from django.conf import settings

from registry.sandbox import bwrap, service
from registry.sandbox.child import FRAME_HEADER

CONNECT_TIMEOUT_SECONDS = 5.0
PING_CACHE_SECONDS = 10.0
MAX_ANSWER_BYTES = 8 * 1024 * 1024
MAX_OUT_BYTES = 1024 * 1024 * 1024 + 64 * 1024


class RemoteError(Exception):
    """The model-host service could not be reached, or answered something that is not an answer."""


def configured() -> bool:
    return bool(getattr(settings, "PORTAL_MODEL_HOST_URL", ""))


def _connect(timeout: float) -> socket.socket:
    url = settings.PORTAL_MODEL_HOST_URL
    try:
        sock = service.connect(url, min(timeout, CONNECT_TIMEOUT_SECONDS))
    except (OSError, ValueError) as exc:
        raise RemoteError(f"the model-host service at {url} cannot be reached ({exc})") from None
    sock.settimeout(timeout)
    return sock


def _read_answer(sock: socket.socket) -> dict[str, Any]:
    try:
        return service.read_frame(sock, MAX_ANSWER_BYTES)  # stdout's tail, JSON-escaped, may be 6x its bytes
    except (service.BadRequest, EOFError) as exc:
        raise RemoteError(f"the model-host service sent something that is not an answer ({exc})") from None


def _send_request(sock: socket.socket, header: dict[str, Any], mounts: bwrap.Mounts) -> None:
    """The header, then the artifact (``mounts.model``, a file or a folder) as a tar named ``mounts.model_name``."""
    assert mounts.model is not None
    root = Path(settings.VAR_DIR) / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=root) as archive:
        # dereference: what the portal materialised may link to its own blobs; the service gets their content
        with tarfile.open(fileobj=archive, mode="w", dereference=True) as tar:
            tar.add(mounts.model, arcname=mounts.model_name)
        size = archive.tell()
        archive.seek(0)
        body = json.dumps({**header, "model_name": mounts.model_name, "model_bytes": size}).encode()
        try:
            sock.sendall(FRAME_HEADER.pack(len(body)) + body)
            sock.sendfile(archive)
        except OSError as exc:
            raise RemoteError(f"the model-host service stopped taking the artifact ({exc})") from None


def open_host(argv: list[str], mounts: bwrap.Mounts, *, limits: str, timeout: float) -> socket.socket:
    """A connection that now speaks the model-host protocol with a freshly started ``child.py host``; its first
    frame (ready, or why not) is the caller's to read."""
    sock = _connect(timeout)
    try:
        _send_request(sock, {"mode": "host", "argv": argv, "limits": limits}, mounts)
    except BaseException:
        sock.close()
        raise
    return sock


def run(argv: list[str], mounts: bwrap.Mounts, *, limits: str, timeout: int) -> tuple[int | None, bytes, bytes]:
    """One sandboxed run: (exit status, or None when it outlived ``timeout``; stdout tail; stderr tail). Files the
    program wrote to ``/out`` land in ``mounts.out``."""
    sock = _connect(timeout + 30)
    try:
        _send_request(sock, {"mode": "run", "argv": argv, "limits": limits, "timeout": timeout,
                             "out": mounts.out is not None}, mounts)
        answer = _read_answer(sock)
        if not answer.get("ok"):
            raise RemoteError(str(answer.get("error") or "the model-host service refused the run")[:500])
        returncode, out_bytes = answer.get("returncode"), answer.get("out_bytes")
        stdout, stderr = answer.get("stdout"), answer.get("stderr")
        if not (isinstance(returncode, int) and isinstance(out_bytes, int) and 0 <= out_bytes <= MAX_OUT_BYTES
                and isinstance(stdout, str) and isinstance(stderr, str)):
            raise RemoteError("the model-host service sent something that is not an answer")
        if out_bytes:
            if mounts.out is None:
                raise RemoteError("the model-host service sent files nobody asked for")
            _take_out(sock, out_bytes, mounts.out)
    except (OSError, ValueError) as exc:
        raise RemoteError(f"the model-host service failed during the run ({exc})") from None
    finally:
        sock.close()
    return (None if answer.get("timed_out") else returncode), stdout.encode(), stderr.encode()


def _take_out(sock: socket.socket, size: int, into: Path) -> None:
    root = Path(settings.VAR_DIR) / "tmp"
    with tempfile.TemporaryFile(dir=root) as spool:
        left = size
        while left:
            chunk = sock.recv(min(left, 1 << 20))
            if not chunk:
                raise RemoteError("the model-host service closed the connection while sending files")
            spool.write(chunk)
            left -= len(chunk)
        spool.seek(0)
        with tarfile.open(fileobj=spool, mode="r:") as tar:
            for member in tar.getmembers():
                name = member.name
                if not member.isfile() or "/" in name or name in (".", "..") or name.startswith("."):
                    raise RemoteError(f"the model-host service sent an unexpected entry {name!r}")
                source = tar.extractfile(member)
                assert source is not None
                with open(into / name, "wb") as target:
                    while block := source.read(1 << 20):
                        target.write(block)


class RemoteProcess:
    """What ``hosts.ModelHost`` keeps for a host that runs in the service: the host lives as long as its
    connection does, so stopping it is closing the connection (the service then kills it)."""

    pid = 0

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock

    def poll(self) -> int | None:
        return None if self._sock is not None else -1

    def wait(self, timeout: float | None = None) -> int:
        return 0 if self._sock is None else -1

    def close(self) -> None:
        self._sock = None


_ping: tuple[float, str | None] = (0.0, None)
_ping_lock = threading.Lock()


def probe() -> str | None:
    """None when the service answers a ping, else why not; remembered for a few seconds."""
    global _ping
    with _ping_lock:
        checked_at, reason = _ping
        if time.monotonic() - checked_at < PING_CACHE_SECONDS and checked_at:
            return reason
        try:
            sock = _connect(CONNECT_TIMEOUT_SECONDS)
            try:
                service.send_frame(sock, {"mode": "ping"})
                answer = _read_answer(sock)
            finally:
                sock.close()
            reason = None if answer.get("ok") else str(answer.get("error"))[:300]
        except (RemoteError, OSError) as exc:
            reason = str(exc)
        _ping = (time.monotonic(), reason)
        return reason

