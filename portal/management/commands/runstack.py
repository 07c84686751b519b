"""Run the whole portal in the foreground: web (gunicorn), a Celery worker and Celery beat.

``make run`` ends here. Ctrl-C (SIGINT) or SIGTERM stops every process cleanly; if any one of them dies, the
others are stopped too and the command exits non-zero, so a half-running portal never lingers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from portal.env import env_int, env_str
from portal.management.commands.seed_demo import DEMO_USERS
from portal.webserver import web_command

STOP_GRACE_SECONDS = 15


class Command(BaseCommand):
    help = "Run web, worker and beat together in the foreground; Ctrl-C stops them all."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=None, help="Default: $PORT or 8000.")
        parser.add_argument("--host", default=None, help="Default: $PORTAL_BIND_HOST or 127.0.0.1.")

    def handle(self, *args: Any, port: int | None, host: str | None, **options: Any) -> None:
        port = port or env_int("PORT", 8000, minimum=1, maximum=65535)
        host = host or env_str("PORTAL_BIND_HOST", "127.0.0.1")
        concurrency = env_int("PORTAL_WORKER_CONCURRENCY", 2, minimum=1, maximum=64)
        py = sys.executable
        commands = {
            "web": web_command(py, f"{host}:{port}"),
            "worker": [py, "-m", "celery", "-A", "config", "worker", "--loglevel", "INFO",
                       "--concurrency", str(concurrency), "--hostname", f"worker-{os.getpid()}@%h"],
            "beat": [py, "-m", "celery", "-A", "config", "beat", "--loglevel", "INFO"],
        }
        processes: dict[str, subprocess.Popen[bytes]] = {}
        stopping = False

        def request_stop(signum: int, _frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

        # Each child gets its own session so that the terminal's Ctrl-C reaches only us; we then stop them in order.
        for name, cmd in commands.items():
            processes[name] = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104 - only to print a reachable URL
        announced = False
        exit_code = 0
        try:
            while not stopping:
                for name, proc in processes.items():
                    if proc.poll() is not None:
                        self.stderr.write(f"{name} exited with status {proc.returncode}; stopping the rest.")
                        exit_code = 1
                        stopping = True
                        break
                if not announced and not stopping and _is_up(url + "/healthz"):
                    announced = True
                    self._announce(url)
                time.sleep(0.3)
        finally:
            self.stdout.write("Stopping web, worker and beat…")
            _stop_all(processes)
        if exit_code:
            sys.exit(exit_code)
        self.stdout.write("Stopped.")

    def _announce(self, url: str) -> None:
        lines = [
            "",
            f"  MLOps portal is running at {url}",
            f"  API docs: {url}/api/docs/",
        ]
        if settings.PORTAL_DEBUG:
            lines.append(f"  Demo sign-ins (password: {settings.PORTAL_DEMO_PASSWORD}):")
            lines.extend(f"    {username:<11} {role}" for username, role, _ in DEMO_USERS)
        lines += ["  Ctrl-C stops web, worker and beat.", ""]
        self.stdout.write("\n".join(lines))
        self.stdout.flush()


def _is_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - our own http address
            return bool(response.status == 200)
    except OSError:
        return False


def _stop_all(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    # SIGTERM to each main process only: gunicorn's arbiter and Celery's main process then stop their own children
    # gracefully (a worker finishes its current task). Whatever is left after the grace period is killed, group-wide.
    for proc in processes.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for proc in processes.values():
        remaining = max(0.1, deadline - time.monotonic())
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
