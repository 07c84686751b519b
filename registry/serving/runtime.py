"""What a web worker keeps in memory to answer predictions: serving forms and each environment's routing.

A serving form is either an ONNX session in this process (the fast path: onnxruntime runs no code from the file)
or a client of a sandboxed model host (``registry.sandbox.hosts``) for any artifact whose loader can run code:
this process never unpickles, imports or executes an uploaded artifact.

Routing is re-read from the database at most every ``REFRESH_SECONDS`` per (model, environment), by comparing the
environment's ``generation``; a traffic switch is therefore picked up within a second, without a restart. A new
version is loaded before the routing points at it, so requests keep being answered by the old one meanwhile.

Many models share a process: forms load on first use and the least recently used idle ones are evicted past the
process's memory budget (``ServingCache``); every cold load is timed for the deployment page.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import os
import random
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db import DatabaseError, transaction

from registry import storage
from registry.models import ColdLoad, Deployment, EnvironmentState, ModelVersion, ServingMode, TrustState
from registry.sandbox import hosts
from registry.scanning.archive import extract_zip
from registry.scanning.onnxgraph import IN_PROCESS_OPERATORS, QUANTIZATION_OPERATORS, OnnxSandboxOnly, checked_onnx

logger = logging.getLogger(__name__)
REFRESH_SECONDS = 0.5
STALE_SECONDS = 300.0  # how long a route read before a database outage keeps serving during it
COLD_LOADS_KEPT = 100  # a deployment's most recent cold loads kept for its page
# What one in-process session holds besides its graph's weights: bench/density.py measured about 90 KB of RSS per
# loaded session of a 1 KB logistic regression (300 sessions in one process).
ONNX_SESSION_BYTES = 96 * 1024


class ScoringLimit(Exception):
    """A request stopped by a limit of the in-process path (``status``, the contract's ``code``, MLflow's code)."""

    status = 504
    code = "deadline_exceeded"
    mlflow_code = "DEADLINE_EXCEEDED"


class DeadlineExceeded(ScoringLimit):
    pass


class MemoryCeiling(ScoringLimit):
    status = 503
    code = "resource_limit_exceeded"
    mlflow_code = "RESOURCE_LIMIT_EXCEEDED"


class LoadedModel:
    """A serving form as the scoring view, batch workers and deployment warm-up use it. ``kind``: ``onnx`` (in
    this process), ``native`` (a sandboxed host fed float64 matrices) or ``mlflow`` (a sandboxed host that answers
    whole requests with MLflow's own scoring code, ``invoke``).

    ``slots`` is its bulkhead in this process: at most ``in_flight`` scoring requests at a time (in-process and
    hosted forms have their own limits, ``PORTAL_SERVE_IN_FLIGHT_IN_PROCESS`` and ``PORTAL_SERVE_IN_FLIGHT_HOSTED``);
    the scoring view answers the excess with a 503 rather than queueing it behind a slow model (``enter``: at once
    when the version is making no progress, after ``PORTAL_SERVE_QUEUE_MS`` at most when it is)."""

    def __init__(self, *, version_number: int, columns: list[str], predict_fn: Any, kind: str,
                 close: Any = None, invoke_fn: Any = None, named: bool = False,
                 params: list[dict[str, Any]] | None = None, tensor: bool = False,
                 missing_values: bool = False, explain_fn: Any = None, frame_fn: Any = None,
                 frame_kinds: list[str] | None = None, answers_empty: bool = False, resident_fn: Any = None,
                 evict_fn: Any = None) -> None:
        self.version_number = version_number
        self._resident = resident_fn
        self._evict = evict_fn
        self.loaded_at = time.monotonic()
        # A request of no rows: the model answers an empty list (XGBoost, LightGBM), or refuses it (scikit-learn),
        # as MLflow's server does; only the in-process form needs telling (a host runs MLflow's own code)
        self.answers_empty = answers_empty
        # An MLflow model's host may answer a numeric request's rows as MLflow's server would, from one matrix
        # (``predict_frame``); ``frame_kinds``: the signature's column types (double, long) that makes possible.
        self._frame = frame_fn if frame_kinds else None
        self.frame_kinds = frame_kinds or []
        self._explain = explain_fn
        # The ONNX form was proven on rows with missing values: NaN (JSON null) passes to it, as MLflow passes it
        self.missing_values = missing_values
        self.columns = columns
        self.named = named  # a column signature: requests must name their columns, as MLflow requires
        self.tensor = tensor  # an MLflow tensor signature: MLflow's server refuses some request forms for it
        self.params = params or []  # the signature's ParamSchema, checked as MLflow checks it
        self._predict = predict_fn
        self._invoke = invoke_fn
        self._close = close
        self.kind = kind
        self.in_flight = (settings.PORTAL_SERVE_IN_FLIGHT_IN_PROCESS if kind == "onnx"
                          else settings.PORTAL_SERVE_IN_FLIGHT_HOSTED)
        self.slots = threading.BoundedSemaphore(self.in_flight)
        self.last_exit = 0.0  # monotonic time a request of this version last left its slot
        # Explanations have a bulkhead of their own (and a host of their own, ``load_serving_model``): a burst of
        # explain requests, each up to a budget of seconds, never takes a scoring slot nor waits in front of scoring.
        self.explain_in_flight = settings.PORTAL_EXPLAIN_IN_FLIGHT
        self.explain_slots = threading.BoundedSemaphore(self.explain_in_flight)

    PROGRESS_SECONDS = 1.0

    def enter(self) -> bool:
        """A slot of this version's bulkhead (give it back with ``leave``). Free: taken at once. All taken: waited
        for, up to ``PORTAL_SERVE_QUEUE_MS``, only while one of this version's requests finished within the last
        ``PROGRESS_SECONDS``; slots held by requests that do not finish are a hang, and the request is refused at
        once, so a hung model never holds more of a worker's threads than its slots (and a second at most)."""
        if self.slots.acquire(blocking=False):
            return True
        wait = settings.PORTAL_SERVE_QUEUE_MS / 1000
        if not wait or time.monotonic() - self.last_exit > self.PROGRESS_SECONDS:
            return False
        return self.slots.acquire(timeout=wait)

    def leave(self) -> None:
        self.last_exit = time.monotonic()
        self.slots.release()

    def explain_enter(self) -> bool:
        """A slot of this version's explain bulkhead, taken at once or not at all (give it back with
        ``explain_leave``): an explanation runs for up to its budget, so a caller is told to come back rather than
        queued behind one."""
        return self.explain_slots.acquire(blocking=False)

    def explain_leave(self) -> None:
        self.explain_slots.release()

    @property
    def busy(self) -> bool:
        """A request (or a shadow copy) is inside this form in this process: one of its slots is taken."""
        return self.slots._value < self.in_flight

    @property
    def last_used(self) -> float:
        return max(self.last_exit, self.loaded_at)

    def resident_bytes(self) -> int:
        """What this form holds in memory on this machine: the ONNX session's estimate taken when it was loaded,
        or its sandboxed host's resident memory now (0 while the host is not running)."""
        return int(self._resident()) if self._resident is not None else 0

    def evict(self) -> bool:
        """Let the memory go unless a request is inside: an ONNX session is dropped with the last reference to it
        (a request that still holds it finishes on it), a sandboxed host is stopped only while idle. True once
        nothing of it is running that a request needs."""
        return bool(self._evict()) if self._evict is not None else True

    @property
    def answers_requests(self) -> bool:
        return self._invoke is not None

    def invoke(self, body: bytes, content_type: str, *, timeout: float | None = None) -> hosts.Invocation:
        """``timeout``: the longest wait for the host (a real-time request's deadline); None: the batch one."""
        assert self._invoke is not None
        invocation: hosts.Invocation = self._invoke(body, content_type, timeout)
        return invocation

    @property
    def takes_frames(self) -> bool:
        return self._frame is not None

    def predict_frame(self, matrix: np.ndarray, *, timeout: float | None = None) -> list[Any]:
        """Rows of the numeric column signature (a float64 matrix in its order) answered as MLflow's scoring server
        answers them, by the estimator in the version's host (``hosts.ModelHost.predict_frame``). Raises
        ``hosts.FrameDeclined`` where the host cannot be certain of that answer; once it never can, this form stops
        offering (``takes_frames``)."""
        if self._frame is None:
            raise hosts.FrameDeclined("this serving form is not an MLflow model's host", permanent=True)
        try:
            result: list[Any] = self._frame(matrix, timeout)
        except hosts.FrameDeclined as exc:
            if exc.permanent:
                self._frame = None
            raise
        return result

    def predict(self, matrix: np.ndarray, columns: list[str] | None = None, *,
                timeout: float | None = None) -> list[Any]:
        """``timeout``: a real-time request's deadline (``PORTAL_SCORING_TIMEOUT_SECONDS``); None for batch and
        warm-up, which get ``PORTAL_MODEL_HOST_TIMEOUT_SECONDS``. Either way plus a second per 1,000 rows."""
        result = self._predict(matrix, timeout)
        if isinstance(result, list):
            return result
        return np.asarray(result).ravel().tolist()

    def explain(self, matrix: np.ndarray, background: np.ndarray | None, columns: list[str] | None, *,
                budget: float) -> dict[str, Any]:
        """SHAP attributions for ``matrix`` from a sandboxed host of the version's own (never the one scoring:
        a host answers one request at a time, and an explanation must not hold scoring up), started on the first
        explain and reaped when idle like any host: the model's explainer runs only there. Bounded by ``budget`` (the model-agnostic explainer's) plus
        ``PORTAL_EXPLAIN_TIMEOUT_SECONDS`` and a second per 1,000 rows, after which the host is killed."""
        if self._explain is None:
            raise hosts.NoExplainer("this serving form has no sandboxed host to explain it")
        timeout = budget + settings.PORTAL_EXPLAIN_TIMEOUT_SECONDS + matrix.shape[0] / 1000
        result: dict[str, Any] = self._explain(matrix, background, columns, budget, timeout)
        return result

    def close(self) -> None:
        """Stop what serves this form (a sandboxed model host); an in-process ONNX session just goes."""
        if self._close is not None:
            self._close()


def _deadline_seconds(timeout: float | None, rows: int) -> float:
    return float(timeout or settings.PORTAL_MODEL_HOST_TIMEOUT_SECONDS) + rows / 1000


class _Watchdog:
    """One thread per process that sets ``RunOptions.terminate`` on runs past their deadline: onnxruntime checks
    the flag between operators (and inside Loop and Scan), so a run ends within one operator's time of it. Arming
    costs a heap push, not a thread per request."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[list[Any]] = []
        self._count = itertools.count()
        self._pid = 0

    def arm(self, deadline: float, run_options: Any) -> list[Any]:
        entry = [deadline, next(self._count), run_options, True]
        with self._cond:
            if self._pid != os.getpid():  # first use in this process (a forked worker has no thread of ours)
                self._pid = os.getpid()
                self._heap.clear()
                threading.Thread(target=self._loop, name="onnx-deadlines", daemon=True).start()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
        return entry

    @staticmethod
    def disarm(entry: list[Any]) -> None:
        entry[3] = False

    def _loop(self) -> None:
        with self._cond:
            while True:
                while self._heap and not self._heap[0][3]:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                entry = heapq.heappop(self._heap)
                if entry[3]:
                    entry[2].terminate = True


_watchdog = _Watchdog()
_arena_lock = threading.Lock()
_arena_pid = 0


def _onnx_options() -> Any:
    """Session options of the in-process path: one thread, ONNX format only (never onnxruntime's own format from
    bytes), and this process's shared CPU arena capped at ``PORTAL_ONNX_MEMORY_MB`` (onnxruntime's ``OrtArenaCfg``
    ``max_mem``), registered once per process: a run that would need more fails instead of growing the worker."""
    import onnxruntime

    global _arena_pid
    with _arena_lock:
        if _arena_pid != os.getpid():
            cap = settings.PORTAL_ONNX_MEMORY_MB * 1024 * 1024
            info = onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                             onnxruntime.OrtMemType.DEFAULT)
            # max_mem, extend strategy 1 (only what is asked for), default initial chunk and dead bytes per chunk
            onnxruntime.create_and_register_allocator(info, onnxruntime.OrtArenaCfg(cap, 1, -1, -1))
            _arena_pid = os.getpid()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # failures come back as exceptions; not one log line per refused run
    options.add_session_config_entry("session.load_model_format", "ONNX")
    options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def _onnx_predictor(path: Path, *, allowed: frozenset[tuple[str, str]] = IN_PROCESS_OPERATORS) -> Any:
    """An in-process session over a private copy of the graph: the verified file read into memory, checked
    (``checked_onnx``: no tensor may keep its data in another file, the operators those of the converters), and
    handed to onnxruntime as bytes, so no path, and no folder of other files, is ever onnxruntime's to read from.
    Each run is bounded: ``PORTAL_ONNX_MAX_ROWS_PER_RUN`` rows at a time, the arena cap, and a deadline."""
    import onnxruntime

    data = path.read_bytes()
    before = _rss_bytes()
    review = checked_onnx(data)
    reasons = review.reasons_beyond(allowed)
    if reasons:
        raise OnnxSandboxOnly("the graph runs only in a sandboxed model host: it uses " + "; ".join(reasons))
    del review
    session = onnxruntime.InferenceSession(data, sess_options=_onnx_options(), providers=["CPUExecutionProvider"])
    # An estimate, taken where loads are one at a time (the serving cache's lock): what the process grew by while
    # the session was built, and at least what a session of this graph holds (the graph's weights, about twice
    # over once placed, plus the session's own structures): the growth alone reads 0 when freed memory is reused.
    resident = max(_rss_bytes() - before, 2 * len(data) + ONNX_SESSION_BYTES)
    del data
    first = session.get_inputs()[0]
    dtype = np.float32 if first.type == "tensor(float)" else np.float64
    name = first.name
    output = session.get_outputs()[0].name
    step = settings.PORTAL_ONNX_MAX_ROWS_PER_RUN

    def run(feed: np.ndarray, deadline: float) -> np.ndarray:
        options = onnxruntime.RunOptions()
        entry = _watchdog.arm(deadline, options)
        try:
            return np.asarray(session.run([output], {name: feed}, options)[0])
        except Exception as exc:
            text = str(exc)
            if options.terminate or "terminate flag" in text:
                raise DeadlineExceeded("the model did not answer within the scoring deadline") from None
            if "Available memory of" in text or "bad_alloc" in text:
                raise MemoryCeiling(f"scoring these rows needed more memory than the in-process limit "
                                    f"({settings.PORTAL_ONNX_MEMORY_MB} MB) allows; send fewer rows") from None
            raise
        finally:
            _watchdog.disarm(entry)

    def predict(matrix: np.ndarray, timeout: float | None = None) -> Any:
        feed = matrix.astype(dtype, copy=False)
        deadline = time.monotonic() + _deadline_seconds(timeout, feed.shape[0])
        if feed.shape[0] <= step:
            return run(feed, deadline)
        parts = [run(feed[i:i + step], deadline) for i in range(0, feed.shape[0], step)]
        return np.concatenate([p.reshape(p.shape[0], -1) if p.ndim > 1 else p for p in parts])

    predict.metadata = dict(session.get_modelmeta().custom_metadata_map)  # type: ignore[attr-defined]
    predict.resident_bytes = resident  # type: ignore[attr-defined]
    return predict


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def load_onnx_predictor(path: Path, *, quantized: bool = False) -> Any:
    """The in-process ONNX predictor a web worker serves with, for a deployment to prove the form on probe rows
    before it serves (``registry.deployments.services._prove``). ``quantized``: also the operators of onnxruntime's
    dynamic quantization, for an int8 form the portal made itself from a proven one (an edge package's), measured
    here under the same deadline and memory cap; never a serving form."""
    return _onnx_predictor(path, allowed=IN_PROCESS_OPERATORS | QUANTIZATION_OPERATORS if quantized
                           else IN_PROCESS_OPERATORS)


def materialiser(version: ModelVersion) -> hosts.Materialise:
    """What a model host loads: the verified artifact linked (or copied) into the host's own folder, an MLflow
    archive unpacked there. Called at every (re)start, so a host never depends on a file someone else cleans up."""
    blob = version.artifact
    fmt = version.format
    trusted = version.untrusted_types if version.trust_state == TrustState.TRUSTED else []
    assert blob is not None

    def materialise(work: Path) -> tuple[str, Path, dict[str, Any]]:
        with storage.verified_local_path(blob) as path:
            if fmt == "mlflow":
                target = work / "model"
                extract_zip(path, target)
                mlmodel = next(p for p in target.rglob("MLmodel") if len(p.relative_to(target).parts) <= 2)
                return fmt, mlmodel.parent, {"trusted_types": trusted}
            local = work / f"model.{fmt}"
            try:
                os.link(path, local)
            except OSError:
                shutil.copyfile(path, local)
        return fmt, local, {"trusted_types": trusted}

    return materialise


def _hosted(key: str, version: ModelVersion, columns: list[str],
            on_start: Any = None) -> tuple[Any, Any, Any, Any]:
    """Predict, invoke, predict_frame and close through the version's sandboxed model host; the artifact is never
    loaded in this process. The host starts on first use; ``on_start(seconds)`` hears of each start (a cold load)."""
    label = f"{key} (version {version.number}, {version.format})"
    materialise = materialiser(version)

    def started(host: hosts.ModelHost, starts: int, began: float) -> None:
        if on_start is not None and host.starts != starts:
            on_start(time.monotonic() - began)

    def predict(matrix: np.ndarray, timeout: float | None = None) -> list[Any]:
        host = hosts.pool.get(key, materialise, label=label)
        starts, began = host.starts, time.monotonic()
        try:
            return host.predict(matrix, columns or None, timeout=_deadline_seconds(timeout, matrix.shape[0]))
        finally:
            started(host, starts, began)

    def invoke(body: bytes, content_type: str, timeout: float | None = None) -> hosts.Invocation:
        host = hosts.pool.get(key, materialise, label=label)
        starts, began = host.starts, time.monotonic()
        try:
            return host.invoke(body, content_type, timeout=_deadline_seconds(timeout, 0) + len(body) / 100_000)
        finally:
            started(host, starts, began)

    kinds = frame_kinds(version) or []

    def frame(matrix: np.ndarray, timeout: float | None = None) -> list[Any]:
        host = hosts.pool.get(key, materialise, label=label)
        starts, began = host.starts, time.monotonic()
        try:
            return host.predict_frame(matrix, columns, kinds, timeout=_deadline_seconds(timeout, matrix.shape[0]))
        finally:
            started(host, starts, began)

    return predict, invoke, frame, lambda: hosts.pool.release(key)


def _explainer_host(key: str, version: ModelVersion) -> Any:
    """Explain through the version's sandboxed host ``key`` (started on first use)."""
    label = f"{key} (version {version.number}, {version.format})"
    materialise = materialiser(version)

    def explain(matrix: np.ndarray, background: np.ndarray | None, columns: list[str] | None, budget: float,
                timeout: float) -> dict[str, Any]:
        host = hosts.pool.get(key, materialise, label=label)
        return host.explain(matrix, background, columns, budget=budget, timeout=timeout)

    return explain


def load_serving_model(*, version: ModelVersion, kind: str, blob: Any, key: str | None = None,
                       on_start: Any = None) -> LoadedModel:
    """The serving form: an ONNX session in this process (onnxruntime runs no code from the file), or a client of
    a sandboxed model host for every other artifact. ``key`` names the host (one per deployment and process);
    ``on_start(seconds)`` hears of each start of that host."""
    columns = named_inputs(version)
    close = invoke = frame = None
    missing_values = answers_empty = False
    if kind == "onnx":
        with storage.verified_local_path(blob) as path:
            try:
                predictor = _onnx_predictor(path)
            except OnnxSandboxOnly as exc:
                # A form deployed before the in-process path had its allowlist: a sandboxed host serves the
                # version instead (the graph itself for an ONNX upload, the original artifact otherwise).
                logger.warning("Version %s of model %s: %s; serving it from a sandboxed model host",
                               version.number, version.model_id, exc)
                kind = "mlflow" if version.format == "mlflow" else "native"
        if kind == "onnx":
            missing_values = getattr(predictor, "metadata", {}).get("portal.missing_values") == "true"
            answers_empty = getattr(predictor, "metadata", {}).get("portal.empty_rows") == "answers"
    key = key or f"version-{version.pk}-{os.urandom(4).hex()}"
    explain = None
    # Explained by a sandboxed host of its own (of the original artifact, also for a form served in-process from
    # ONNX): the scoring host answers one request at a time and never waits behind an explanation.
    explain_key = f"{key}-explain"
    if kind != "onnx":
        assert version.artifact is not None
        predictor, invoke, frame, close_scoring = _hosted(key, version, columns, on_start)
        explain = _explainer_host(explain_key, version)

        def close_both() -> None:
            close_scoring()
            hosts.pool.release(explain_key)

        close = close_both
        host_keys: tuple[str, ...] = (key, explain_key)
        resident: Any = lambda: sum(hosts.pool.resident_bytes(k) for k in host_keys)  # noqa: E731
    else:
        size = int(getattr(predictor, "resident_bytes", 0))
        host_keys = (explain_key,)
        resident = lambda: size + hosts.pool.resident_bytes(explain_key)  # noqa: E731 - its explainer's host too
        if version.artifact is not None:
            explain = _explainer_host(explain_key, version)
            close = lambda: hosts.pool.release(explain_key)  # noqa: E731
    return LoadedModel(version_number=version.number, columns=columns or input_columns(version),
                       predict_fn=predictor, kind=kind, close=close,
                       invoke_fn=invoke if kind == "mlflow" else None,
                       named=bool(columns) and version.format == "mlflow" and not inferred_signature(version),
                       params=param_specs(version),
                       missing_values=missing_values, explain_fn=explain, answers_empty=answers_empty,
                       frame_fn=frame if kind == "mlflow" else None,
                       frame_kinds=frame_kinds(version) if kind == "mlflow" else None,
                       resident_fn=resident, evict_fn=lambda: all([hosts.pool.stop_idle(k) for k in host_keys]),
                       tensor=version.format == "mlflow" and any(isinstance(c, dict) and c.get("type") == "tensor"
                                                                 for c in version.signature.get("inputs") or []))


def frame_kinds(version: ModelVersion) -> list[str] | None:
    """The column types of a signature of required ``double`` and ``long`` columns only (whose rows a request can
    carry as one float64 matrix, see ``protocol.numeric_rows``), in its order; None for any other signature, or a
    version whose signature the portal inferred (never enforced, so MLflow reads its requests otherwise)."""
    inputs = (version.signature or {}).get("inputs") or []
    if inferred_signature(version) or not inputs:
        return None
    kinds = []
    for column in inputs:
        if not isinstance(column, dict) or not column.get("name") or column.get("required", True) is not True \
                or column.get("type") not in ("double", "long"):
            return None
        kinds.append(str(column["type"]))
    return kinds


def inferred_signature(version: ModelVersion) -> bool:
    """The version came without a signature and the portal inferred one (for monitoring and batch files): it is
    never enforced on requests, as MLflow enforces none."""
    return (version.signature or {}).get("inferred_by") == "portal"


def positional_inputs(version: ModelVersion) -> bool:
    """The model takes its inputs by position: a tensor signature, or names the portal made up (f0, f1…). A file or
    request then brings its own column names, used in the order given."""
    return bool((version.signature or {}).get("positional")) or not named_inputs(version)


def named_inputs(version: ModelVersion) -> list[str]:
    """A column signature's names (an MLflow tensor spec, or a bare ONNX graph's input with its ``shape``, may be
    named too, but its name is not a column)."""
    return [c["name"] for c in version.signature.get("inputs", [])
            if isinstance(c, dict) and c.get("name") and c.get("type") != "tensor" and "shape" not in c]


def input_columns(version: ModelVersion) -> list[str]:
    """The columns a request must carry, in the model's order: the signature's names, or ``f0``… for a tensor
    signature (a bare ONNX upload), whose width is the tensor's second dimension."""
    columns = named_inputs(version)
    if not columns:
        first = (version.signature.get("inputs") or [{}])[0]
        shape = (first.get("shape") or (first.get("tensor-spec") or {}).get("shape") or []) \
            if isinstance(first, dict) else []
        columns = [f"f{i}" for i in range(shape[1])] if len(shape) > 1 and isinstance(shape[1], int) \
            and shape[1] > 0 else []
    return columns


def param_specs(version: ModelVersion) -> list[dict[str, Any]]:
    """The signature's ParamSchema (MLflow's ``params``): name, type, default and shape of each."""
    params = (version.signature or {}).get("params") or []
    return [p for p in params if isinstance(p, dict) and p.get("name")] if isinstance(params, list) else []


@dataclass
class Route:
    generation: int
    champion: tuple[Deployment, LoadedModel] | None
    challenger: tuple[Deployment, LoadedModel] | None
    mode: str
    challenger_percent: int
    checked_at: float

    @property
    def answers_requests(self) -> bool:
        """Whether a side is answered whole by MLflow's scoring code (the request is then not parsed here)."""
        return any(side is not None and side[1].answers_requests for side in (self.champion, self.challenger))

    def pick(self, key: str | None) -> tuple[str, Deployment, LoadedModel]:
        """Champion or canary for this request: sticky by ``key`` (same key, same side), random without one."""
        assert self.champion is not None
        if self.mode == ServingMode.CANARY and self.challenger is not None:
            if key:
                bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=2).digest(), "big") % 100
            else:
                bucket = random.randrange(100)  # noqa: S311 - traffic splitting, not security
            if bucket < self.challenger_percent:
                return "canary", *self.challenger
        return "champion", *self.champion


class ServingCache:
    """The serving forms this process has loaded, and each (model, environment)'s route to them.

    Forms load on first use and stay while the process's memory budget (``PORTAL_SERVE_MEMORY_MB``: ONNX sessions'
    estimates plus their sandboxed hosts' resident memory) holds them; past it, the least recently used are
    evicted, never one with a request inside it (``LoadedModel.busy``) and never the one just loaded. An evicted
    form's routes are forgotten, so its next request loads it again: a cold load, timed, recorded for the
    deployment page (``ColdLoad``) and left out of the live latency, as every cold start is."""

    def __init__(self) -> None:
        self._routes: dict[tuple[int, str], Route] = {}
        self._models: OrderedDict[int, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def clear(self) -> None:
        with self._lock:
            self._routes.clear()
            models = list(self._models.values())
            self._models.clear()
        for loaded in models:
            loaded.close()

    def loaded(self, deployment: Deployment) -> LoadedModel:
        """The deployment's serving form, loaded once per process (batch workers use the one web workers use)."""
        with self._lock:
            return self._loaded(deployment)

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(m.resident_bytes() for m in self._models.values())

    def _loaded(self, deployment: Deployment, *, enforce: bool = True) -> LoadedModel:
        cached = self._models.get(deployment.pk)
        if cached is not None:
            self._models.move_to_end(deployment.pk)
            return cached
        began = time.monotonic()
        kind = deployment.serving_kind or "native"

        def host_started(seconds: float) -> None:
            _record_cold_load(deployment.pk, seconds, "mlflow" if kind == "mlflow" else "native",
                              hosts.pool.resident_bytes(f"deployment-{deployment.pk}"))
            self.enforce_budget()

        loaded = load_serving_model(version=deployment.version, kind=kind, blob=deployment.serving_blob,
                                    key=f"deployment-{deployment.pk}", on_start=host_started)
        seconds = time.monotonic() - began
        hosts.cold_start_add(seconds)  # an ONNX session loaded for this request: a cold start
        self._models[deployment.pk] = loaded
        if loaded.kind == "onnx":
            _record_cold_load(deployment.pk, seconds, "onnx", loaded.resident_bytes())
        if enforce:
            self._enforce_budget(keep=(loaded,))
        return loaded

    def enforce_budget(self) -> int:
        with self._lock:
            return self._enforce_budget(keep=())

    def _enforce_budget(self, *, keep: tuple[LoadedModel, ...]) -> int:
        """Evict least recently used forms until the process is within its budget; the number evicted."""
        budget = settings.PORTAL_SERVE_MEMORY_MB * 1024 * 1024
        sizes = {pk: m.resident_bytes() for pk, m in self._models.items()}
        total = sum(sizes.values())
        if total <= budget and len(self._models) <= settings.PORTAL_SERVE_MAX_LOADED:
            return 0
        evicted = 0
        for pk, loaded in sorted(self._models.items(), key=lambda item: item[1].last_used):
            if total <= budget and len(self._models) <= settings.PORTAL_SERVE_MAX_LOADED:
                break
            if any(loaded is k for k in keep) or loaded.busy or not loaded.evict():
                continue  # a request is inside it: it stays, and the process is over budget until one finishes
            del self._models[pk]
            total -= sizes[pk]
            evicted += 1
            for key in [k for k, r in self._routes.items()
                        if any(side is not None and side[1] is loaded for side in (r.champion, r.challenger))]:
                del self._routes[key]
            logger.info("Serving form of deployment %s evicted (least recently used; %.0f MB of %s MB in use)",
                        pk, total / 1024 / 1024, settings.PORTAL_SERVE_MEMORY_MB)
        self.evictions += evicted
        return evicted

    def route(self, model_id: int, environment: str) -> Route | None:
        key = (model_id, environment)
        now = time.monotonic()
        route = self._routes.get(key)
        if route is not None and now - route.checked_at < REFRESH_SECONDS:
            return route
        try:
            generation = (EnvironmentState.objects.filter(model_id=model_id, environment=environment)
                          .values_list("generation", flat=True).first())
        except DatabaseError:
            if route is not None and now - route.checked_at < STALE_SECONDS:
                return route  # the database is away: keep serving what was live, for a while
            raise
        if generation is None:
            self._routes.pop(key, None)
            return None
        if route is not None and route.generation == generation:
            route.checked_at = now
            return route
        with self._lock:
            state = (EnvironmentState.objects.select_related(
                "champion__version__artifact", "champion__serving_blob", "challenger__version__artifact",
                "challenger__serving_blob").get(model_id=model_id, environment=environment))
            champion = (state.champion, self._loaded(state.champion, enforce=False)) if state.champion else None
            challenger = ((state.challenger, self._loaded(state.challenger, enforce=False)) if state.challenger
                          else None)
            self._enforce_budget(keep=tuple(side[1] for side in (champion, challenger) if side is not None))
            route = Route(state.generation, champion, challenger, state.mode, state.challenger_percent, now)
            self._routes[key] = route
        return route


def _record_cold_load(deployment_id: int, seconds: float, kind: str, resident: int) -> None:
    """One cold load for the deployment page; telemetry, so a database that cannot take it loses only the row."""
    try:
        with transaction.atomic():  # a savepoint: a batch worker's own transaction stays usable if this fails
            row = ColdLoad.objects.create(deployment_id=deployment_id, seconds=round(seconds, 6), kind=kind,
                                          resident_bytes=resident or None)
            if row.pk % COLD_LOADS_KEPT == 0:  # now and then a deployment's older rows go: its page shows the recent
                kept = list(ColdLoad.objects.filter(deployment_id=deployment_id).order_by("-at")
                            .values_list("at", flat=True)[COLD_LOADS_KEPT - 1:COLD_LOADS_KEPT])
                if kept:
                    ColdLoad.objects.filter(deployment_id=deployment_id, at__lt=kept[0]).delete()
    except DatabaseError as exc:
        logger.warning("Could not record a cold load of deployment %s: %s", deployment_id, type(exc).__name__)


cache = ServingCache()
