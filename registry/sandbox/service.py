"""The model-host service: sandboxed loads and long-lived model hosts for portal processes in other containers.

Where the portal's own containers may not create user namespaces (docker compose, Kubernetes without a sandboxed
runtime), bubblewrap cannot start there, and model files are loaded here instead: a container (or pod) that holds no
credential (no secret, no database or broker address, no service-account token), has no egress, a read-only root
and a non-root user, and that only the portal's web and worker processes may reach. The portal sets
``PORTAL_MODEL_HOST_URL`` (``tcp://modelhost:7070`` or ``unix:/path``) and everything that would have started
``bwrap … child.py`` locally asks this service instead (``remote.py``).

    python -m registry.sandbox.service --listen tcp://0.0.0.0:7070 [--max-hosts 32] [--memory-mb 4096]

Per connection, one request: a frame (4-byte big-endian length + JSON header) naming the mode, then the artifact
as an uncompressed tar of ``model_bytes`` bytes.
- ``ping``: answers ``{"ok": true, "sandbox": ..., "hosts": n}``.
- ``run``: runs ``child.py`` once (inspect, smoke, prepare-serving…) and answers its exit status, the tails of its
  stdout and stderr, and, when asked, a tar of the one folder it could write (``/out``).
- ``host``: starts ``child.py host`` with the connection itself as its standard input and output, so the portal
  then speaks the host protocol (``hosts.py``) straight to the model with no relay in between; when the portal
  closes the connection, or the host exits, the host's process group is killed and its files removed.
Each program runs inside bubblewrap when this container can make namespaces, and otherwise under ``confine.py``: a
seccomp filter (no fork, no ptrace, no keyring…), no new privileges, resource limits, its own session, and a
private working folder. The service itself never loads an artifact, and imports nothing that could.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from registry.sandbox import bwrap, launch
from registry.sandbox.child import not_dumpable
from registry.sandbox.child import FRAME_HEADER

logger = logging.getLogger("portal.modelhost")
CONFINE = Path(__file__).with_name("confine.py")
MAX_HEADER_BYTES = 1024 * 1024
MAX_MODEL_BYTES = 8 * 1024 * 1024 * 1024
TAIL_BYTES = 256 * 1024
MAX_OUT_BYTES = 1024 * 1024 * 1024 + 64 * 1024  # one ONNX file as large as RLIMIT_FSIZE allows, and its tar header
MODES = ("ping", "run", "host")


class BadRequest(Exception):
    pass


def recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise EOFError("the peer closed the connection")
        got += n
    return bytes(buffer)


def send_frame(sock: socket.socket, header: dict[str, Any]) -> None:
    body = json.dumps(header).encode()
    sock.sendall(FRAME_HEADER.pack(len(body)) + body)


def read_frame(sock: socket.socket, limit: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    (size,) = FRAME_HEADER.unpack(recv_exact(sock, FRAME_HEADER.size))
    if size > limit:
        raise BadRequest(f"a frame of {size} bytes (at most {limit})")
    try:
        header = json.loads(recv_exact(sock, size))
    except ValueError:
        raise BadRequest("the request header is not JSON") from None
    if not isinstance(header, dict):
        raise BadRequest("the request header is not a JSON object")
    return header


class _SocketReader(io.RawIOBase):
    """Exactly ``size`` bytes of a socket, as a file (tarfile's streaming mode reads from it)."""

    def __init__(self, sock: socket.socket, size: int) -> None:
        self._sock, self._left = sock, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[:min(len(buffer), self._left)]
        n = self._sock.recv_into(view)
        if n == 0:
            raise EOFError("the peer closed the connection in the middle of the artifact")
        self._left -= n
        return n

    def drain(self) -> None:
        while self._left > 0:
            self.readinto(bytearray(min(self._left, 1 << 16)))


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - TAIL_BYTES))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Service:
    def __init__(self, *, work_root: Path, max_hosts: int, memory_mb: int, tmp_mb: int,
                 sandbox: str = "auto", host_cpu_seconds: int = 3600) -> None:
        self.work_root = work_root
        self.max_hosts = max_hosts
        self.memory = memory_mb * 1024 * 1024
        self.tmp_mb = tmp_mb
        self.host_cpu_seconds = host_cpu_seconds
        reason = bwrap.probe() if sandbox != "confine" else "not asked for"
        if sandbox == "bubblewrap" and reason:
            raise SystemExit(f"--sandbox bubblewrap, but {reason}")
        self.use_bwrap = reason is None
        self._lock = threading.Lock()
        self._children: set[launch.SandboxProcess] = set()
        self._hosts = 0

    @property
    def sandbox(self) -> str:
        return "bubblewrap" if self.use_bwrap else "seccomp (confine.py)"

    # --- one connection ----------------------------------------------------------------------------------------

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        if conn.family != socket.AF_UNIX:  # a portal pod that vanished without a FIN still frees its hosts
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            header = read_frame(conn)
            mode = header.get("mode")
            if mode not in MODES:
                raise BadRequest(f"unknown mode {mode!r}")
            if mode == "ping":
                send_frame(conn, {"ok": True, "sandbox": self.sandbox, "hosts": self._hosts,
                                  "max_hosts": self.max_hosts})
                return
            self._serve(conn, header)
        except BadRequest as exc:
            logger.warning("Refused a request: %s", exc)
            self._answer_quietly(conn, {"ok": False, "error": f"the model-host service refused the request: {exc}"})
        except (EOFError, OSError) as exc:
            logger.debug("A connection ended early: %s", exc)

    @staticmethod
    def _answer_quietly(conn: socket.socket, answer: dict[str, Any]) -> None:
        try:
            send_frame(conn, answer)
        except OSError:
            pass

    def _serve(self, conn: socket.socket, header: dict[str, Any]) -> None:
        argv, limits = header.get("argv"), header.get("limits")
        name, size = header.get("model_name"), header.get("model_bytes")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise BadRequest("argv must be a list of strings")
        if not (isinstance(name, str) and name and "/" not in name and name not in (".", "..")):
            raise BadRequest("model_name must be a plain file name")
        if not (isinstance(size, int) and 0 < size <= MAX_MODEL_BYTES):
            raise BadRequest(f"model_bytes must be between 1 and {MAX_MODEL_BYTES}")
        limits = self._clamped(limits)
        host = header["mode"] == "host"
        if host:
            with self._lock:
                if self._hosts >= self.max_hosts:
                    _SocketReader(conn, size).drain()
                    self._answer_quietly(conn, {"ok": False, "error": f"the model-host service already runs its "
                                                                      f"maximum of {self.max_hosts} model hosts"})
                    return
                self._hosts += 1
        work = Path(tempfile.mkdtemp(prefix="job-", dir=self.work_root))
        try:
            os.chmod(work, 0o700)
            for part in ("model", "tmp", "out"):
                (work / part).mkdir(mode=0o700)
            self._receive_artifact(conn, size, work / "model")
            if not (work / "model" / name).exists():
                raise BadRequest(f"the artifact holds no {name!r}")
            mounts = bwrap.Mounts(model=work / "model" / name, model_name=name,
                                  out=work / "out" if header.get("out") else None)
            if host:
                self._host(conn, work, mounts, ["--limits", limits, *argv])
            else:
                timeout = header.get("timeout")
                timeout = int(timeout) if isinstance(timeout, int) and 0 < timeout <= 3600 else 120
                self._run(conn, work, mounts, ["--limits", limits, *argv], timeout)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if host:
                with self._lock:
                    self._hosts -= 1

    def _clamped(self, limits: Any) -> str:
        """The portal's limits, never above this service's own memory cap."""
        try:
            memory, cpu, fsize, files = (int(x) for x in str(limits).split(","))
        except ValueError:
            raise BadRequest("limits must be AS,CPU,FSIZE,NOFILE") from None
        if min(memory, cpu, fsize, files) < 0:
            raise BadRequest("limits cannot be negative")
        return f"{min(memory or self.memory, self.memory)},{cpu},{fsize},{min(files or 256, 1024)}"

    @staticmethod
    def _receive_artifact(conn: socket.socket, size: int, into: Path) -> None:
        reader = _SocketReader(conn, size)
        try:
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 16), mode="r|") as archive:
                archive.extractall(into, filter="data")  # no absolute paths, no "..", no links out, no devices
        except (tarfile.TarError, ValueError) as exc:
            raise BadRequest(f"the artifact is not a usable tar ({exc})") from None
        reader.drain()

    # --- starting a sandboxed program --------------------------------------------------------------------------

    def _popen(self, work: Path, mounts: bwrap.Mounts, argv: list[str], **kwargs: Any) -> launch.SandboxProcess:
        """Start one sandboxed program: its limits (``argv[1]``) set before bubblewrap or ``confine.py`` runs, in a
        cgroup of its own where this container has one; a host gets ``host_cpu_seconds`` of CPU in all."""
        limits = launch.Limits.parse(argv[1])
        if argv[2:3] == ["host"] and not limits.cpu_seconds:
            limits = dataclasses.replace(limits, cpu_seconds=self.host_cpu_seconds)
        if self.use_bwrap:
            with bwrap.prepared(argv, mounts, tmp_mb=self.tmp_mb) as (command, fds):
                proc = launch.start(command, limits, name=mounts.model_name, bubblewrap=True, pass_fds=fds,
                                    env=bwrap.environment(), cwd="/", **kwargs)
        else:
            seccomp = bwrap.seccomp_file()
            try:
                command, env, cwd = self._confined(work, argv, seccomp)
                proc = launch.start(command, limits, name=mounts.model_name, bubblewrap=False,
                                    pass_fds=(seccomp,) if seccomp is not None else (), env=env, cwd=cwd, **kwargs)
            finally:
                if seccomp is not None:
                    os.close(seccomp)
        with self._lock:
            self._children.add(proc)
        return proc

    @staticmethod
    def _confined(work: Path, argv: list[str], seccomp: int | None) -> tuple[list[str], dict[str, str], str]:
        """Without namespaces, the artifact stays where it was received: the paths a sandbox would see
        (``/model/NAME``, ``/out``) are rewritten to this job's own folders."""
        inside = {bwrap.INSIDE_MODEL + "/": f"{work}/model/", bwrap.INSIDE_OUT + "/": f"{work}/out/"}
        rewritten = []
        for arg in argv:
            for old, new in inside.items():
                arg = arg.replace(old, new)
            rewritten.append(arg)
        child = [sys.executable, "-I", "-B", str(bwrap.CHILD), *rewritten]
        command = child if seccomp is None else [sys.executable, "-I", "-B", str(CONFINE), str(seccomp), "--", *child]
        env = bwrap.environment()
        env.update({"HOME": str(work / "tmp"), "TMPDIR": str(work / "tmp"),
                    "MLFLOW_TRACKING_URI": f"file://{work / 'tmp' / 'mlruns'}"})
        return command, env, str(work / "tmp")

    def _finish(self, proc: launch.SandboxProcess) -> None:
        if not proc.kill(timeout=10):
            logger.warning("Something of sandbox %s was still there after SIGKILL", proc.pid)
        with self._lock:
            self._children.discard(proc)

    def _run(self, conn: socket.socket, work: Path, mounts: bwrap.Mounts, argv: list[str], timeout: int) -> None:
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = self._popen(work, mounts, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                self._finish(proc)
        archive = work / "out.tar"
        out_bytes = 0
        if mounts.out is not None and not timed_out:
            with tarfile.open(archive, "w") as tar:
                for entry in sorted(mounts.out.iterdir()):
                    if entry.is_file() and not entry.is_symlink():
                        tar.add(entry, arcname=entry.name, recursive=False)
            out_bytes = archive.stat().st_size
            if out_bytes > MAX_OUT_BYTES:
                out_bytes = 0
        logger.info("Ran %s for %s: status %s%s", argv[2] if len(argv) > 2 else "?", mounts.model_name,
                    proc.returncode, " (timed out)" if timed_out else "")
        send_frame(conn, {"ok": True, "returncode": proc.returncode, "timed_out": timed_out,
                          "stdout": _tail(work / "stdout"), "stderr": _tail(work / "stderr")[-2000:],
                          "out_bytes": out_bytes})
        if out_bytes:
            with open(archive, "rb") as fh:
                conn.settimeout(600)
                conn.sendfile(fh)

    def _host(self, conn: socket.socket, work: Path, mounts: bwrap.Mounts, argv: list[str]) -> None:
        conn.settimeout(None)
        with open(work / "stderr", "wb") as err:
            proc = self._popen(work, mounts, argv, stdin=conn.fileno(), stdout=conn.fileno(), stderr=err)
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLRDHUP)  # the portal hung up; its data stays for the host to read
        started = time.monotonic()
        try:
            while proc.poll() is None:
                if poller.poll(1000):
                    break
        finally:
            self._finish(proc)
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        logger.info("Model host %s ended after %.0f s (status %s); its stderr ended: %r", mounts.model_name,
                    time.monotonic() - started, proc.returncode, _tail(work / "stderr")[-500:])

    def stop_all(self) -> None:
        with self._lock:
            children = list(self._children)
        for proc in children:
            proc.kill(timeout=1)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.service.handle(self.request)  # type: ignore[attr-defined]


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 128


def serve(listen: str, service: Service) -> socketserver.BaseServer:
    server: _TCPServer | _UnixServer
    if listen.startswith("tcp://"):
        host, _, port = listen[len("tcp://"):].rpartition(":")
        server = _TCPServer((host or "0.0.0.0", int(port)), _Handler)  # noqa: S104 - a container's own port
    elif listen.startswith("unix:"):
        path = listen[len("unix:"):].removeprefix("//")
        if os.path.exists(path):
            os.unlink(path)
        server = _UnixServer(path, _Handler)
        os.chmod(path, 0o660)
    else:
        raise SystemExit(f"--listen must be tcp://HOST:PORT or unix:/PATH, not {listen!r}")
    server.service = service  # type: ignore[union-attr]
    return server


def connect(url: str, timeout: float) -> socket.socket:
    """A connection to the service at ``tcp://HOST:PORT`` or ``unix:/PATH`` (raises OSError or ValueError)."""
    if url.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(url[len("unix:"):].removeprefix("//"))
        except OSError:
            sock.close()
            raise
        return sock
    if not url.startswith("tcp://"):
        raise ValueError(f"the model-host service's address must be tcp://HOST:PORT or unix:/PATH, not {url!r}")
    host, _, port = url[len("tcp://"):].rstrip("/").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ping(url: str, timeout: float = 5.0) -> int:
    try:
        with connect(url, timeout) as sock:
            send_frame(sock, {"mode": "ping"})
            answer = read_frame(sock)
    except (OSError, EOFError, BadRequest, ValueError) as exc:
        print(f"the model-host service at {url} does not answer: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0 if answer.get("ok") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default=os.environ.get("MODELHOST_LISTEN", "tcp://0.0.0.0:7070"))
    parser.add_argument("--work-dir", default=os.environ.get("MODELHOST_WORK_DIR", tempfile.gettempdir()))
    parser.add_argument("--max-hosts", type=int, default=int(os.environ.get("MODELHOST_MAX_HOSTS", "32")))
    parser.add_argument("--memory-mb", type=int, default=int(os.environ.get("MODELHOST_MEMORY_MB", "4096")))
    parser.add_argument("--sandbox", choices=("auto", "bubblewrap", "confine"),
                        default=os.environ.get("MODELHOST_SANDBOX", "auto"),
                        help="bubblewrap inside this container when it can make namespaces (auto), or seccomp only")
    parser.add_argument("--tmp-mb", type=int, default=int(os.environ.get("MODELHOST_TMP_MB", "1024")))
    parser.add_argument("--host-cpu-seconds", type=int, default=int(os.environ.get("MODELHOST_HOST_CPU_SECONDS", "3600")),
                        help="CPU seconds a model host may use in all (RLIMIT_CPU; the portal restarts it after)")
    parser.add_argument("--ping", metavar="URL", help="ask a running service whether it answers (health checks): "
                                                       "exit 0 if it does, 1 if not")
    args = parser.parse_args(argv)
    if args.ping:
        return ping(args.ping)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    not_dumpable()  # a confined program of the same uid cannot open this process's /proc/PID/mem
    root = Path(args.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    service = Service(work_root=root, max_hosts=args.max_hosts, memory_mb=args.memory_mb, tmp_mb=args.tmp_mb,
                      sandbox=args.sandbox, host_cpu_seconds=args.host_cpu_seconds)
    server = serve(args.listen, service)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("Model-host service listening on %s (sandbox: %s, at most %d hosts, %d MB each)", args.listen,
                service.sandbox, args.max_hosts, args.memory_mb)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        service.stop_all()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
