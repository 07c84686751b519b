"""A cgroup v2 per sandbox, where this machine lets the portal make one (``launch.py`` puts the sandbox in it).

The portal's own cgroup (``/proc/self/cgroup``, the ``0::`` line) on the cgroup2 mount (``/sys/fs/cgroup``, or
``/sys/fs/cgroup/unified`` on a hybrid machine) gets a child ``portal-sandboxes`` holding one cgroup per sandbox.
Whatever controllers can be enabled there are used: ``memory.max`` (and ``memory.swap.max`` 0), ``pids.max``,
``cpu.max``; ``cgroup.kill`` (Linux 5.14) ends the sandbox whole and ``cgroup.procs`` says whether anything of it
is left. Where the hierarchy is missing, read-only, or refuses (a container without a delegated cgroup), sandboxes
run without one: rlimits, the pid namespace and the CPU watchdog still hold, and ``status()`` says what is missing
(logged once, and shown by ``/readyz``).

A machine that keeps its controllers on cgroup v1 (a hybrid layout: the unified hierarchy has none) may still let
the portal write its v1 ``cpu`` hierarchy: there each sandbox also gets a v1 cpu cgroup, under a parent
``portal-sandboxes-nice{N}`` (one per niceness) whose ``cpu.shares`` is the CFS weight of ``PORTAL_MODEL_HOST_NICE`` (nice 19: 15, against 1024 for
the portal's own processes), with ``cpu.cfs_quota_us`` for the host's CPU share. This is what holds a spinning
model to the CPU the portal leaves idle: a task in a cpu cgroup is outside the kernel's autogroups, whose nice value
a sandboxed process may raise back to 0 itself (``/proc/self/autogroup``), and nothing inside can leave the cgroup.
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
# The kernel's CFS weight of each nice value (kernel/sched/core.c, sched_prio_to_weight), from nice 0 to 19.
NICE_WEIGHT = (1024, 820, 655, 526, 423, 335, 272, 215, 172, 137, 110, 87, 70, 56, 45, 36, 29, 23, 18, 15)


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


def _v1_cpu_mount() -> tuple[Path, str] | None:
    """The v1 ``cpu`` controller's mount and this process's cgroup in it, or None (no v1 cpu hierarchy here)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            mounts = [line.split() for line in fh]
        with open("/proc/self/cgroup", encoding="utf-8") as fh:
            own = {c: line.split(":", 2)[2].strip() for line in fh if line.count(":") >= 2
                   for c in line.split(":", 2)[1].split(",")}
    except OSError:
        return None
    for fields in mounts:
        if "-" not in fields:
            continue
        tail = fields[fields.index("-") + 1:]
        if len(tail) >= 3 and tail[0] == "cgroup" and "cpu" in tail[2].split(",") and fields[3] == "/" and "cpu" in own:
            return Path(fields[4]), own["cpu"]
    return None


@functools.lru_cache(maxsize=4)
def v1_cpu_parent(nice: int) -> tuple[Path | None, str]:
    """Where sandboxes' v1 cpu cgroups go here (a parent weighted as ``nice``), or None and why not."""
    found = _v1_cpu_mount()
    if found is None:
        return None, "no cgroup v1 cpu hierarchy is mounted"
    mount, own = found
    # One parent per niceness: processes (or tests) that start sandboxes at different values must not re-weigh
    # each other's sandboxes by rewriting a shared parent's cpu.shares.
    parent = mount / own.lstrip("/") / f"{PARENT_NAME}-nice{nice}"
    try:
        parent.mkdir(exist_ok=True)
        (parent / "cpu.shares").write_text(str(NICE_WEIGHT[nice]))
    except OSError as exc:
        return None, f"the cgroup v1 cpu hierarchy at {mount} is not writable here ({exc.strerror})"
    return parent, ""


def status(nice: int = 0) -> str:
    """One line for the log and ``/readyz``: what a sandbox's cgroup does here (sandboxes at ``nice``)."""
    found = hierarchy()
    v1 = ""
    if "cpu" not in found.controllers and nice:
        parent, _ = v1_cpu_parent(nice)
        if parent is not None:
            v1 = (f"; CPU from a cgroup v1 cpu cgroup per sandbox under {parent} "
                  f"(cpu.shares {NICE_WEIGHT[nice]} for all, cpu.cfs_quota_us each)")
    if found.parent is None:
        return f"unavailable: {found.why}{v1}"
    if found.why:
        return f"partial: {found.why}{v1}"
    return f"ok: a cgroup per sandbox under {found.parent} ({', '.join(found.controllers)}, cgroup.kill)"


@functools.lru_cache(maxsize=1)
def log_status_once(nice: int = 0) -> None:
    line = status(nice)
    (logger.info if line.startswith("ok") else logger.warning)("Sandbox cgroups: %s", line)


class Group:
    """One sandbox's cgroups: the v2 one (``path``) and/or a v1 cpu one (``cpu_v1``); at least one of them."""

    def __init__(self, path: Path | None, cpu_v1: Path | None = None) -> None:
        self.path = path
        self.cpu_v1 = cpu_v1

    @property
    def paths(self) -> list[Path]:
        """The cgroups the sandbox's first process enters (it writes itself into each ``cgroup.procs``)."""
        return [p for p in (self.path, self.cpu_v1) if p is not None]

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self.paths:
            try:
                found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
        return sorted(found)

    def cpu_seconds(self) -> float | None:
        if self.path is None:
            return None
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
            if self.path is None:
                raise FileNotFoundError
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
        for path in self.paths:
            with contextlib.suppress(OSError):
                path.rmdir()
        return True


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        logger.warning("Could not set %s to %s: %s", path, value, exc.strerror)


def create(name: str, limits: Any) -> Group | None:
    """A fresh cgroup for one sandbox with ``limits`` (``launch.Limits``), or None where there is none to have."""
    found = hierarchy()
    log_status_once(limits.nice)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)[:60]
    leaf = f"{safe}-{os.getpid()}-{secrets.token_hex(4)}"
    cpu_v1 = None
    if "cpu" not in found.controllers and limits.nice:
        parent_v1, _ = v1_cpu_parent(limits.nice)
        if parent_v1 is not None:
            cpu_v1 = parent_v1 / leaf
            try:
                cpu_v1.mkdir()
            except OSError as exc:
                logger.warning("Could not make a sandbox cpu cgroup under %s: %s", parent_v1, exc.strerror)
                cpu_v1 = None
            else:
                if limits.cpu_share > 0:
                    _write(cpu_v1 / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                    _write(cpu_v1 / "cpu.cfs_quota_us", str(int(limits.cpu_share * CPU_PERIOD_US)))
    if found.parent is None:
        return Group(None, cpu_v1) if cpu_v1 is not None else None
    path = found.parent / leaf
    try:
        path.mkdir()
    except OSError as exc:
        logger.warning("Could not make a sandbox cgroup under %s: %s", found.parent, exc.strerror)
        return Group(None, cpu_v1) if cpu_v1 is not None else None
    if "memory" in found.controllers:
        _write(path / "memory.max", str(limits.memory))
        if (path / "memory.swap.max").exists():
            _write(path / "memory.swap.max", "0")
    if "pids" in found.controllers:
        _write(path / "pids.max", str(limits.pids))
    if "cpu" in found.controllers and limits.cpu_share > 0:
        _write(path / "cpu.max", f"{int(limits.cpu_share * CPU_PERIOD_US)} {CPU_PERIOD_US}")
    return Group(path, cpu_v1)
