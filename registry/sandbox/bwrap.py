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

import functools
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
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
                            "memfd_create": 319, "kexec_load": 246, "kexec_file_load": 320, "personality": 135}),
    "aarch64": (0xC00000B7, {"clone": 220, "fork": None, "vfork": None, "clone3": 435, "socket": 198, "ptrace": 117,
                             "process_vm_readv": 270, "process_vm_writev": 271, "keyctl": 219, "add_key": 217,
                             "request_key": 218, "io_uring_setup": 425, "io_uring_enter": 426,
                             "io_uring_register": 427, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
                             "memfd_create": 279, "kexec_load": 104, "kexec_file_load": 294, "personality": 92}),
}
# Refused with EPERM: process creation (a fork bomb stops at its first fork; RLIMIT_NPROC does not count a
# sandbox whose uid maps to root), tracing other processes, the kernel keyring (shared with the parent's session),
# io_uring, BPF, perf, userfaultfd, anonymous memory files (their pages escape RLIMIT_AS), kexec, personality.
_DENIED = ("fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "keyctl", "add_key", "request_key",
           "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open", "userfaultfd",
           "memfd_create", "kexec_load", "kexec_file_load", "personality")
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
                ("jeq", numbers["clone"], None, "allow", 0),
                ("ld", 16), ("jset", _CLONE_THREAD, "allow", "eperm", 0),  # clone: threads only
                ("label", "socket"), ("ld", 16)]
    for family in _SOCKET_FAMILIES:
        program.append(("jeq", family, "allow", None, 0))
    program += [("ret", _RET_EAFNOSUPPORT),
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


def command(argv: list[str], mounts: Mounts, *, seccomp_fd: int | None, tmp_mb: int) -> list[str]:
    bwrap = shutil.which("bwrap")
    if not bwrap:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
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
    return [*args, "--", sys.executable, "-I", "-B", INSIDE_CHILD, *argv]


def seccomp_file() -> int | None:
    """An open, rewound file holding the filter (bubblewrap reads it from the descriptor); the caller closes it."""
    program = seccomp_program()
    if program is None:
        return None
    fd = os.memfd_create("portal-seccomp", 0) if hasattr(os, "memfd_create") else _temp_fd()
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _temp_fd() -> int:
    handle = tempfile.TemporaryFile()  # the descriptor outlives the object on purpose
    return os.dup(handle.fileno())


@functools.lru_cache(maxsize=1)
def probe() -> str | None:
    """None when a sandbox starts here, else why not (in a sentence a person can act on)."""
    if not shutil.which("bwrap"):
        return ("bubblewrap is not installed: install it (Debian/Ubuntu: apt-get install bubblewrap) so that "
                "uploaded models can be loaded in isolation")
    seccomp = seccomp_file()
    try:
        argv = command(["probe"], Mounts(), seccomp_fd=seccomp, tmp_mb=16)
        proc = subprocess.run(argv, env=environment(), capture_output=True, timeout=30, cwd="/",
                              pass_fds=(seccomp,) if seccomp is not None else ())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not start a sandbox ({exc})"
    finally:
        if seccomp is not None:
            os.close(seccomp)
    if proc.returncode != 0 or b'"ok": true' not in proc.stdout:
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        return ("bubblewrap cannot create the sandbox's namespaces here (" + (why[-1][:300] if why else
                f"exit status {proc.returncode}") + "): allow user namespaces, or run model hosts as containers")
    return None
