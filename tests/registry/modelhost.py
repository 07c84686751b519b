"""The model-host service in a stand-in for its container, for tests: what compose and the Kubernetes manifests give
the ``modelhost`` service (tests/portal/test_compose.py and test_kubernetes.py check those), made here with
bubblewrap so that no Docker daemon is needed:

- a read-only root (the image: the system, Python, the virtualenv and the code);
- no ``var/``, no ``secrets/``, no home folder: an image has none of the portal's files or credentials;
- no network at all (the container's network reaches nothing but the portal's pods; Unix socket here);
- a non-root user, its own pid, IPC and UTS namespaces, a private ``/tmp``, an environment of four variables;
- no user namespaces inside (``--disable-userns``), as under Docker's default seccomp profile: the service falls
  back to ``confine.py`` for each model, which is what it does in a real container.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _hidden(path: Path) -> list[str]:
    return ["--tmpfs", str(path)] if path.is_dir() else []


def start(sock_dir: Path, *, var_dir: Path, log: Path, max_hosts: int = 8) -> subprocess.Popen[bytes]:
    bwrap = shutil.which("bwrap")
    assert bwrap, "bubblewrap is needed to stand in for the model-host container"
    sock = sock_dir / "modelhost.sock"
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONPATH", str(ROOT), "--setenv", "HOME", "/tmp",
            "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    # What lies under /tmp and is part of the image (a CI checkout and its virtualenv), back on top of the private
    # /tmp, read-only; then what the image never holds, hidden.
    for part in {ROOT, Path(sys.prefix).resolve()}:
        if str(part).startswith("/tmp/"):
            args += ["--ro-bind", str(part), str(part)]
    for secret in (var_dir, ROOT / "var", ROOT / "secrets", Path("/root/.ssh"), Path("/etc/ssl/private")):
        args += _hidden(secret)
    args += ["--bind", str(sock_dir), str(sock_dir), "--chdir", "/tmp", "--",
             sys.executable, "-B", "-m", "registry.sandbox.service", "--listen", f"unix:{sock}",
             "--sandbox", "confine", "--max-hosts", str(max_hosts), "--memory-mb", "2048", "--tmp-mb", "256"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the model-host service stopped at start: {log.read_text()[-2000:]}")
        if sock.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(sock))
                return proc
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the model-host service did not listen within 30 s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


@contextlib.contextmanager
def answering(sock_dir: Path) -> Iterator[str]:
    """The service, unconfined, for checks that only ask whether it answers (``check --deploy`` with the compose
    file's or the manifests' settings): yields its ``PORTAL_MODEL_HOST_URL``. Nothing is loaded through it."""
    sock = sock_dir / "modelhost.sock"
    proc = subprocess.Popen([sys.executable, "-m", "registry.sandbox.service", "--listen", f"unix:{sock}",
                             "--work-dir", str(sock_dir / "jobs")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        yield f"unix:{sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
