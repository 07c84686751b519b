"""A cgroup v2 per sandbox, where this machine lets the portal make one (``launch.py`` puts the sandbox in it).

The portal's own cgroup (``/proc/self/cgroup``, the ``0::`` line) on the cgroup2 mount (``/sys/fs/cgroup``, or
``/sys/fs/cgroup/unified`` on a hybrid machine) gets a child ``portal-sandboxes`` holding one cgroup per sandbox.
Whatever controllers can be enabled there are used: ``memory.max`` (and ``memory.swap.max`` 0), ``pids.max``,
``cpu.max``; ``cgroup.kill`` (Linux 5.14) ends the sandbox whole and ``cgroup.procs`` says whether anything of it
is left. Where the hierarchy is missing, read-only, or refuses (a container without a delegated cgroup), sandboxes
run without one: rlimits, the pid namespace and the CPU watchdog still hold, and ``status()`` says what is missing
(logged once, and shown by ``/readyz``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
MOUNTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
PARENT_NAME = "portal-sandboxes"
WANTED = ("memory", "pids", "cpu")
CGROUP2_SUPER_MAGIC = 0x63677270
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Hierarchy:
    parent: Path | None
    controllers: tuple[str, ...]
    why: str  # what is missing, in a sentence ("" when everything is there)


def _is_cgroup2(path: Path) -> bool:
    try:
        return os.path.ismount(path) and (path / "cgroup.procs").exists() and (path / "cgroup.controllers").exists()
    except OSError:
        return False


def _own_cgroup() -> str | None:
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def hierarchy() -> Hierarchy:
    """Where sandbox cgroups go here, and which controllers they get (checked once per process)."""
    mount = next((m for m in MOUNTS if _is_cgroup2(m)), None)
    own = _own_cgroup()
    if mount is None or own is None:
        return Hierarchy(None, (), "no cgroup v2 hierarchy is mounted: sandboxes get no cgroup (rlimits, the pid "
                                   "namespace and the CPU watchdog still apply)")
    parent = mount / own.lstrip("/") / PARENT_NAME
    try:
        parent.mkdir(exist_ok=True)
    except OSError as exc:
        return Hierarchy(None, (), f"the cgroup v2 hierarchy at {mount} is not writable here ({exc.strerror}): "
                                   "sandboxes get no cgroup (rlimits, the pid namespace and the CPU watchdog still "
                                   "apply)")
    if not (parent / "cgroup.kill").exists():
        return Hierarchy(None, (), "this kernel has no cgroup.kill (Linux 5.14): sandboxes get no cgroup")
    for level in (parent.parent, parent):  # enable what the level above offers, top down
        with contextlib.suppress(OSError):
            offered = (level / "cgroup.controllers").read_text().split()
            enable = " ".join(f"+{c}" for c in WANTED if c in offered)
            if enable:
                (level / "cgroup.subtree_control").write_text(enable)
    try:
        enabled = tuple(c for c in WANTED if c in (parent / "cgroup.subtree_control").read_text().split())
    except OSError:
        enabled = ()
    missing = [c for c in WANTED if c not in enabled]
    why = ""
    if missing:
        why = (f"the cgroup v2 hierarchy at {mount} does not delegate the {', '.join(missing)} controller(s) here: "
               f"sandbox cgroups end a sandbox whole (cgroup.kill) but limit only {', '.join(enabled) or 'nothing'} "
               "(rlimits and the CPU watchdog cover the rest)")
    return Hierarchy(parent, enabled, why)


def status() -> str:
    """One line for the log and ``/readyz``: what a sandbox's cgroup does here."""
    found = hierarchy()
    if found.parent is None:
        return f"unavailable: {found.why}"
    if found.why:
        return f"partial: {found.why}"
    return f"ok: a cgroup per sandbox under {found.parent} ({', '.join(found.controllers)}, cgroup.kill)"


@functools.lru_cache(maxsize=1)
def log_status_once() -> None:
    line = status()
    (logger.info if line.startswith("ok") else logger.warning)("Sandbox cgroups: %s", line)


class Group:
    def __init__(self, path: Path) -> None:
        self.path = path

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def cpu_seconds(self) -> float | None:
        try:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
        except (OSError, ValueError):
            pass
        return None

    def kill(self) -> None:
        try:
            (self.path / "cgroup.kill").write_text("1")
        except OSError:
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float) -> bool:
        """Kill what is left and remove the cgroup; True when it was empty and is gone."""
        deadline = time.monotonic() + timeout
        while self.pids():
            self.kill()
            if time.monotonic() > deadline:
                logger.warning("Sandbox cgroup %s still holds processes %s", self.path, self.pids()[:10])
                return False
            time.sleep(0.02)
        with contextlib.suppress(OSError):
            self.path.rmdir()
        return True


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        logger.warning("Could not set %s to %s: %s", path, value, exc.strerror)


def create(name: str, limits: Any) -> Group | None:
    """A fresh cgroup for one sandbox with ``limits`` (``launch.Limits``), or None where there is none to have."""
    found = hierarchy()
    log_status_once()
    if found.parent is None:
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)[:60]
    path = found.parent / f"{safe}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path.mkdir()
    except OSError as exc:
        logger.warning("Could not make a sandbox cgroup under %s: %s", found.parent, exc.strerror)
        return None
    if "memory" in found.controllers:
        _write(path / "memory.max", str(limits.memory))
        if (path / "memory.swap.max").exists():
            _write(path / "memory.swap.max", "0")
    if "pids" in found.controllers:
        _write(path / "pids.max", str(limits.pids))
    if "cpu" in found.controllers and limits.cpu_share > 0:
        _write(path / "cpu.max", f"{int(limits.cpu_share * CPU_PERIOD_US)} {CPU_PERIOD_US}")
    return Group(path)
