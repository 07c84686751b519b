"""The sandbox's process boundary, attacked from inside: limits owned from outside (inherited by the sandbox's init,
not raisable), no init of bubblewrap's to take over and no system call that reaches another process, the sandbox
killed whole whatever its processes do, and no host path of the portal in its mountinfo.

Each test starts a real bubblewrap sandbox through the portal's own launcher (``launch.start`` around
``bwrap.prepared``) with a small Python program in place of ``child.py``."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from registry.sandbox import bwrap, cgroups, launch

pytestmark = pytest.mark.real_sandbox

ROOT = Path(__file__).resolve().parents[3]
LIMITS = launch.Limits(memory=1024 * 1024 * 1024, cpu_seconds=20, file_size=8 * 1024 * 1024, files=64)


@pytest.fixture(autouse=True)
def _needs_bubblewrap() -> None:
    reason = bwrap.probe()
    if reason:
        pytest.skip(reason)


def _start(code: str, tmp_path: Path, *, seccomp: bool = True, limits: launch.Limits = LIMITS,
           mounts: bwrap.Mounts | None = None) -> tuple[launch.SandboxProcess, Path, Path]:
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with bwrap.prepared(["probe"], mounts or bwrap.Mounts(), tmp_mb=16) as (command, fds):
        at = command.index("--")
        if not seccomp:
            i = command.index("--seccomp")
            command = command[:i] + command[i + 2:]
            at -= 2
        command = [*command[:at + 1], bwrap.python_executable(), "-I", "-c", code]
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = launch.start(command, limits, name="test", bubblewrap=True, pass_fds=fds, env=bwrap.environment(),
                                cwd="/", stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    return proc, out, err


def _run(code: str, tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    proc, out, err = _start(code, tmp_path, **kwargs)
    try:
        proc.wait(timeout=60)
    finally:
        assert proc.kill(), "something of the sandbox outlived it"
    lines = out.read_text().strip().splitlines()
    assert lines, err.read_text()[-2000:]
    return dict(json.loads(lines[-1]))


def _in_namespace(namespace: str) -> list[int]:
    """Every process of this machine in that pid namespace, seen from outside (host-side ``ps``)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == namespace:
                    found.append(int(name))
            except OSError:
                continue
    return found


def test_limits_are_set_before_the_sandbox_exists_and_cannot_be_raised(tmp_path: Path) -> None:
    """The program is the sandbox's pid 1 and never set a limit itself: what it has, it inherited from the
    launcher. Raising one is refused, and a mapping past the address-space limit fails."""
    facts = _run("""
import json, mmap, os, resource
names = ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_CPU")
facts = {"pid": os.getpid(), "processes": sorted(p for p in os.listdir("/proc") if p.isdigit()),
         "limits": {n: list(resource.getrlimit(getattr(resource, n))) for n in names}}
try:
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    facts["raised"] = True
except (ValueError, OSError):
    facts["raised"] = False
try:
    mmap.mmap(-1, 2 * 1024 ** 3)
    facts["mapped_past_limit"] = True
except (OSError, MemoryError):
    facts["mapped_past_limit"] = False
print(json.dumps(facts))
""", tmp_path)
    assert facts["pid"] == 1 and facts["processes"] == ["1"]
    gib = 1024 ** 3
    assert facts["limits"] == {"RLIMIT_AS": [gib, gib], "RLIMIT_DATA": [gib, gib],
                               "RLIMIT_FSIZE": [8 * 1024 ** 2] * 2, "RLIMIT_NOFILE": [64, 64], "RLIMIT_CORE": [0, 0],
                               "RLIMIT_CPU": [20, 21]}
    assert facts["raised"] is False and facts["mapped_past_limit"] is False


def test_a_one_shot_run_that_spins_is_stopped_by_its_cpu_limit(tmp_path: Path) -> None:
    proc, _, _ = _start("while True:\n    pass\n", tmp_path,
                        limits=launch.Limits(memory=LIMITS.memory, cpu_seconds=1))
    try:
        proc.wait(timeout=60)  # 2 s of CPU (the hard limit), however busy the machine is
    finally:
        proc.kill()
    assert proc.returncode != 0


def test_nothing_in_the_sandbox_can_reach_another_process(tmp_path: Path) -> None:
    """No bubblewrap init to take over (the program is pid 1 and alone), and the filter refuses every way at
    another process's memory or descriptors, forks, and any change to the parent-death signal or dumpability."""
    facts = _run("""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(*args):
    result = libc.syscall(*args)
    return [result, ctypes.get_errno() if result < 0 else 0]
facts = {"pid": os.getpid(), "processes": sorted(p for p in os.listdir("/proc") if p.isdigit())}
pidfd = libc.syscall(434, 1, 0)  # pidfd_open(1): its own pid
facts["pidfd_getfd"] = call(438, pidfd, 0, 0)
buf = ctypes.create_string_buffer(8)
iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
facts["process_vm_writev"] = call(311, 1, iov, 1, iov, 1, 0)
facts["process_vm_readv"] = call(310, 1, iov, 1, iov, 1, 0)
facts["kcmp"] = call(312, 1, 1, 0, 0, 0)
facts["ptrace"] = call(101, 16, 1, 0, 0)  # PTRACE_ATTACH
facts["clear_pdeathsig"] = call(157, 1, 0, 0, 0, 0)
facts["dumpable_on"] = call(157, 4, 1, 0, 0, 0)
facts["dumpable_off"] = call(157, 4, 0, 0, 0, 0)
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    facts["fork"] = "forked"
except OSError as exc:
    facts["fork"] = exc.errno
print(json.dumps(facts))
""", tmp_path)
    eperm = 1
    assert facts["pid"] == 1 and facts["processes"] == ["1"], facts
    for call in ("pidfd_getfd", "process_vm_writev", "process_vm_readv", "kcmp", "ptrace", "clear_pdeathsig",
                 "dumpable_on"):
        assert facts[call] == [-1, eperm], (call, facts)
    assert facts["dumpable_off"] == [0, 0]
    assert facts["fork"] == eperm


def test_a_sandbox_is_killed_whole_whatever_its_processes_do(tmp_path: Path) -> None:
    """Even with no seccomp filter at all, processes that fork, start new sessions, clear their parent-death signal
    and double-fork all end when the portal stops the sandbox: it kills the namespace's init from outside."""
    proc, out, _ = _start("""
import ctypes, os, sys, time
libc = ctypes.CDLL(None)
for _ in range(3):
    if os.fork() == 0:
        os.setsid()
        libc.prctl(1, 0, 0, 0, 0)
        if os.fork() == 0:
            libc.prctl(1, 0, 0, 0, 0)
            time.sleep(600)
        time.sleep(600)
libc.prctl(1, 0, 0, 0, 0)
deadline = time.monotonic() + 20
while len([p for p in os.listdir("/proc") if p.isdigit()]) < 7 and time.monotonic() < deadline:
    time.sleep(0.02)
print(len([p for p in os.listdir("/proc") if p.isdigit()]), flush=True)
time.sleep(600)
""", tmp_path, seccomp=False)
    deadline = time.monotonic() + 30
    while not out.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.read_text().strip() == "7", "the processes did not start"
    namespace = proc.pid_namespace
    assert namespace and len(_in_namespace(namespace)) == 7
    group = proc.group
    assert proc.kill()
    assert _in_namespace(namespace) == []
    assert group is None or not group.path.exists()
    assert proc.poll() is not None


def test_mountinfo_names_nothing_of_the_portal(tmp_path: Path) -> None:
    """The artifact is bound from a stage that names nothing of the portal, even when it is a link into the blob
    store; child.py is copied in; what is left is the system and the Python the sandbox runs, read-only."""
    blobs = Path(settings.VAR_DIR) / "tmp" / f"boundary-blobs-{os.getpid()}"
    blobs.mkdir(parents=True, exist_ok=True)
    try:
        (blobs / "0123abcd").write_bytes(b"model bytes")
        work = Path(settings.VAR_DIR) / "tmp" / f"boundary-host-{os.getpid()}"
        work.mkdir(exist_ok=True)
        (work / "model.pkl").symlink_to(blobs / "0123abcd")
        stage = bwrap.stage(bwrap.Mounts(model=work / "model.pkl", model_name="model.pkl", out=work))
        try:
            facts = _run("""
import json
print(json.dumps({"mountinfo": open("/proc/self/mountinfo").read(), "model": open("/model/model.pkl").read()}))
""", tmp_path, mounts=stage.mounts)
        finally:
            stage.close()
    finally:
        import shutil

        shutil.rmtree(blobs, ignore_errors=True)
        shutil.rmtree(Path(settings.VAR_DIR) / "tmp" / f"boundary-host-{os.getpid()}", ignore_errors=True)
    assert facts["model"] == "model bytes"
    sources = [line.split()[3] for line in facts["mountinfo"].splitlines()]
    python_roots = bwrap._python_roots()
    named = [s for s in sources if not any(s == r or s.startswith(r + "/") for r in python_roots)]
    for forbidden in (str(ROOT), str(Path(settings.VAR_DIR).resolve()), str(blobs), str(bwrap.CHILD)):
        assert not [s for s in named if forbidden in s], (forbidden, named)
    assert not any("registry/sandbox" in s for s in sources)


@pytest.mark.django_db
def test_readyz_says_whether_sandboxes_get_cgroups_here() -> None:
    """Whatever this machine offers, /readyz says it (and stays ready: rlimits, the pid namespace and the CPU
    watchdog hold without cgroups)."""
    from django.test import Client

    line = cgroups.status(settings.PORTAL_MODEL_HOST_NICE)
    assert line.split(":")[0] in ("ok", "partial", "unavailable") and len(line) > 20
    response = Client().get("/readyz")
    assert response.json()["sandbox_cgroups"] == line
    if cgroups.hierarchy().parent is not None:
        assert cgroups.hierarchy().parent.is_dir()


SPIN = """
import errno, json, os, sys, time
facts = {"nice": os.getpriority(os.PRIO_PROCESS, 0)}
try:
    os.setpriority(os.PRIO_PROCESS, 0, 0)
    facts["renice"] = "raised"
except OSError as exc:
    facts["renice"] = exc.errno
try:
    os.setsid()
    facts["setsid"] = "new session"
except OSError as exc:
    facts["setsid"] = exc.errno
if ESCAPE:
    # The kernel lets any process put its autogroup back to nice 0 (what holds it is the cpu cgroup), at most once
    # per 100 ms machine-wide for an unprivileged caller (EAGAIN otherwise): an attacker simply tries again.
    for _ in range(50):
        try:
            with open("/proc/self/autogroup", "w") as fh:
                fh.write("0")
            facts["autogroup"] = "raised"
            break
        except OSError as exc:
            facts["autogroup"] = exc.errno
            if exc.errno != errno.EAGAIN:
                break
            time.sleep(0.1)
print(json.dumps(facts), flush=True)
while True:
    pass
"""


def _cpu_cgroup_here() -> bool:
    """Whether sandboxes get a cgroup that weighs their CPU here (a v2 cpu controller, or a writable v1 cpu)."""
    return "cpu" in cgroups.hierarchy().controllers or cgroups.v1_cpu_parent(19)[0] is not None


def _spinning(tmp_path: Path, nice: int, escape: bool) -> tuple[launch.SandboxProcess, dict[str, Any]]:
    proc, out, err = _start(SPIN.replace("ESCAPE", repr(escape)), tmp_path,
                            limits=launch.Limits(memory=LIMITS.memory, nice=nice))
    deadline = time.monotonic() + 60
    while not out.read_text().strip() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    lines = out.read_text().strip().splitlines()
    assert lines, err.read_text()[-2000:]
    return proc, dict(json.loads(lines[0]))


def test_a_sandbox_runs_below_the_portal_and_cannot_climb_back(tmp_path: Path) -> None:
    """Every process of the sandbox is born at the sandbox's niceness, its init included, and cannot raise it, nor
    leave its session (an autogroup of its own); from outside, the init's nice value, its autogroup's, and where
    this machine lets the portal weigh CPU by cgroup, the init in a cpu cgroup of the sandboxes' parent."""
    import errno

    proc, facts = _spinning(tmp_path, 19, escape=False)
    try:
        assert facts == {"nice": 19, "renice": errno.EACCES, "setsid": errno.EPERM}, facts
        init = proc.init_pid
        assert init > 0
        assert int(Path(f"/proc/{init}/stat").read_bytes().rsplit(b")", 1)[1].split()[16]) == 19
        if Path(f"/proc/{init}/autogroup").exists():
            assert Path(f"/proc/{init}/autogroup").read_text().split()[-1] == "19"
        parent_v1 = cgroups.v1_cpu_parent(19)[0]
        if "cpu" not in cgroups.hierarchy().controllers and parent_v1 is not None:
            assert proc.group is not None and proc.group.cpu_v1 is not None
            assert proc.group.cpu_v1.parent == parent_v1 and (parent_v1 / "cpu.shares").read_text().strip() == "15"
            assert init in proc.group.pids()
            assert (proc.group.cpu_v1 / "cpu.cfs_quota_us").read_text().strip() == "100000"  # one CPU
    finally:
        assert proc.kill()
    if proc.group is not None and proc.group.cpu_v1 is not None:
        assert not proc.group.cpu_v1.exists()


def _share_against_a_portal_process(tmp_path: Path, nice: int, escape: bool) -> tuple[float, float, dict[str, Any]]:
    """A spinning sandbox and a spinning process of the test's own session on one CPU for 3 s: the CPU seconds
    each got."""
    import sys

    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # the sandbox and the competitor inherit it
    try:
        proc, facts = _spinning(tmp_path, nice, escape)
        try:
            before = proc.cpu_seconds()
            competitor = subprocess.run([sys.executable, "-c", "import time\nend = time.monotonic() + 3\n"
                                         "while time.monotonic() < end:\n    pass\nprint(time.process_time())"],
                                        capture_output=True, text=True, check=True, timeout=120)
            sandbox = proc.cpu_seconds() - before
        finally:
            assert proc.kill()
    finally:
        os.sched_setaffinity(0, allowed)
    return sandbox, float(competitor.stdout), facts


def test_a_spinning_sandbox_takes_only_the_cpu_the_portal_leaves(tmp_path: Path) -> None:
    """On one CPU, a portal process spinning beside a sandbox that spins (and, where a cpu cgroup holds it, first
    puts its autogroup back to nice 0) gets nearly all of it; at nice 0 (PORTAL_MODEL_HOST_NICE=0, the control) the
    two share it. The kernel's weights: 15 against 1024 at nice 19."""
    escape = _cpu_cgroup_here()
    sandbox, portal, facts = _share_against_a_portal_process(tmp_path, 19, escape)
    if escape:
        assert facts["autogroup"] == "raised", facts  # the kernel allowed it; the cgroup still holds the sandbox
    assert sandbox < 0.15 * portal, (sandbox, portal)
    sandbox, portal, _ = _share_against_a_portal_process(tmp_path, 0, False)
    assert sandbox > 0.4 * portal, (sandbox, portal)
