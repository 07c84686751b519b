"""Model hosts: a long-lived sandboxed process per served artifact, reached over a Unix socket.

A web worker (or a Celery worker scoring a batch, or warming a deployment) never loads an artifact whose loader can
run code. It starts a host instead: ``bwrap.command`` around ``child.py host``, with the artifact bound read-only,
one end of a ``socketpair`` as the host's standard input and output, and the other end kept here. Requests go out
as a small JSON header plus the raw float64 matrix (``predict``, ``frame``, ``explain``) or an MLflow request's
body (``invoke``); answers come back as JSON, size-capped and checked (the host is
hostile until proven otherwise, so nothing it sends is unpickled or trusted beyond "a list of scalars").

Supervision, per process: a host is started on first use and after a crash (with backoff: 1, 2, 4… up to 60 s,
during which its callers get ``HostUnavailable``, a 503), stopped when idle for ``PORTAL_MODEL_HOST_IDLE_SECONDS``
or when this process holds more than ``PORTAL_MODEL_HOSTS_PER_PROCESS`` (least recently used first), and killed
when a request outlives its timeout. A crashed or hung host fails only its own callers; the process that talks to
it, and every other host, carry on.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from django.conf import settings

from registry.sandbox import bwrap, launch, remote
from registry.sandbox import unavailable_reason as sandbox_unavailable
from registry.sandbox.child import FRAME_HEADER

logger = logging.getLogger(__name__)
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # 100,000 rows of predictions are about 2.5 MB of JSON
MAX_LABEL_CHARS = 10_000  # a predicted label's length, on the matrix path (one scalar per row)
MAX_ROWS = 1_000_000  # rows one answer may say it scored (a batch chunk holds 100,000 by default)
MAX_ERROR_CHARS = 500
BACKOFF_MAX_SECONDS = 60.0
SMALL_PAYLOAD_BYTES = 64 * 1024  # requests up to this size go out in one send
SMALL_ANSWER_BYTES = 64 * 1024  # answers up to this size come in with one read
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CPU_WATCH_SECONDS = 1.0  # how often the watchdog reads each host's CPU time (one /proc read per host)


class HostUnavailable(Exception):
    """The model's host is down, starting, or restarting after a crash: the caller answers 503."""


class HostModelError(Exception):
    """The model raised on this input (its host is fine): the caller answers as for any model failure."""


class FrameDeclined(Exception):
    """The host does not answer these rows as MLflow's scoring server would without MLflow's own parsing (its model
    is not one whose answer is certain so, ``permanent``; or it raised on these rows): the caller sends the request
    to ``invoke``."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class NoExplainer(Exception):
    """No explainer fits this model (the host says why): the caller answers 422."""


class ExplainOverBudget(Exception):
    """The model-agnostic explainer would overrun its time budget on these rows: the caller answers 504."""


# Materialise fills an empty folder with what the host loads and returns (format, path inside that folder, options).
Materialise = Callable[[Path], tuple[str, Path, dict[str, Any]]]


_spawner: tuple[int, ThreadPoolExecutor] | None = None
_spawner_lock = threading.Lock()


def _spawn(start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Start a host from this process's one long-lived spawner thread. bubblewrap's --die-with-parent is tied to
    the *thread* that started it: a host started from a request thread of a threaded server (runserver, gunicorn
    --threads, a test's live server) was killed as soon as that request's thread ended."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():  # a forked child has none of its parent's threads
            _spawner = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-host-spawner"))
        executor = _spawner[1]
    return executor.submit(start).result()


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    """``size`` bytes by ``deadline`` (time.monotonic), however the other side doles them out."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise EOFError("the model host closed its socket")
        got += n
    return bytes(buffer)


_cold = threading.local()


def cold_start_reset() -> None:
    """Start counting, for this thread, the time spent waiting for model hosts to start (a scoring request)."""
    _cold.seconds = 0.0


def cold_start_add(seconds: float) -> None:
    _cold.seconds = getattr(_cold, "seconds", 0.0) + seconds


def cold_start_seconds() -> float:
    """Seconds this thread waited, since ``cold_start_reset``, for a host to start (its own start or one it queued
    behind) or a serving form to load: a cold start, which serving leaves out of the latency it logs."""
    return float(getattr(_cold, "seconds", 0.0))


class ModelHost:
    def __init__(self, key: str, materialise: Materialise, *, label: str) -> None:
        self.key = key
        self.label = label
        self._materialise = materialise
        self._lock = threading.Lock()
        self._proc: launch.SandboxProcess | remote.RemoteProcess | None = None
        self._sock: socket.socket | None = None
        self._work: Path | None = None
        self._owner = 0
        self._failures = 0
        self._retry_at = 0.0
        self.last_error = ""
        self.last_used = time.monotonic()
        self.starts = 0
        self._busy = False
        self._stage: bwrap.Stage | None = None
        self.frames_declined = ""  # why this model's rows never go to the host as a matrix (``predict_frame``)
        self._served = 0  # requests finished, so the watchdog can tell an idle second from a busy one
        self._cpu_watch: tuple[float | None, int, float] = (None, 0, 0.0)  # the watchdog's (CPU, served, idle CPU)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return (self._proc is not None and self._owner == os.getpid() and self._proc.poll() is None)

    def _start(self) -> None:
        reason = sandbox_unavailable()
        if reason:
            raise HostUnavailable(f"the model sandbox is unavailable on this host: {reason}")
        root = Path(settings.VAR_DIR) / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="host-", dir=root))
        self._work = work
        try:
            fmt, path, options = self._materialise(work)
        except Exception:
            self._cleanup()
            raise
        mounts = bwrap.Mounts(model=path, model_name=path.name)
        memory = settings.PORTAL_SANDBOX_MEMORY_MB * 1024 * 1024
        limits = f"{memory},0,{64 * 1024 * 1024},256"
        host_argv = ["host", fmt, mounts.inside_model(), orjson.dumps(options).decode()]
        if remote.configured():
            try:
                parent = remote.open_host(host_argv, mounts, limits=limits,
                                          timeout=settings.PORTAL_SANDBOX_TIMEOUT_SECONDS)
            except remote.RemoteError as exc:
                self._cleanup()
                raise HostUnavailable(str(exc)) from None
            self._proc = remote.RemoteProcess(parent)
        else:
            parent = self._start_local(work, mounts, ["--limits", limits, *host_argv])
        self._sock = parent
        self._owner = os.getpid()
        self.starts += 1
        try:
            ready = self._receive(settings.PORTAL_SANDBOX_TIMEOUT_SECONDS)
        except HostUnavailable:
            self.stop()
            raise
        if not ready.get("ok"):
            error = str(ready.get("error") or "the model could not be loaded")[:MAX_ERROR_CHARS]
            self.stop()
            raise HostUnavailable(f"the model host could not load the model: {error}")
        logger.info("Model host %s started (pid %s, loaded in %s s)", self.label, getattr(self._proc, "pid", 0),
                    ready.get("load_seconds"))

    def _start_local(self, work: Path, mounts: bwrap.Mounts, argv: list[str]) -> socket.socket:
        """bubblewrap on this machine, one end of a socketpair as the host's standard input and output; its limits
        set before bubblewrap starts, in a cgroup of its own where this machine offers one."""
        limits = launch.Limits.parse(argv[1], cpu_share=settings.PORTAL_MODEL_HOST_CPU_SHARE,
                                      nice=settings.PORTAL_MODEL_HOST_NICE)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stage = bwrap.stage(mounts)  # bound from a folder that names nothing of the portal; kept while it runs
        try:
            with open(work / "stderr.log", "wb") as stderr, \
                    bwrap.prepared(argv, self._stage.mounts, tmp_mb=settings.PORTAL_SANDBOX_TMP_MB) as (command, fds):
                self._proc = launch.start(command, limits, name=f"host-{self.key}", bubblewrap=True, pass_fds=fds,
                                          spawn=_spawn, stdin=child.fileno(), stdout=child.fileno(), stderr=stderr,
                                          env=bwrap.environment(), cwd="/")
        except Exception:
            parent.close()
            self._cleanup()
            raise
        finally:
            child.close()
        self._cpu_watch = (None, self._served, 0.0)
        return parent

    def stop(self) -> None:
        proc, sock = self._proc, self._sock
        self._proc, self._sock = None, None
        if sock is not None:
            sock.close()
        if isinstance(proc, remote.RemoteProcess):
            proc.close()  # the service kills a host whose connection is gone
        elif proc is not None and self._owner == os.getpid():
            if not proc.kill():
                logger.warning("Model host %s: something of it was still there after SIGKILL", self.label)
        self._cleanup()

    def resident_bytes(self) -> int:
        """Resident memory of the sandbox's program (its init), from ``/proc``; 0 when not running here."""
        proc = self._proc
        if not isinstance(proc, launch.SandboxProcess) or self._owner != os.getpid():
            return 0
        try:
            with open(f"/proc/{proc.init_pid or proc.pid}/statm", "rb") as fh:
                return int(fh.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            return 0

    # --- the CPU budget ----------------------------------------------------------------------------------------

    def watch_cpu(self) -> float:
        """The watchdog's look, once a second: CPU seconds this host burnt while idle (no request in flight and
        none finished since the last look) beyond the idle allowance; 0 while within it. A host computes only when
        asked: one that keeps burning CPU after its answer is spinning. Costs one /proc read per look, nothing per
        request."""
        proc = self._proc
        if not isinstance(proc, launch.SandboxProcess) or self._owner != os.getpid():
            return 0.0
        used = proc.cpu_seconds()
        last_used, last_served, idle = self._cpu_watch
        if self._busy or self._served != last_served or last_used is None:
            idle = 0.0
        else:
            idle += max(0.0, used - last_used)
        self._cpu_watch = (used, self._served, idle)
        return max(0.0, idle - settings.PORTAL_MODEL_HOST_IDLE_CPU_SECONDS)

    def _cleanup(self) -> None:
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def _stderr_tail(self) -> str:
        if self._work is None:
            return ""
        try:
            with open(self._work / "stderr.log", "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 2000))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _exit_text(self) -> str:
        code = self._proc.poll() if self._proc is not None else None
        if code is not None and code < 0:
            return f"was killed by signal {-code}"
        if code is not None:
            return f"exited with status {code}"
        return "closed its connection"

    def _crashed(self, why: str) -> HostUnavailable:
        self._failures += 1
        delay = min(2.0 ** (self._failures - 1), BACKOFF_MAX_SECONDS)
        self._retry_at = time.monotonic() + delay
        tail = self._stderr_tail()
        self.last_error = why
        logger.warning("Model host %s failed (%s); restarting in %.0f s at the earliest. Its stderr ended: %r",
                       self.label, why, delay, tail[-500:])
        self.stop()
        return HostUnavailable(f"the model host {why}; it restarts within {delay:.0f} s")

    # --- requests ----------------------------------------------------------------------------------------------

    def _receive(self, timeout: float, deadline: float | None = None) -> dict[str, Any]:
        """One answer, whole, by one deadline for the request (a host that doles out a byte at a time does not
        stretch it)."""
        assert self._sock is not None
        deadline = deadline if deadline is not None else time.monotonic() + timeout
        try:
            # One read takes a small answer whole (a real-time row's), its length and body together; a longer one
            # is read on to its length. More than one answer's bytes is a host out of step with its requests.
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            first = self._sock.recv(SMALL_ANSWER_BYTES)
            if not first:
                raise EOFError("the model host closed its socket")
            if len(first) < FRAME_HEADER.size:
                first += _recv_exact(self._sock, FRAME_HEADER.size - len(first), deadline)
            (size,) = FRAME_HEADER.unpack_from(first)
            if size > MAX_ANSWER_BYTES:
                raise self._crashed(f"sent an answer of {size} bytes (at most {MAX_ANSWER_BYTES})")
            body = first[FRAME_HEADER.size:]
            if len(body) > size:
                raise self._crashed("sent more than one answer")
            if len(body) < size:
                body += _recv_exact(self._sock, size - len(body), deadline)
            answer = orjson.loads(body)
        except TimeoutError:
            raise self._crashed(f"did not answer within {timeout:.0f} s") from None
        except (EOFError, OSError):
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
            raise self._crashed(self._exit_text()) from None
        except orjson.JSONDecodeError:
            raise self._crashed("sent something that is not an answer") from None
        if not isinstance(answer, dict):
            raise self._crashed("sent something that is not an answer")
        return answer

    def _ensure_started(self) -> None:
        if self.running:
            return
        if self._proc is not None and self._owner == os.getpid():
            raise self._crashed(self._exit_text())  # died between requests: counted, backed off
        if self._proc is not None or self._sock is not None:
            self._proc, self._sock = None, None  # inherited across a fork: not ours to use or kill
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            raise HostUnavailable(f"the model host is restarting after a failure ({self.last_error}); "
                                  f"retry in {wait:.0f} s")
        try:
            self._start()
        except HostUnavailable as exc:
            if self._retry_at <= time.monotonic():  # a load that failed cleanly: back off all the same
                self._failures += 1
                self._retry_at = time.monotonic() + min(2.0 ** (self._failures - 1), BACKOFF_MAX_SECONDS)
            self.last_error = str(exc)
            raise
        except OSError as exc:
            raise self._crashed(f"could not start ({exc.strerror or exc})") from None

    def _request(self, header: dict[str, Any], payload: Any, *, timeout: float) -> dict[str, Any]:
        """One frame out, one answer back; starts the host first if it is not running."""
        starts, waited = self.starts, time.monotonic()
        if not self._lock.acquire(timeout=timeout):
            raise HostUnavailable(f"the model host is still busy with earlier requests after {timeout:.0f} s")
        self._busy = True
        try:
            self.last_used = time.monotonic()
            self._ensure_started()
            if self.starts != starts:  # started while this request waited: a cold start, not the model's latency
                cold_start_add(time.monotonic() - waited)
            encoded = orjson.dumps(header)
            assert self._sock is not None
            deadline = time.monotonic() + timeout
            try:
                self._sock.settimeout(timeout)
                if header.get("nbytes") and len(payload) <= SMALL_PAYLOAD_BYTES:
                    # One send for a small request (a real-time row): a system call less on the path people wait on
                    self._sock.sendall(b"".join((FRAME_HEADER.pack(len(encoded)), encoded, payload)))
                else:
                    self._sock.sendall(FRAME_HEADER.pack(len(encoded)) + encoded)
                    if header.get("nbytes"):
                        self._sock.settimeout(max(0.001, deadline - time.monotonic()))
                        self._sock.sendall(payload)
            except TimeoutError:
                raise self._crashed(f"did not take the request within {timeout:.0f} s") from None
            except OSError:
                raise self._crashed("closed its connection") from None
            answer = self._receive(timeout, deadline)
            if answer.get("ok"):
                self._failures = 0
            self.last_used = time.monotonic()
            return answer
        finally:
            self._busy = False
            self._served += 1
            self._lock.release()

    def predict(self, matrix: np.ndarray, columns: list[str] | None, *, timeout: float) -> list[Any]:
        """The model's predictions for the rows of a float64 matrix (pickle, joblib and skops estimators)."""
        data = np.ascontiguousarray(matrix, dtype="float64")
        answer = self._request({"op": "predict", "columns": columns, "shape": list(data.shape),
                                "nbytes": data.nbytes}, data.data.cast("B"), timeout=timeout)
        if not answer.get("ok"):
            raise HostModelError(str(answer.get("error") or "the model failed")[:MAX_ERROR_CHARS])
        predictions = answer.get("predictions")
        if not isinstance(predictions, list) or len(predictions) != data.shape[0] or not all(
                p is None or isinstance(p, (bool, int, float)) or (isinstance(p, str) and len(p) <= MAX_LABEL_CHARS)
                for p in predictions):
            with self._lock:
                raise self._crashed(f"answered {len(predictions) if isinstance(predictions, list) else 'no'} "
                                    f"predictions for {data.shape[0]} rows")
        return predictions

    def predict_frame(self, matrix: np.ndarray, columns: list[str], kinds: list[str], *,
                      timeout: float) -> list[Any]:
        """Rows of a numeric column signature (a float64 matrix in its order; ``kinds`` its column types, which the
        host checks against the model's own) answered as MLflow's scoring server answers them, by the estimator
        itself (``child._FrameScorer``): the answer's ``predictions``, checked as ``predict`` checks them.
        ``FrameDeclined`` when the host cannot be certain of MLflow's answer; once it says it never can (the model
        is not of that kind), every later call declines here without asking it."""
        if self.frames_declined:
            raise FrameDeclined(self.frames_declined, permanent=True)
        data = np.ascontiguousarray(matrix, dtype="float64")
        answer = self._request({"op": "frame", "columns": columns, "kinds": kinds, "shape": list(data.shape),
                                "nbytes": data.nbytes}, data.data.cast("B"), timeout=timeout)
        if not answer.get("ok"):
            why = str(answer.get("decline") or answer.get("error") or "the host declined")[:MAX_ERROR_CHARS]
            if answer.get("permanent") is True:
                self.frames_declined = why
            raise FrameDeclined(why, permanent=bool(self.frames_declined))
        if answer.get("frame") is not True:  # a host program older than frames answered it as ``predict``
            self.frames_declined = "the model host does not answer frames"
            raise FrameDeclined(self.frames_declined, permanent=True)
        predictions = answer.get("predictions")
        if not isinstance(predictions, list) or len(predictions) != data.shape[0] or not all(
                isinstance(p, (bool, int, float)) or (isinstance(p, str) and len(p) <= MAX_LABEL_CHARS)
                for p in predictions):
            with self._lock:
                raise self._crashed(f"answered {len(predictions) if isinstance(predictions, list) else 'no'} "
                                    f"predictions for {data.shape[0]} rows")
        return predictions

    def invoke(self, body: bytes, content_type: str, *, timeout: float) -> Invocation:
        """A scoring request answered by MLflow's own scoring code inside the sandbox (MLflow models)."""
        answer = self._request({"op": "invoke", "content_type": content_type, "nbytes": len(body)}, body,
                               timeout=timeout)
        if not answer.get("ok"):
            raise HostModelError(str(answer.get("error") or "the model failed")[:MAX_ERROR_CHARS])
        status, text = answer.get("status"), answer.get("body")
        columns, rows, count = answer.get("columns"), answer.get("rows"), answer.get("count")
        if (not isinstance(status, int) or not 200 <= status <= 599 or not isinstance(text, str)
                or not isinstance(count, int) or not 0 <= count <= MAX_ROWS
                or (isinstance(rows, list) and (len(rows) != count or not all(isinstance(r, list) for r in rows)))
                or not (columns is None or (isinstance(columns, list) and all(isinstance(c, str) for c in columns)))
                or not (rows is None or isinstance(rows, list))):
            with self._lock:
                raise self._crashed("sent an answer that does not have the shape of one")
        model_error = answer.get("model_error")
        return Invocation(status=status, body=text, columns=columns, rows=rows, count=count,
                          model_error=model_error[:MAX_ERROR_CHARS] if isinstance(model_error, str) else "")


    def explain(self, matrix: np.ndarray, background: np.ndarray | None, columns: list[str] | None, *,
                budget: float, timeout: float) -> dict[str, Any]:
        """SHAP attributions for the rows of a float64 matrix, computed by the host (the model is a program):
        the rows and the background rows go as one payload; the answer is checked for shape (one prediction,
        output, base value and a number per feature for every row) before anything reads it."""
        data = np.ascontiguousarray(matrix, dtype="float64")
        back = np.ascontiguousarray(background if background is not None else np.empty((0, data.shape[1])),
                                    dtype="float64")
        payload = data.tobytes() + back.tobytes()
        answer = self._request({"op": "explain", "columns": columns, "shape": list(data.shape),
                                "background_shape": list(back.shape), "budget_seconds": budget,
                                "nbytes": len(payload)}, payload, timeout=timeout)
        if not answer.get("ok"):
            error = str(answer.get("error") or "the explainer failed")[:MAX_ERROR_CHARS]
            if answer.get("no_explainer"):
                raise NoExplainer(error)
            if answer.get("over_budget"):
                raise ExplainOverBudget(error)
            raise HostModelError(error)
        n, width = data.shape
        rows, predictions = answer.get("rows"), answer.get("predictions")

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        well_formed = (
            isinstance(rows, list) and len(rows) == n and isinstance(predictions, list) and len(predictions) == n
            and all(p is None or isinstance(p, (bool, int, float)) or (isinstance(p, str) and len(p) <= MAX_LABEL_CHARS)
                    for p in predictions)
            and all(isinstance(r, dict) and number(r.get("output")) and number(r.get("base_value"))
                    and isinstance(r.get("attributions"), list) and len(r["attributions"]) == width
                    and all(number(v) for v in r["attributions"])
                    and (r.get("class") is None or isinstance(r.get("class"), (bool, int, float, str)))
                    for r in rows)
            and all(isinstance(answer.get(k), str) for k in ("method", "output"))
            and isinstance(answer.get("approximate"), bool))
        if not well_formed:
            with self._lock:
                raise self._crashed("sent an explanation that does not have the shape of one")
        return answer


@dataclass
class Invocation:
    status: int
    body: str
    columns: list[str] | None
    rows: list[Any] | None
    count: int
    model_error: str = ""  # the model raised (MLflow answers 400 for it): its exception's last line, for the log


class HostPool:
    """The model hosts this process has started, bounded in number and reaped when idle."""

    def __init__(self) -> None:
        self._hosts: OrderedDict[str, ModelHost] = OrderedDict()
        self._lock = threading.Lock()
        self._reaper_pid = 0

    def get(self, key: str, materialise: Materialise, *, label: str) -> ModelHost:
        with self._lock:
            self._ensure_reaper()
            host = self._hosts.get(key)
            if host is None:
                host = ModelHost(key, materialise, label=label)
                self._hosts[key] = host
            self._hosts.move_to_end(key)
            running = [h for h in self._hosts.values() if h.running and h is not host]
            excess = len(running) + 1 - settings.PORTAL_MODEL_HOSTS_PER_PROCESS
            for victim in running:
                if excess <= 0:
                    break
                # Least recently used first, never one with a request inside it (that one holds its lock): a
                # busy host is passed over, and the process holds one host more until a request finishes.
                if victim._lock.acquire(blocking=False):
                    try:
                        logger.info("Stopping model host %s: this process holds its maximum of hosts", victim.label)
                        victim.stop()
                        excess -= 1
                    finally:
                        victim._lock.release()
            return host

    def stop_idle(self, key: str) -> bool:
        """Stop the host ``key`` unless a request is inside it (True: stopped, or not running). It stays known
        to the pool, so a caller that still holds it starts it again, counted and reaped as any other."""
        with self._lock:
            host = self._hosts.get(key)
        if host is None or not host.running:
            return True
        if not host._lock.acquire(blocking=False):
            return False
        try:
            host.stop()
        finally:
            host._lock.release()
        return True

    def resident_bytes(self, key: str) -> int:
        """The resident memory of the host ``key``'s sandbox on this machine (0: not running, or a remote one)."""
        host = self._hosts.get(key)
        return host.resident_bytes() if host is not None else 0

    def release(self, key: str) -> None:
        with self._lock:
            host = self._hosts.pop(key, None)
        if host is not None:
            host.stop()

    def reap(self, idle_seconds: float | None = None) -> int:
        idle = settings.PORTAL_MODEL_HOST_IDLE_SECONDS if idle_seconds is None else idle_seconds
        now = time.monotonic()
        with self._lock:
            stale = [h for h in self._hosts.values() if h.running and now - h.last_used > idle]
        for host in stale:
            if host._lock.acquire(blocking=False):
                try:
                    logger.info("Stopping model host %s: idle for %.0f s", host.label, now - host.last_used)
                    host.stop()
                finally:
                    host._lock.release()
        return len(stale)

    def police_cpu(self) -> int:
        """Stop every host that kept computing after its last answer beyond its idle CPU allowance (counted as a
        crash: its callers get 503 and it restarts with backoff). The number stopped."""
        with self._lock:
            hosts = [h for h in self._hosts.values() if h.running]
        stopped = 0
        for host in hosts:
            excess = host.watch_cpu()
            if excess <= 0 or not host._lock.acquire(blocking=False):
                continue
            try:
                if host.running and not host._busy and host._served == host._cpu_watch[1]:
                    allowance = settings.PORTAL_MODEL_HOST_IDLE_CPU_SECONDS
                    host._crashed(f"kept using CPU after its last answer ({excess + allowance:.1f} s beyond an "
                                  f"allowance of {allowance} s) and was stopped")
                    stopped += 1
            finally:
                host._lock.release()
        return stopped

    def stop_all(self) -> None:
        with self._lock:
            hosts = list(self._hosts.values())
            self._hosts.clear()
        for host in hosts:
            host.stop()

    def _ensure_reaper(self) -> None:
        if self._reaper_pid == os.getpid():
            return
        self._reaper_pid = os.getpid()

        def loop() -> None:
            while True:
                time.sleep(max(5.0, min(60.0, settings.PORTAL_MODEL_HOST_IDLE_SECONDS / 4)))
                try:
                    self.reap()
                except Exception:  # the reaper must outlive any one failure
                    logger.exception("Reaping idle model hosts failed")

        def watchdog() -> None:
            while True:
                time.sleep(CPU_WATCH_SECONDS)
                try:
                    self.police_cpu()
                except Exception:  # the watchdog must outlive any one failure
                    logger.exception("Watching model hosts' CPU failed")

        threading.Thread(target=loop, name="model-host-reaper", daemon=True).start()
        threading.Thread(target=watchdog, name="model-host-cpu-watchdog", daemon=True).start()


pool = HostPool()
atexit.register(pool.stop_all)
