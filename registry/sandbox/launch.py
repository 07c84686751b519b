"""Starting a sandboxed program with its limits and lifetime owned from outside the sandbox.

Everything a sandboxed program is allowed to consume is fixed *before* bubblewrap (or ``confine.py``) runs, so that
every process of the sandbox inherits it, the sandbox's init included, and nothing inside can raise it again:

- resource limits (``prlimit`` around the whole command; ``preexec_fn`` only where util-linux is missing): address
  space and data segment, CPU seconds (one-shot runs), file size, open files, no core dumps;
- where a cgroup v2 hierarchy is writable here, a cgroup per sandbox that the command enters before it starts
  (``cgroups.py``): ``memory.max`` with no swap, ``pids.max``, ``cpu.max``, and ``cgroup.kill`` to end it whole;
- a lower scheduling priority (``Limits.nice``; model hosts: ``PORTAL_MODEL_HOST_NICE``), so that a model spinning
  takes CPU from the portal's web and worker processes only when they leave it idle, wherever the machine gives no
  cpu controller to the portal. Two levels, because the kernel's autogroup (``kernel.sched_autogroup_enabled``,
  on by default) schedules each session as one group and nice values count only inside their group: ``nice`` in
  front of the command (every process of the sandbox inherits it, and RLIMIT_NICE 0 with no capability means none
  can raise it again), and, since bubblewrap's ``--new-session`` starts a session (an autogroup) of its own, the
  nice value of that autogroup, written from outside to ``/proc/INIT/autogroup`` once bubblewrap names its init.
  The init cannot start another session (it leads its own, and the filter refuses ``fork``).

Its lifetime: bubblewrap runs the program as the pid namespace's init (``--as-pid-1``: there is no bubblewrap init
inside for a model to take over) and reports that init's pid on ``--info-fd``; it is held here as a pidfd. Stopping a
sandbox kills that init from outside, which makes the kernel kill every process of the namespace, whatever they did
to their session, parent-death signal or process group; then the cgroup (``cgroup.kill``) and bubblewrap itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from registry.sandbox import cgroups

logger = logging.getLogger(__name__)
INFO_TIMEOUT_SECONDS = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Limits:
    """What one sandbox may use. ``cpu_seconds`` 0: no RLIMIT_CPU (long-lived hosts, whose CPU is watched instead);
    ``cpu_share`` is the cgroup's ``cpu.max`` in CPUs (0: none); ``pids`` the cgroup's ``pids.max``; ``nice`` the
    scheduling niceness of every process of the sandbox and of its autogroup (0: the launcher's own)."""

    memory: int
    cpu_seconds: int = 0
    file_size: int = 64 * 1024 * 1024
    files: int = 256
    pids: int = 64
    cpu_share: float = 1.0
    nice: int = 0

    def spec(self) -> str:
        """The ``AS,CPU,FSIZE,NOFILE`` form ``child.py --limits`` and the model-host service take."""
        return f"{self.memory},{self.cpu_seconds},{self.file_size},{self.files}"

    @classmethod
    def parse(cls, spec: str, **extra: Any) -> Limits:
        memory, cpu, fsize, files = (int(x) for x in spec.split(","))
        return cls(memory=memory, cpu_seconds=cpu, file_size=fsize, files=files, **extra)

    def rlimits(self) -> list[tuple[int, int, int]]:
        """(resource, soft, hard): set on the launcher, inherited by bubblewrap and everything it starts."""
        out = [(resource.RLIMIT_AS, self.memory, self.memory), (resource.RLIMIT_DATA, self.memory, self.memory),
               (resource.RLIMIT_FSIZE, self.file_size, self.file_size), (resource.RLIMIT_NOFILE, self.files, self.files),
               (resource.RLIMIT_CORE, 0, 0)]
        if self.cpu_seconds:  # SIGXCPU at the soft limit; SIGKILL at the hard one (the only one a pid 1 cannot ignore)
            out.append((resource.RLIMIT_CPU, self.cpu_seconds, self.cpu_seconds + 1))
        if self.nice:  # no raising the priority back (the ceiling is 20 - RLIMIT_NICE: none above nice 20)
            out.append((resource.RLIMIT_NICE, 0, 0))
        return out


_PRLIMIT_NAMES = {resource.RLIMIT_AS: "as", resource.RLIMIT_DATA: "data", resource.RLIMIT_FSIZE: "fsize",
                  resource.RLIMIT_NOFILE: "nofile", resource.RLIMIT_CORE: "core", resource.RLIMIT_CPU: "cpu",
                  resource.RLIMIT_NICE: "nice"}


def _wrapped(argv: list[str], limits: Limits, group: cgroups.Group | None) -> tuple[list[str], Any]:
    """The command with its limits in front (and its cgroup entered before anything else runs), and the
    ``preexec_fn`` to use where ``prlimit`` is missing."""
    preexec = None
    prlimit, nice = shutil.which("prlimit"), shutil.which("nice")
    if prlimit and (nice or not limits.nice):
        argv = [prlimit, *(f"--{_PRLIMIT_NAMES[r]}={soft}:{hard}" for r, soft, hard in limits.rlimits()), "--", *argv]
        if limits.nice and nice:  # nice before prlimit: lowering the priority needs no RLIMIT_NICE
            argv = [nice, "-n", str(limits.nice), *argv]
    else:
        rlimits, niceness = limits.rlimits(), limits.nice

        def preexec() -> None:  # only system calls: nothing that could wait on a lock another thread held at fork
            if niceness:
                os.setpriority(os.PRIO_PROCESS, 0, niceness)
            for which, soft, hard in rlimits:
                resource.setrlimit(which, (soft, hard))
    if group is not None:
        # The shell writes its own pid into each cgroup and then becomes the command: it is inside before
        # bubblewrap forks anything, so every process of the sandbox is born there.
        argv = ["/bin/sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; done; '
                'shift; exec "$@"', "sandbox-cgroup", *(str(p) for p in group.paths), "--", *argv]
    return argv, preexec


class SandboxProcess:
    """A started sandbox: the launcher's ``Popen``, the namespace's init as a pidfd, the cgroup if any."""

    def __init__(self, proc: subprocess.Popen[bytes], group: cgroups.Group | None, nice: int = 0) -> None:
        self.proc = proc
        self.group = group
        self.nice = nice
        self.init_pid = 0
        self.pidfd = -1
        self.pid_namespace = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def _take_info(self, read_fd: int) -> None:
        """bubblewrap's ``--info-fd`` answer: the pid of the sandbox's init (our program) in this namespace."""
        deadline = time.monotonic() + INFO_TIMEOUT_SECONDS
        data = b""
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                if not _readable(read_fd, deadline - time.monotonic()):
                    break
                chunk = os.read(read_fd, 4096)
                if not chunk:
                    break
                data += chunk
        os.close(read_fd)
        try:
            pid = int(json.loads(data or b"{}").get("child-pid") or 0)
        except (ValueError, AttributeError):
            pid = 0
        if pid <= 0:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # already gone: nothing of it left to kill
        if _parent_of(pid) != self.proc.pid:  # not bubblewrap's child (it died and the number was reused)
            os.close(pidfd)
            return
        self.init_pid, self.pidfd = pid, pidfd
        with contextlib.suppress(OSError):
            self.pid_namespace = os.readlink(f"/proc/{pid}/ns/pid")
        if self.nice and _session_of(pid, INFO_TIMEOUT_SECONDS) == pid:
            self._lower_autogroup(pid)

    def _lower_autogroup(self, pid: int) -> None:
        """Give the autogroup (session) of ``pid`` the sandbox's nice value: with autogroups on, a session competes
        with the portal's as a whole whatever its processes' own nice values. Nothing to do where the kernel has no
        autogroups (the file is missing) or they are off (the value is kept and unused)."""
        if not self.nice:
            return
        try:
            with open(f"/proc/{pid}/autogroup", "w", encoding="ascii") as fh:
                fh.write(str(self.nice))
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                logger.warning("Could not lower the sandbox's autogroup priority (pid %s): %s", pid, exc.strerror)

    def cpu_seconds(self) -> float:
        """CPU time used so far by the sandbox: the cgroup's ``cpu.stat`` where there is one, else the init's own
        (with bubblewrap's ``--as-pid-1`` and no fork, the init is the whole sandbox); 0 when it is gone."""
        if self.group is not None:
            used = self.group.cpu_seconds()
            if used is not None:
                return used
        pid = self.init_pid or self.proc.pid
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime

    def kill(self, timeout: float = 5.0) -> bool:
        """Kill all of it; True when nothing of it is left (the init, every process of its namespace and cgroup,
        the launcher)."""
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)  # the init: the kernel kills its namespace
            # bubblewrap exits by itself once its child is dead, after reaping it: killed first (by cgroup.kill
            # too, as it is in the cgroup), it would leave the init a zombie for the machine's init to reap.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        if self.group is not None:
            self.group.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            self.proc.kill()
        gone = True
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            gone = False
        if self.pidfd >= 0:
            gone = gone and _readable(self.pidfd, timeout)  # a pidfd is readable once its process has exited
            os.close(self.pidfd)
            self.pidfd = -1
        if self.group is not None:
            gone = self.group.remove(timeout) and gone
        return gone


def _readable(fd: int, timeout: float) -> bool:
    """poll, not select: a busy server's descriptors go past select's 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _session_of(pid: int, timeout: float) -> int:
    """The session of ``pid`` once it leads one of its own (bubblewrap's ``--new-session`` calls setsid just before
    it runs the program, after it reported the pid), waiting up to ``timeout``; its current session past that."""
    deadline = time.monotonic() + timeout
    session = 0
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                session = int(fh.read().rsplit(b")", 1)[1].split()[3])
        except (OSError, IndexError, ValueError):
            return 0
        if session == pid or time.monotonic() > deadline:
            return session
        time.sleep(0.001)


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def start(argv: list[str], limits: Limits, *, name: str, bubblewrap: bool, pass_fds: tuple[int, ...] = (),
          spawn: Callable[[Callable[[], subprocess.Popen[bytes]]], subprocess.Popen[bytes]] | None = None,
          **popen: Any) -> SandboxProcess:
    """Start ``argv`` (a bubblewrap command from ``bwrap.command``, or a ``confine.py`` one) under ``limits``, in a
    cgroup of its own where possible. With ``bubblewrap``, ``--info-fd`` is added to the command here."""
    group = cgroups.create(name, limits)
    info_read = info_write = -1
    if bubblewrap:
        info_read, info_write = os.pipe()
        at = argv.index("--")
        argv = [*argv[:at], "--info-fd", str(info_write), *argv[at:]]
        pass_fds = (*pass_fds, info_write)
    command, preexec = _wrapped(argv, limits, group)
    try:
        def launch() -> subprocess.Popen[bytes]:
            return subprocess.Popen(command, pass_fds=pass_fds, preexec_fn=preexec, start_new_session=True,
                                    **popen)

        proc = spawn(launch) if spawn is not None else launch()
    except BaseException:
        if info_read >= 0:
            os.close(info_read)
        if group is not None:
            group.remove(1.0)
        raise
    finally:
        if info_write >= 0:
            os.close(info_write)
    sandbox = SandboxProcess(proc, group, limits.nice)
    sandbox._lower_autogroup(proc.pid)  # the launcher's new session: bubblewrap itself, or the confined program
    if info_read >= 0:
        sandbox._take_info(info_read)
    return sandbox
