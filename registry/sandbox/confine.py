"""Confine this process, then become the sandboxed program: the model-host service's stand-in for bubblewrap where
a container may not create namespaces (compose, Kubernetes without a sandboxed runtime).

    python -I -B confine.py FD -- PROGRAM ARGS...

FD is an inherited descriptor holding the seccomp filter (``bwrap.seccomp_program``: no fork, no ptrace, no
process_vm_*/pidfd_getfd, no changing the parent-death signal, no kernel keyring, no io_uring/BPF/perf, sockets only
AF_UNIX/INET/INET6). The parent-death signal is set to SIGKILL first, so the program dies with the service thread
that started it. Resource limits are set by the service's launcher (``launch.py``) before this runs. The filter is installed with no-new-privileges, so
neither it nor anything it refuses can be undone by the program, which is then exec'd in its place. The container
around the service supplies the rest of the boundary: no credential, no egress, a read-only root, a non-root user.
Standard library only, and nothing from the portal: it runs before any artifact is read.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(program: bytes) -> None:
    if not program or len(program) % 8:
        raise ValueError("a seccomp program is a whole number of 8-byte instructions")
    libc = ctypes.CDLL(None, use_errno=True)
    # Killed with the service's thread that started it; the filter then refuses changing that (or clearing it).
    if libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: confine.py FD -- PROGRAM ARGS...", file=sys.stderr)
        return 2
    fd = int(argv[1])
    with os.fdopen(fd, "rb") as handle:
        program = handle.read()
    try:
        install(program)
    except OSError as exc:
        print(f"confine: the seccomp filter could not be installed ({exc})", file=sys.stderr)
        return 70
    os.execv(argv[3], argv[3:])  # noqa: S606 - the program and its arguments come from the service, no shell
    return 71  # not reached: execv replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv))
