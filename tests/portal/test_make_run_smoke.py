"""`make run` in its embedded mode (SQLite + filesystem broker under a fresh var/): it starts, serves, runs tasks
on a real worker, a second process with no variables creates a token that works on it, and Ctrl-C stops every
process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import clean_env, free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - our own loopback server
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,ppid="], capture_output=True, text=True).stdout.split("\n")
    rows = [tuple(map(int, line.split())) for line in out if line.strip()]
    found, frontier = set(), {pid}
    while frontier:
        children = {p for p, _g, pp in rows if pp in frontier and p not in found}
        found |= children
        frontier = children
    return sorted(found)


def test_make_run_serves_runs_tasks_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    var = tmp_path / "var"
    log = open(tmp_path / "run.log", "w")
    env = clean_env(PORT=str(port), PORTAL_VAR_DIR=str(var), PORTAL_WEB_WORKERS="1", PORTAL_WORKER_CONCURRENCY="1")
    proc = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            try:
                if _get(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("make run did not answer /healthz within 240 s")
        status, body = _get(base + "/login/")
        assert status == 200 and "Sign in" in body

        # The README's second terminal: no variable at all but where var/ is (README: `manage.py create_token ds`).
        assert (var / "demo.env").stat().st_mode & 0o777 == 0o600
        second = subprocess.run([sys.executable, "manage.py", "create_token", "ds"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, env=clean_env(PORTAL_VAR_DIR=str(var)))
        assert second.returncode == 0, second.stderr
        token = second.stdout.strip().splitlines()[-1]
        me = urllib.request.Request(base + "/api/v1/me", headers={"Authorization": f"Bearer {token}"})  # noqa: S310
        with urllib.request.urlopen(me, timeout=5) as response:  # noqa: S310 - our own loopback server
            assert json.loads(response.read())["username"] == "ds", "the token works on the running demo"
        cli = subprocess.run([sys.executable, "-c", "from portal.cli import build_parser; "
                              "print(build_parser().parse_args(['predict', 'm', 'dev', 'f.json']).url)"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env=clean_env(PORTAL_VAR_DIR=str(var)))
        assert cli.stdout.strip() == base, "the portal command finds the demo's address"
        # Production-style error pages in the demo: no route list, no settings.
        status, body = _get(base + "/no-such-page")
        assert status == 404 and "There is nothing at this address" in body and "URLconf" not in body
        assert _get(base + "/readyz")[0] == 200
        assert (var / "portal.sqlite3").exists() and (var / "celery" / "queue").is_dir()

        # A task sent through the filesystem broker is run by make run's own worker.
        send = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c",
             "from portal.tasks import audit_chain_verify_task as t; "
             "t.delay(request_ctx={'request_id': 'smoke-test-000001'})"],
            cwd=ROOT, env={**env, "PORTAL_DEBUG": "1"}, capture_output=True, text=True, timeout=60)
        assert send.returncode == 0, send.stderr
        db = sqlite3.connect(var / "portal.sqlite3")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = db.execute("SELECT action FROM portal_auditevent WHERE request_id = 'smoke-test-000001'").fetchone()
            if row:
                break
            time.sleep(0.5)
        db.close()
        assert row == ("audit.verify",), "the embedded worker did not run the task"
        assert "demo-pass-123" in (tmp_path / "run.log").read_text(), "the demo logins are printed"
    finally:
        children = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("make run did not stop within 40 s of Ctrl-C")
        time.sleep(0.5)
        alive = [p for p in children if Path(f"/proc/{p}").exists()
                 and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()]
        assert not alive, f"processes left running after Ctrl-C: {alive}"
        log.close()
