"""Run untrusted model files in a bubblewrap sandbox and take back data only (JSON).

Every load of an artifact whose loader can run code (pickle, joblib, cloudpickle, MLflow pyfunc, skops, anything
with a ``code:`` path), and every parse of an uploaded ONNX graph, happens in a process built by ``bwrap.command``:
its own namespaces, uid 65534, the system and Python read-only, only that artifact bound, a private ``/tmp``, no
``var/``, no secrets, no network, no child processes, resource limits. One-shot checks (``run``) go through this
module; serving goes through long-lived hosts (``hosts``). Where bubblewrap cannot run, nothing is loaded: the
check answers why (``bwrap.probe``), start-up warns or fails (``registry.checks``) and ``/readyz`` says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

from registry.sandbox import bwrap, cgroups, launch, remote
from registry.sandbox.bwrap import SandboxUnavailable

__all__ = ["SandboxResult", "SandboxUnavailable", "cgroups_status", "global_importance", "inspect_onnx", "prepare_serving", "run",
           "skops_types", "smoke_test", "unavailable_reason"]

OUTPUT_TAIL_BYTES = 256 * 1024
MAX_FILE_BYTES = 1024 * 1024 * 1024  # the largest file the ONNX conversion may write (a big forest's graph)
MAX_OUTPUT_BYTES = 64 * 1024 * 1024  # any other file, its stdout and stderr included


@dataclass
class SandboxResult:
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    isolated_network: bool = True
    stderr_tail: str = ""


def unavailable_reason() -> str | None:
    """None when artifacts can be loaded in isolation here: by the model-host service where
    ``PORTAL_MODEL_HOST_URL`` names one (containers), else by bubblewrap on this machine."""
    return remote.probe() if remote.configured() else bwrap.probe()


def cgroups_status() -> str | None:
    """Whether local sandboxes get a cgroup here, in a line (``cgroups.status``); None where the model-host service
    runs them (its own log says)."""
    return None if remote.configured() else cgroups.status(settings.PORTAL_MODEL_HOST_NICE)


def _tail(handle: Any) -> bytes:
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - OUTPUT_TAIL_BYTES))
    return handle.read()


def run(argv: list[str], mounts: bwrap.Mounts, *, timeout: int | None = None,
        memory_mb: int | None = None) -> SandboxResult:
    """Run ``child.py`` once in the sandbox. Raises ``SandboxUnavailable`` where no sandbox can start: the caller
    must then leave the artifact unloaded, never load it some other way."""
    reason = unavailable_reason()
    if reason:
        raise SandboxUnavailable(reason)
    timeout = timeout or settings.PORTAL_SANDBOX_TIMEOUT_SECONDS
    memory = (memory_mb or settings.PORTAL_SANDBOX_MEMORY_MB) * 1024 * 1024
    file_size = MAX_FILE_BYTES if mounts.out is not None else MAX_OUTPUT_BYTES
    limits = f"{memory},{timeout},{file_size},256"
    if remote.configured():
        try:
            returncode, stdout, stderr = remote.run(argv, mounts, limits=limits, timeout=timeout)
        except remote.RemoteError as exc:
            return SandboxResult(False, error=str(exc))
    else:
        outcome = _run_local(argv, mounts, limits=limits, timeout=timeout)
        if isinstance(outcome, SandboxResult):
            return outcome
        returncode, stdout, stderr = outcome
    if returncode is None:
        return SandboxResult(False, error=f"loading the model took longer than {timeout} s")
    stderr_tail = stderr.decode("utf-8", "replace")[-2000:]
    lines = [line for line in stdout.decode("utf-8", "replace").splitlines() if line.strip()]
    if returncode != 0 or not lines:
        why = f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        return SandboxResult(False, error=f"the sandboxed load crashed ({why})", stderr_tail=stderr_tail)
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError:
        return SandboxResult(False, error="the sandbox answered something that is not a report",
                             stderr_tail=stderr_tail)
    if not isinstance(data, dict):
        return SandboxResult(False, error="the sandbox answered something that is not a report",
                             stderr_tail=stderr_tail)
    return SandboxResult(bool(data.get("ok")), data=data, error=str(data.get("error") or "")[:2000],
                         stderr_tail=stderr_tail)


def _run_local(argv: list[str], mounts: bwrap.Mounts, *, limits: str,
               timeout: int) -> SandboxResult | tuple[int | None, bytes, bytes]:
    """bubblewrap on this machine: (exit status, or None past ``timeout``; stdout tail; stderr tail). The limits are
    set on the command that starts bubblewrap, so every process of the sandbox has them from its first instruction;
    the sandbox is killed whole (its init, hence its pid namespace, and its cgroup) however it ends."""
    tmp_root = Path(settings.VAR_DIR) / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    # Output goes to files, not pipes: a model that prints gigabytes fills at most RLIMIT_FSIZE of disk, and only
    # the tail is read back.
    stage = bwrap.stage(mounts)  # what the sandbox binds, from a folder that names nothing of the portal
    with contextlib.closing(stage), tempfile.TemporaryFile(dir=tmp_root) as out, \
            tempfile.TemporaryFile(dir=tmp_root) as err:
        try:
            with bwrap.prepared(["--limits", limits, *argv], stage.mounts, tmp_mb=settings.PORTAL_SANDBOX_TMP_MB) as (
                    command, fds):
                proc = launch.start(command, launch.Limits.parse(limits),
                                    name=argv[0] if argv else "run", bubblewrap=True, pass_fds=fds,
                                    env=bwrap.environment(), cwd="/", stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        except OSError as exc:
            return SandboxResult(False, error=f"the sandbox could not start ({exc.strerror or exc})")
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return None, b"", b""
        returncode = proc.returncode
        proc.kill()  # whatever of it may be left (nothing, unless a process outlived the init)
        assert returncode is not None
        return returncode, _tail(out), _tail(err)


def _model(path: Path) -> bwrap.Mounts:
    return bwrap.Mounts(model=path, model_name=path.name)


def _checked_at_upload(mode: str, path: Path) -> SandboxResult:
    """The checks an upload waits for: without a sandbox they fail, saying why, and the upload is refused."""
    mounts = _model(path)
    try:
        return run([mode, mounts.inside_model()], mounts, timeout=60, memory_mb=2048)
    except SandboxUnavailable as exc:
        return SandboxResult(False, error=f"the model sandbox is unavailable on this server: {exc}")


def inspect_onnx(path: Path) -> SandboxResult:
    return _checked_at_upload("inspect-onnx", path)


def skops_types(path: Path) -> SandboxResult:
    return _checked_at_upload("skops-types", path)


def prepare_serving(fmt: str, path: Path, options: dict[str, Any], *, out: Path) -> SandboxResult:
    """Convert to ONNX where that predicts like the model; the sandbox writes ``serving.onnx`` into ``out`` (an
    empty folder, the only place it may write outside its ``/tmp``)."""
    mounts = _model(path)
    mounts.out = out
    return run(["prepare-serving", fmt, mounts.inside_model(),
                json.dumps({**options, "output": f"{bwrap.INSIDE_OUT}/serving.onnx"})], mounts)


def smoke_test(fmt: str, path: Path, options: dict[str, Any]) -> SandboxResult:
    mounts = _model(path)
    return run(["smoke", fmt, mounts.inside_model(), json.dumps(options)], mounts)


def global_importance(fmt: str, path: Path, options: dict[str, Any], *, budget_seconds: int) -> SandboxResult:
    """SHAP global importance of a version, computed where its loader may run code: the sandbox. ``path`` is a
    folder holding the model (``model.FORMAT``, or an MLflow model folder) and the reference rows as ``.npy``
    (``options["reference"]``); the sandbox's wall clock allows the budget plus the load."""
    mounts = _model(path)
    return run(["importance", fmt, mounts.inside_model(), json.dumps({**options, "budget_seconds": budget_seconds})],
               mounts, timeout=budget_seconds + settings.PORTAL_SANDBOX_TIMEOUT_SECONDS)
