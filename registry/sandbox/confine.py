"""Confine this process, then become the sandboxed program: the model-host service's stand-in for bubblewrap where
a container may not create namespaces (compose, Kubernetes without a sandboxed runtime).

    python -I -B confine.py FD -- PROGRAM ARGS...

FD is an inherited descriptor holding the seccomp filter (``bwrap.seccomp_program``: no fork, no ptrace, no
process_vm_*/pidfd_getfd, no changing the parent-death signal, no kernel keyring, no io_uring/BPF/perf, sockets only
AF_UNIX/INET/INET6). Resource limits are set by the service's launcher (``launch.py``) before this runs. The filter is installed with no-new-privileges, so
neither it nor anything it refuses can be undone by the program, which is then exec'd in its place. The container
around the service supplies the rest of the boundary: no credential, no egress, a read-only root, a non-root user.
Standard library only, and nothing from the portal: it runs before any artifact is read.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from typing import Any

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# Signals only to itself. Without namespaces every confined program shares the service's uid, so kill(2) could reach
# the service and the other models' hosts (found by the hostile suite's "kill every process in sight"): a second
# filter, built here because only this process knows its pid (kept across exec), lets kill, tkill, tgkill and the
# sigqueue calls name this pid, its process group (0 or -pid) and nothing else, and refuses pidfd_send_signal.
_AUDIT_ARCH = {0xC000003E: {"kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129,
                            "rt_tgsigqueueinfo": 297, "pidfd_send_signal": 424},  # x86_64
               0xC00000B7: {"kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138,
                            "rt_tgsigqueueinfo": 240, "pidfd_send_signal": 424}}  # aarch64
_LD, _JEQ, _RET = 0x20, 0x15, 0x06
_ALLOW, _EPERM = 0x7FFF0000, 0x00050000 | 1


def signal_filter(pid: int) -> bytes:
    """A seccomp program (classic BPF) allowing signals to ``pid`` and its process group only."""
    code: list[tuple[Any, Any, Any, int]] = []  # (op or "label", jump-if-true label, jump-if-false label, k)
    code.append((_LD, None, None, 4))  # arch
    for arch in _AUDIT_ARCH:
        code.append((_JEQ, f"arch{arch}", None, arch))
    code.append((_RET, None, None, _ALLOW))  # another ABI: the portal's main filter decides
    for arch, numbers in _AUDIT_ARCH.items():
        code.append(("label", f"arch{arch}", None, 0))
        code.append((_LD, None, None, 0))  # the syscall number
        code.append((_JEQ, "eperm", None, numbers["pidfd_send_signal"]))
        for name in ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            code.append((_JEQ, "target", None, numbers[name]))
        code.append((_RET, None, None, _ALLOW))
    code.append(("label", "target", None, 0))
    code.append((_LD, None, None, 16))  # the low half of the first argument: the pid named
    for allowed in (pid, 0, (-pid) & 0xFFFFFFFF):
        code.append((_JEQ, "allow", None, allowed))
    code.append(("label", "eperm", None, 0))
    code.append((_RET, None, None, _EPERM))
    code.append(("label", "allow", None, 0))
    code.append((_RET, None, None, _ALLOW))
    labels: dict[str, int] = {}
    position = 0
    for op, target, _, _ in code:
        if op == "label":
            labels[str(target)] = position
        else:
            position += 1
    out, position = [], 0
    for op, jt, jf, k in code:
        if op == "label":
            continue
        true = labels[jt] - position - 1 if jt else 0
        false = labels[jf] - position - 1 if jf else 0
        out.append(struct.pack("<HBBI", op, true, false, k))
        position += 1
    return b"".join(out)


def install(program: bytes) -> None:
    if not program or len(program) % 8:
        raise ValueError("a seccomp program is a whole number of 8-byte instructions")
    libc = ctypes.CDLL(None, use_errno=True)
    # No parent-death signal here: Linux sends it when the THREAD that started the program ends, and the service
    # starts hosts from request threads that end right after; the service's launcher kills its sandboxes instead.
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
        install(signal_filter(os.getpid()))
    except OSError as exc:
        print(f"confine: the seccomp filter could not be installed ({exc})", file=sys.stderr)
        return 70
    os.execv(argv[3], argv[3:])  # noqa: S606 - the program and its arguments come from the service, no shell
    return 71  # not reached: execv replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv))
