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
  clone3 with ENOSYS, so a fork bomb stops at its first fork), and resource limits the program sets on itself
  before it touches the artifact (address space, CPU time, file size, open files, no core dumps).
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
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot make namespaces here: artifacts whose loaders run code are not loaded."""


def environment() -> dict[str, str]:
    env = dict(FIXED_ENV)
    env.update({k: os.environ[k] for k in PASSED_THROUGH if os.environ.get(k)})
    return env


# --- The seccomp filter: threads yes, processes no ------------------------------------------------------------

_ARCH = {  # AUDIT_ARCH_*, and the syscall numbers of clone, fork, vfork, clone3 (None: no such call)
    "x86_64": (0xC000003E, 56, 57, 58, 435),
    "aarch64": (0xC00000B7, 220, None, None, 435),
}
_CLONE_THREAD = 0x00010000
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | 1
_RET_ENOSYS = 0x00050000 | 38
_RET_KILL = 0x80000000  # SECCOMP_RET_KILL_PROCESS


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


@functools.lru_cache(maxsize=1)
def seccomp_program() -> bytes | None:
    """A classic BPF program for bubblewrap's ``--seccomp``, or None on an architecture it does not know."""
    arch = _ARCH.get(platform.machine())
    if arch is None:
        return None
    audit_arch, clone, fork, vfork, clone3 = arch
    ld_w_abs, jeq_k, jge_k, jset_k, ret_k = 0x20, 0x15, 0x35, 0x45, 0x06
    denied_processes = [n for n in (fork, vfork) if n is not None]
    # Layout: [arch check][nr load][x32 guard][one jeq per denied call][clone3][clone][arg0 test] then returns.
    prog: list[bytes] = []
    # The four returns (ALLOW, EPERM, ENOSYS, KILL) come last; jumps are offsets to them.
    first_return = 8 + len(denied_processes)
    allow, eperm, enosys, kill = first_return, first_return + 1, first_return + 2, first_return + 3

    def jump(at: int, target: int) -> int:
        return target - at - 1

    prog.append(_bpf(ld_w_abs, 0, 0, 4))                                 # 0: A = arch
    prog.append(_bpf(jeq_k, 0, jump(1, kill), audit_arch))             # 1: other ABI -> kill
    prog.append(_bpf(ld_w_abs, 0, 0, 0))                                 # 2: A = nr
    prog.append(_bpf(jge_k, jump(3, kill), 0, 0x40000000))             # 3: x32 numbers -> kill
    index = 4
    for number in denied_processes:
        prog.append(_bpf(jeq_k, jump(index, eperm), 0, number))
        index += 1
    prog.append(_bpf(jeq_k, jump(index, enosys), 0, clone3))
    index += 1
    prog.append(_bpf(jeq_k, 0, jump(index, allow), clone))
    index += 1
    prog.append(_bpf(ld_w_abs, 0, 0, 16))                                # A = low half of clone's flags
    index += 1
    prog.append(_bpf(jset_k, jump(index, allow), jump(index, eperm), _CLONE_THREAD))
    index += 1
    assert index == first_return, (index, first_return)
    prog.append(_bpf(ret_k, 0, 0, _RET_ALLOW))
    prog.append(_bpf(ret_k, 0, 0, _RET_EPERM))
    prog.append(_bpf(ret_k, 0, 0, _RET_ENOSYS))
    prog.append(_bpf(ret_k, 0, 0, _RET_KILL))
    assert len(prog) == first_return + 4
    return b"".join(prog)


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
    args += _root_links()
    for etc in ETC_FILES:
        if os.path.exists(etc):
            args += ["--ro-bind", etc, etc]
    for root in _python_roots():
        args += ["--ro-bind", root, root]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(SHM_MB * 1024 * 1024), "--tmpfs", INSIDE_SHM,
             "--size", str(tmp_mb * 1024 * 1024), "--tmpfs", INSIDE_TMP,
             "--ro-bind", str(CHILD), INSIDE_CHILD]
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
