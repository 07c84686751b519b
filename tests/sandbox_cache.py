"""One real sandbox run per artifact and question, within a test run.

Most tests upload the same few artifacts (the ``churn`` logistic regressions, above all) and wait, each time, for the
same sandboxed smoke test and ONNX preparation: four real sandbox processes, about four seconds, before the test
starts testing what it is about. Here ``registry.sandbox.run`` remembers each successful answer by what decides it:
the arguments, the artifact's content (SHA-256 of the file, or of every file of a folder with its relative path and
mode), the limits, the settings the sandbox reads and whether a sandbox is available at all. The first run of each is
real; a repeat answers the same report, and writes the same files into its ``/out`` folder.

Never cached, so always real:
- a test marked ``real_sandbox`` (the sandbox's own tests, the hostile uploads, the scanner's gadgets);
- a call made while a test has replaced any part of the sandbox (``run``'s local or remote runner, the bubblewrap
  command or probe, the model-host client), which that test is then exercising;
- a failed answer (a crash, a timeout, a refusal: those are what the security tests look at);
- anything in another process (Celery workers, the model-host service): they run the real sandbox every time.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

from django.conf import settings

from registry import sandbox
from registry.sandbox import bwrap, remote
from registry.storage import sha256_of_file

MAX_KEPT_OUT_BYTES = 64 * 1024 * 1024

_answers: dict[str, tuple[sandbox.SandboxResult, dict[str, bytes]]] = {}
_stats = {"real": 0, "cached": 0}
_real_run = sandbox.run
# The parts a test may replace to exercise the sandbox; a call made while one is replaced runs for real.
_PARTS: tuple[tuple[Any, str], ...] = ((sandbox, "_run_local"), (sandbox, "unavailable_reason"), (remote, "run"),
                                       (remote, "configured"), (remote, "probe"), (bwrap, "command"),
                                       (bwrap, "probe"), (bwrap, "environment"), (bwrap, "seccomp_file"))
_originals = tuple(getattr(owner, name) for owner, name in _PARTS)


def _untouched() -> bool:
    return all(getattr(owner, name) is original for (owner, name), original in zip(_PARTS, _originals, strict=True))


def _digest(path: Path | None) -> str:
    if path is None:
        return "-"
    if path.is_dir():
        h = hashlib.sha256()
        for item in sorted(path.rglob("*")):
            rel = item.relative_to(path).as_posix()
            if item.is_symlink():
                h.update(f"L {rel} -> {os.readlink(item)}\0".encode())
            elif item.is_file():
                h.update(f"F {rel} {item.stat().st_mode & 0o777:o} {sha256_of_file(item)[0]}\0".encode())
            else:
                h.update(f"D {rel}\0".encode())
        return h.hexdigest()
    return sha256_of_file(path)[0] if path.exists() else "missing"


def _key(argv: list[str], mounts: bwrap.Mounts, timeout: int | None, memory_mb: int | None) -> str:
    parts = [repr(argv), mounts.model_name, _digest(mounts.model), "out" if mounts.out is not None else "no-out",
             repr(sorted((inside, _digest(path)) for path, inside in mounts.extra_ro)), repr((timeout, memory_mb)),
             repr(sorted((k, repr(getattr(settings, k))) for k in dir(settings) if k.startswith("PORTAL_SANDBOX")
                         or k == "PORTAL_MODEL_HOST_URL")),
             repr(sandbox.unavailable_reason())]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _out_files(out: Path) -> dict[str, bytes] | None:
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return files if sum(len(v) for v in files.values()) <= MAX_KEPT_OUT_BYTES else None


def run(argv: list[str], mounts: bwrap.Mounts, *, timeout: int | None = None,
        memory_mb: int | None = None) -> sandbox.SandboxResult:
    if not _untouched():
        return _real_run(argv, mounts, timeout=timeout, memory_mb=memory_mb)
    key = _key(argv, mounts, timeout, memory_mb)
    hit = _answers.get(key)
    if hit is not None:
        result, written = hit
        if mounts.out is not None:
            for rel, content in written.items():
                target = mounts.out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
        _stats["cached"] += 1
        return copy.deepcopy(result)
    _stats["real"] += 1
    result = _real_run(argv, mounts, timeout=timeout, memory_mb=memory_mb)
    if result.ok:
        written = _out_files(mounts.out) if mounts.out is not None else {}
        if written is not None:
            _answers[key] = (copy.deepcopy(result), written)
    return result


def install(monkeypatch: Any) -> None:
    monkeypatch.setattr(sandbox, "run", run)


def stats() -> dict[str, int]:
    return dict(_stats)


def clear() -> None:
    _answers.clear()

