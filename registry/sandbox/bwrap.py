"""The bubblewrap command line every sandboxed process starts with, and the checks that it can run here.

What a sandboxed process sees and may do:
- new user, pid, network, IPC, UTS and cgroup namespaces (``--unshare-all --unshare-user``), uid/gid 65534 inside,
  every capability dropped, no new privileges (bubblewrap always sets it), no nested user namespaces, its own
  session (no TIOCSTI into a terminal), killed with its parent (``--die-with-parent``);
- a root of its own built from read-only binds: ``/usr`` (and the ``/lib``, ``/bin`` links), the Python it runs
  (the interpreter's prefix and the virtualenv), a few loader files of ``/etc``; the program ``/sandbox/child.py``;
  the artifact it is asked to load at ``/model`` (read-only); at most one empty folder it may write, ``/out``;
  a private tmpfs ``/tmp`` of bounded size; its own ``/proc`` and a minimal ``/dev``; the root itself is
  remounted read-only, and so is ``/dev``, so ``/tmp``, a 64 MB ``/dev/shm`` and ``/out`` are the only places it
  can write;
- never the project folder, ``var/`` (secret key, database, blobs, broker queue), ``/root``, ``/home`` or the
  rest of ``/etc``, and nothing of the parent's environment: bubblewrap itself is started with an allowlisted
  environment (its own ``/proc/1/environ`` is visible inside) and the program gets the same allowlist;
- no process creation besides threads (a seccomp filter answers fork, vfork and non-thread clone with EPERM and
  clone3 with ENOSYS, so a fork bomb stops at its first fork), no ptrace, keyring, io_uring, BPF, perf,
  userfaultfd, memfd or kexec, sockets of the Unix and IP families only (``_DENIED``); ``/proc/sys`` and the
  other writable kernel files read-only, kernel internals hidden (``PROC_READ_ONLY``, ``PROC_HIDDEN``); and
  resource limits the program sets on itself before it touches the artifact (address space, CPU time, file size,
  open files, no core dumps).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("child.py")
INSIDE_CHILD = "/sandbox/child.py"
INSIDE_MODEL = "/model"
INSIDE_OUT = "/out"
INSIDE_TMP = "/tmp"  # noqa: S108 - the sandbox's own private tmpfs, not the host's /tmp
INSIDE_SHM = "/dev/shm"  # noqa: S108 - likewise its own
NOBODY = 65534
SHM_MB = 64  # /dev/shm, for libraries that keep semaphores or small shared buffers there

# Variables a sandboxed process may get from the parent, when set there (thread counts and BLAS kernels change
# results or speed, never carry a secret). Everything else it gets is fixed here.
PASSED_THROUGH = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "TZ")
FIXED_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": INSIDE_TMP,
    "TMPDIR": INSIDE_TMP,
    "USER": "sandbox",
    "LOGNAME": "sandbox",
    "LANG": "C.UTF-8",
    "MLFLOW_DISABLE_TELEMETRY": "1",
    "MLFLOW_TRACKING_URI": "file:///tmp/mlruns",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONHASHSEED": "0",
}
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")
PROC_HIDDEN = ("/proc/kcore", "/proc/keys", "/proc/key-users", "/proc/timer_list", "/proc/sched_debug",
               "/proc/kallsyms", "/proc/latency_stats")
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot make namespaces here: artifacts whose loaders run code are not loaded."""


def environment() -> dict[str, str]:
    env = dict(FIXED_ENV)
    env.update({k: os.environ[k] for k in PASSED_THROUGH if os.environ.get(k)})
    return env


# --- The seccomp filter: threads yes, processes no, and no kernel interface a model has no use for -------------

_ARCH: dict[str, tuple[int, dict[str, int | None]]] = {  # AUDIT_ARCH_*, and the numbers of the calls the filter looks at (None: no such call there)
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "socket": 41, "ptrace": 101,
                            "process_vm_readv": 310, "process_vm_writev": 311, "keyctl": 250, "add_key": 248,
                            "request_key": 249, "io_uring_setup": 425, "io_uring_enter": 426,
                            "io_uring_register": 427, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
                            "memfd_create": 319, "kexec_load": 246, "kexec_file_load": 320, "personality": 135,
                            "pidfd_getfd": 438, "process_madvise": 440, "kcmp": 312, "prctl": 157}),
    "aarch64": (0xC00000B7, {"clone": 220, "fork": None, "vfork": None, "clone3": 435, "socket": 198, "ptrace": 117,
                             "process_vm_readv": 270, "process_vm_writev": 271, "keyctl": 219, "add_key": 217,
                             "request_key": 218, "io_uring_setup": 425, "io_uring_enter": 426,
                             "io_uring_register": 427, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
                             "memfd_create": 279, "kexec_load": 104, "kexec_file_load": 294, "personality": 92,
                             "pidfd_getfd": 438, "process_madvise": 440, "kcmp": 272, "prctl": 167}),
}
# Refused with EPERM: process creation (a fork bomb stops at its first fork; RLIMIT_NPROC does not count a
# sandbox whose uid maps to root), tracing, reading, writing or comparing other processes and taking their
# descriptors (ptrace, process_vm_*, process_madvise, pidfd_getfd, kcmp), the kernel keyring (shared with the
# parent's session), io_uring, BPF, perf, userfaultfd, anonymous memory files (their pages escape RLIMIT_AS),
# kexec, personality.
_DENIED = ("fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
           "kcmp", "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf",
           "perf_event_open", "userfaultfd", "memfd_create", "kexec_load", "kexec_file_load", "personality")
# prctl options refused: clearing or changing the parent-death signal (a sandbox outlives a dead portal process
# otherwise) and making the process dumpable again once it has made itself not (``child.py`` does at start-up:
# another sandbox of the same uid then cannot open its /proc/PID/mem).
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4
_SOCKET_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6 (its own loopback only); not netlink, vsock, packet
_CLONE_THREAD = 0x00010000
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | 1
_RET_EAFNOSUPPORT = 0x00050000 | 97
_RET_ENOSYS = 0x00050000 | 38
_RET_KILL = 0x80000000  # SECCOMP_RET_KILL_PROCESS
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _assemble(program: list[Any]) -> bytes:
    """Classic BPF with jumps to labels. Entries: ("label", 0) marks a place; (op, k, true_label, false_label, 0)
    is a conditional jump (a None label falls through); ("ld", offset) loads a word; ("ret", value) returns."""
    places: dict[str, int] = {}
    index = 0
    for entry in program:
        if entry[0] == "label":
            places[str(entry[1])] = index
        else:
            index += 1
    out: list[bytes] = []
    index = 0
    for entry in program:
        if entry[0] == "label":
            continue
        op = entry[0]
        if op == "ld":
            out.append(_bpf(_LD_W_ABS, 0, 0, int(entry[1])))
        elif op == "ret":
            out.append(_bpf(_RET_K, 0, 0, int(entry[1])))
        else:
            _op, k, true_label, false_label, _ = entry
            jt = places[true_label] - index - 1 if true_label else 0
            jf = places[false_label] - index - 1 if false_label else 0
            code = {"jeq": _JEQ_K, "jge": _JGE_K, "jset": _JSET_K}[str(op)]
            out.append(_bpf(code, jt, jf, int(k)))
        index += 1
    return b"".join(out)


@functools.lru_cache(maxsize=1)
def seccomp_program() -> bytes | None:
    """A classic BPF program for bubblewrap's ``--seccomp``, or None on an architecture it does not know."""
    arch = _ARCH.get(platform.machine())
    if arch is None:
        return None
    audit_arch, numbers = arch
    program: list[Any] = [("ld", 4), ("jeq", audit_arch, None, "kill", 0),  # another ABI: kill
                     ("ld", 0), ("jge", 0x40000000, "kill", None, 0)]  # x32 numbers: kill
    for name in _DENIED:
        number = numbers[name]
        if number is not None:
            program.append(("jeq", number, "eperm", None, 0))
    program += [("jeq", numbers["clone3"], "enosys", None, 0),
                ("jeq", numbers["socket"], "socket", None, 0),
                ("jeq", numbers["prctl"], "prctl", None, 0),
                ("jeq", numbers["clone"], None, "allow", 0),
                ("ld", 16), ("jset", _CLONE_THREAD, "allow", "eperm", 0),  # clone: threads only
                ("label", "socket"), ("ld", 16)]
    for family in _SOCKET_FAMILIES:
        program.append(("jeq", family, "allow", None, 0))
    program += [("ret", _RET_EAFNOSUPPORT),
                ("label", "prctl"), ("ld", 16),  # the option (the low half of the first argument)
                ("jeq", _PR_SET_PDEATHSIG, "eperm", None, 0),
                ("jeq", _PR_SET_DUMPABLE, None, "allow", 0),
                ("ld", 24), ("jeq", 0, "allow", "eperm", 0),  # PR_SET_DUMPABLE: to 0 only
                ("label", "allow"), ("ret", _RET_ALLOW),
                ("label", "eperm"), ("ret", _RET_EPERM),
                ("label", "enosys"), ("ret", _RET_ENOSYS),
                ("label", "kill"), ("ret", _RET_KILL)]
    return _assemble(program)


# --- The command ----------------------------------------------------------------------------------------------

def _python_roots() -> list[str]:
    """The folders the interpreter needs, outermost first and without repeats: its prefix, the virtualenv, and
    the folder the executable really lives in."""
    roots: list[str] = []
    for candidate in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))):
        path = os.path.realpath(candidate)
        if path.startswith("/usr/") or path == "/usr":
            continue
        if not any(path == r or path.startswith(r + "/") for r in roots):
            roots = [r for r in roots if not r.startswith(path + "/")] + [path]
    return roots


def _root_links() -> list[str]:
    """``/lib``, ``/lib64``, ``/bin``, ``/sbin``: links into ``/usr`` on a merged-usr system, folders elsewhere."""
    args: list[str] = ["--ro-bind", "/usr", "/usr"]
    for name in ("/lib", "/lib64", "/lib32", "/bin", "/sbin"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    return args


@dataclass
class Mounts:
    """What one sandboxed process is given besides the system and Python: the artifact, read-only, at
    ``/model/<name>`` (a file or a folder), and optionally one empty folder it may write at ``/out``."""

    model: Path | None = None
    model_name: str = "model"
    out: Path | None = None
    extra_ro: list[tuple[Path, str]] = field(default_factory=list)

    def inside_model(self) -> str:
        return f"{INSIDE_MODEL}/{self.model_name}"


# --- Staging: what /proc/self/mountinfo shows of the host -------------------------------------------------------
#
# A bind mount's line in mountinfo names its source's path on the source filesystem. Bound from where the portal
# keeps them, the artifact and /out would show the project's folder, var/, the blob store and its naming. They are
# bound instead from a stage: hard links (no copy) in a fresh, randomly named folder under the system's temporary
# folder, which says nothing about the portal. Where that folder is on another filesystem than the artifact, links
# are impossible and the artifact is bound from where it is (logged once; the README states it).

STAGE_ROOT_NAME = "portal-sandbox"


@dataclass
class Stage:
    mounts: Mounts
    root: Path | None = None  # the stage's folder, removed by ``close``; None: bound from where they are
    out: Path | None = None  # the caller's /out, which gets back what the sandbox wrote into the stage's

    def close(self) -> None:
        if self.root is None:
            return
        if self.out is not None and self.mounts.out is not None:
            for entry in self.mounts.out.iterdir():
                if entry.is_file() and not entry.is_symlink():
                    shutil.move(str(entry), str(self.out / entry.name))
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


_stage_warned = False


def _link_tree(source: Path, target: Path) -> None:
    if source.is_dir():
        target.mkdir()
        for entry in source.iterdir():
            if entry.is_symlink():
                os.symlink(os.readlink(entry), target / entry.name)
            else:
                _link_tree(entry, target / entry.name)
    else:
        os.link(source, target)


def stage(mounts: Mounts) -> Stage:
    """``mounts`` with the artifact and /out moved to a stage (see above); ``close`` it once the sandbox is gone."""
    global _stage_warned
    if mounts.model is None and mounts.out is None:
        return Stage(mounts)
    base = Path(tempfile.gettempdir()) / STAGE_ROOT_NAME
    root: Path | None = None
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="", dir=base))
        staged = Mounts(model=None, model_name=mounts.model_name, extra_ro=list(mounts.extra_ro))
        if mounts.model is not None:
            staged.model = root / mounts.model_name
            _link_tree(mounts.model.resolve(), staged.model)
        if mounts.out is not None:
            staged.out = root / "out"
            staged.out.mkdir()
        return Stage(staged, root=root, out=mounts.out)
    except OSError as exc:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        if not _stage_warned:
            _stage_warned = True
            logging.getLogger(__name__).warning(
                "Sandboxes see the artifact's own path in /proc/self/mountinfo: it cannot be hard-linked into %s "
                "(%s)", base, exc.strerror or exc)
        return Stage(mounts)


def python_executable() -> str:
    """The interpreter as the sandbox can run it: the virtualenv's own path, with any link to the virtualenv
    resolved (a checkout whose ``.venv`` links to another one binds the real folder, so the link is not there)."""
    return os.path.join(os.path.realpath(os.path.dirname(sys.executable)), os.path.basename(sys.executable))


def command(argv: list[str], mounts: Mounts, *, seccomp_fd: int | None, tmp_mb: int,
            child_fd: int | None = None) -> list[str]:
    """The bubblewrap command. ``child_fd``, an open file holding ``child.py``, is copied into the sandbox's own
    root (no bind, so the portal's folder shows nowhere, not even in ``/proc/self/mountinfo``); without it the file
    is bound read-only."""
    bwrap = shutil.which("bwrap")
    if not bwrap:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
    # --as-pid-1: the program is the pid namespace's init, so there is no bubblewrap init inside that a model could
    # write to through /proc/1/mem or take descriptors from, and killing that one process from outside ends every
    # process of the namespace.
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL",
            "--clearenv"]
    for key, value in environment().items():
        args += ["--setenv", key, value]
    # The sandbox's own /proc, /dev and /tmp come first: a bind below (a virtualenv under /tmp, as in a CI
    # checkout there) then lands on top of them instead of being hidden by them.
    args += ["--proc", "/proc"]
    # The sandbox's uid maps to the caller's: when that is root, the kernel's uid checks (sysctl files,
    # sysrq-trigger) would let it write system settings. Docker's rule: these parts of /proc are read-only, and
    # the ones that only leak kernel internals are hidden.
    for path in PROC_READ_ONLY:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    for path in PROC_HIDDEN:
        if os.path.exists(path):
            args += ["--ro-bind", "/dev/null", path]
    args += ["--dev", "/dev", "--size", str(SHM_MB * 1024 * 1024), "--tmpfs", INSIDE_SHM,
             "--size", str(tmp_mb * 1024 * 1024), "--tmpfs", INSIDE_TMP]
    args += _root_links()
    for etc in ETC_FILES:
        if os.path.exists(etc):
            args += ["--ro-bind", etc, etc]
    for root in _python_roots():
        args += ["--ro-bind", root, root]
    if child_fd is not None:
        args += ["--dir", os.path.dirname(INSIDE_CHILD), "--perms", "0444", "--file", str(child_fd), INSIDE_CHILD]
    else:
        args += ["--ro-bind", str(CHILD), INSIDE_CHILD]
    if mounts.model is not None:
        args += ["--ro-bind", str(mounts.model.resolve()), mounts.inside_model()]
    if mounts.out is not None:
        args += ["--bind", str(mounts.out.resolve()), INSIDE_OUT]
    for source, inside in mounts.extra_ro:
        args += ["--ro-bind", str(source.resolve()), inside]
    args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", INSIDE_TMP]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return [*args, "--", python_executable(), "-I", "-B", INSIDE_CHILD, *argv]


@contextlib.contextmanager
def prepared(argv: list[str], mounts: Mounts, *, tmp_mb: int) -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """The bubblewrap command and the descriptors it reads (the seccomp filter, ``child.py``), open for as long as
    the caller needs to start it."""
    seccomp = seccomp_file()
    child = _data_fd(CHILD.read_bytes())
    try:
        yield (command(argv, mounts, seccomp_fd=seccomp, tmp_mb=tmp_mb, child_fd=child),
               (child,) if seccomp is None else (seccomp, child))
    finally:
        os.close(child)
        if seccomp is not None:
            os.close(seccomp)


def _data_fd(data: bytes) -> int:
    fd = os.memfd_create("portal-sandbox", 0) if hasattr(os, "memfd_create") else _temp_fd()
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def seccomp_file() -> int | None:
    """An open, rewound file holding the filter (bubblewrap reads it from the descriptor); the caller closes it."""
    program = seccomp_program()
    return None if program is None else _data_fd(program)


def _temp_fd() -> int:
    handle = tempfile.TemporaryFile()  # the descriptor outlives the object on purpose
    return os.dup(handle.fileno())


@functools.lru_cache(maxsize=1)
def probe() -> str | None:
    """None when a sandbox starts here, else why not (in a sentence a person can act on)."""
    if not shutil.which("bwrap"):
        return ("bubblewrap is not installed: install it (Debian/Ubuntu: apt-get install bubblewrap) so that "
                "uploaded models can be loaded in isolation")
    try:
        with prepared(["probe"], Mounts(), tmp_mb=16) as (argv, fds):
            proc = subprocess.run(argv, env=environment(), capture_output=True, timeout=30, cwd="/", pass_fds=fds)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not start a sandbox ({exc})"
    if proc.returncode != 0 or b'"ok": true' not in proc.stdout:
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        return ("bubblewrap cannot create the sandbox's namespaces here (" + (why[-1][:300] if why else
                f"exit status {proc.returncode}") + "): allow user namespaces, or run model hosts as containers")
    return None
