"""Run untrusted model files in a separate, locked-down process and take back data only (JSON).

The child gets a scrubbed environment (no secrets, no database or broker URLs), a private working folder, a new
network namespace where the system allows it (``unshare --net``), resource limits (address space, CPU time, file
size, open files, no core dumps) and a wall-clock timeout. The web and worker processes never unpickle or load a
model themselves.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

CHILD = Path(__file__).with_name("child.py")


@dataclass
class SandboxResult:
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    isolated_network: bool = False
    stderr_tail: str = ""


@functools.lru_cache(maxsize=1)
def network_isolation_available() -> bool:
    unshare = shutil.which("unshare")
    if not unshare:
        return False
    try:
        return subprocess.run([unshare, "--net", "--", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _limits(memory_bytes: int, cpu_seconds: int) -> None:
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024 * 1024, 512 * 1024 * 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(args: list[str], *, timeout: int | None = None, memory_mb: int | None = None) -> SandboxResult:
    timeout = timeout or settings.PORTAL_SANDBOX_TIMEOUT_SECONDS
    memory = (memory_mb or settings.PORTAL_SANDBOX_MEMORY_MB) * 1024 * 1024
    isolated = network_isolation_available()
    with tempfile.TemporaryDirectory(prefix="sandbox-", dir=settings.VAR_DIR / "tmp") as home:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": home,
            "LANG": "C.UTF-8",
            "MLFLOW_DISABLE_TELEMETRY": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": f"file://{home}/mlruns",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        command = [sys.executable, "-I", str(CHILD), *args]
        if isolated:
            command = [shutil.which("unshare") or "unshare", "--net", "--", *command]
        try:
            proc = subprocess.Popen(command, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    preexec_fn=functools.partial(_limits, memory, timeout))
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                return SandboxResult(False, error=f"loading the model took longer than {timeout} s",
                                     isolated_network=isolated)
        except OSError as exc:
            return SandboxResult(False, error=f"the sandbox could not start ({exc.strerror})", isolated_network=isolated)
    stderr_tail = err.decode("utf-8", "replace")[-2000:]
    lines = [line for line in out.decode("utf-8", "replace").splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        return SandboxResult(False, error=f"the sandboxed load crashed ({why})", isolated_network=isolated,
                             stderr_tail=stderr_tail)
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError:
        return SandboxResult(False, error="the sandbox answered something that is not a report",
                             isolated_network=isolated, stderr_tail=stderr_tail)
    return SandboxResult(bool(data.get("ok")), data=data, error=str(data.get("error") or ""),
                         isolated_network=isolated, stderr_tail=stderr_tail)


def inspect_onnx(path: Path) -> SandboxResult:
    return run(["inspect-onnx", str(path)], timeout=60, memory_mb=2048)


def skops_types(path: Path) -> SandboxResult:
    return run(["skops-types", str(path)], timeout=60, memory_mb=2048)


def prepare_serving(fmt: str, path: Path, options: dict[str, Any]) -> SandboxResult:
    return run(["prepare-serving", fmt, str(path), json.dumps(options)])


def smoke_test(fmt: str, path: Path, options: dict[str, Any]) -> SandboxResult:
    return run(["smoke", fmt, str(path), json.dumps(options)])
