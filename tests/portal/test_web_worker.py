"""The web server's worker class (portal/webworker.py): gunicorn's threaded worker whose threads answer a kept-alive
connection's next request themselves when it comes at once. Run for real: gunicorn with that worker, a WSGI app
that says which thread answered, clients over real sockets."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow

APP = textwrap.dedent('''
    import threading, time

    def application(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            time.sleep(1.0)
        body = f"{environ['PATH_INFO']} {threading.get_ident()}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
''')


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "wsgi_probe.py").write_text(APP)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "wsgi_probe:application", "--bind", f"127.0.0.1:{port}",
                             "--workers", "1", "--worker-class", "portal.webworker.LingeringThreadWorker",
                             "--threads", "4", "--log-level", "warning"],
                            cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[2]}",
                                               "PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def _get(conn: http.client.HTTPConnection, path: str) -> str:
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200
    return response.read().decode()


def test_a_kept_alive_connection_is_answered_in_order_whatever_its_pace(server: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    # back to back: the thread that answered lingers and answers the next ones itself
    answers = [_get(conn, f"/r{i}") for i in range(200)]
    assert [a.split()[0] for a in answers] == [f"/r{i}" for i in range(200)]
    assert len({a.split()[1] for a in answers}) <= 4
    # a pause longer than the linger: the socket goes back to the poller, and the next request is still answered
    time.sleep(0.05)
    assert _get(conn, "/after-pause").startswith("/after-pause ")
    conn.close()


def test_a_slow_request_holds_one_thread_while_other_connections_are_answered(server: int) -> None:
    slow = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    slow.request("GET", "/slow")
    time.sleep(0.1)
    started = time.monotonic()
    fast = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    for i in range(50):
        assert _get(fast, f"/f{i}").startswith(f"/f{i} ")
    assert time.monotonic() - started < 0.9  # answered while /slow still holds its thread
    assert slow.getresponse().read().decode().startswith("/slow ")
    fast.close()
    slow.close()


def test_a_client_that_closes_after_its_request_costs_nothing(server: int) -> None:
    for i in range(20):
        conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
        assert _get(conn, f"/c{i}").startswith(f"/c{i} ")
        conn.close()  # the lingering thread sees EOF and lets the connection go
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    assert _get(conn, "/still-serving").startswith("/still-serving ")
