"""``POST /api/v1/serve/{name}/{env}/invocations``: the hot path, kept lean on purpose.

``score`` does the work and returns an ``Answer`` (status, JSON body, headers): the production entry point sends it
through ``registry.serving.wsgi`` without Django's request handler; the ``invocations`` view sends it through Django
(the lean handler's fallback, the test client, a live-server thread). orjson in and out, the token and the model
lookup cached for ``AUTH_CACHE_SECONDS`` per process, the route cached per ``runtime.REFRESH_SECONDS``, one Redis
round trip that both logs the predictions and counts the request against the token's rate limit. A revoked token
stops working within ``AUTH_CACHE_SECONDS``.

While the database is unreachable, what this process last read (token, model, route) keeps serving for up to
``runtime.STALE_SECONDS``: scoring outlives a database restart, and a token revoked during the outage stops working
once the database answers again. A caller the process has not seen gets a 503, as does any request whose prediction
record cannot be buffered (an answer is only handed out once its log record is safe).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import orjson
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from portal import context
from portal.api.errors import error_body
from portal.authentication import BearerTokenAuthentication
from portal.permissions import has_capability, scope_to_teams
from registry.models import Environment, RegisteredModel
from registry.sandbox import hosts
from registry.serving import buffer, protocol, runtime

logger = logging.getLogger(__name__)
AUTH_CACHE_SECONDS = 2.0
_auth_cache: dict[str, tuple[float, Any]] = {}
# (user, model name) -> (read at, the model's id or None when it is not one of the user's teams', may score it)
_model_cache: dict[tuple[int, str], tuple[float, tuple[int | None, bool]]] = {}
_local_counts: dict[tuple[str, int], int] = {}
_lock = threading.Lock()
_shadow_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
Extra = Callable[[int, int], dict[str, Any]]


class Answer(NamedTuple):
    """A scoring answer before any HTTP machinery: status, JSON body and the headers of its own (Retry-After...).
    The Django view and the scoring WSGI application (``registry.serving.wsgi``) both send it."""

    status: int
    body: bytes
    headers: dict[str, str]

    def as_response(self) -> HttpResponse:
        response = HttpResponse(self.body, status=self.status, content_type="application/json")
        for key, value in self.headers.items():
            response[key] = value
        return response


# The portal's error codes as MLflow's (``mlflow.protos.databricks_pb2.ErrorCode``), for MLflow's clients.
_MLFLOW_CODES = {
    "not_authenticated": "UNAUTHENTICATED", "permission_denied": "PERMISSION_DENIED", "not_found": "ENDPOINT_NOT_FOUND",
    "not_deployed": "ENDPOINT_NOT_FOUND", "throttled": "REQUEST_LIMIT_EXCEEDED", "method_not_allowed": "BAD_REQUEST",
    "model_unavailable": "TEMPORARILY_UNAVAILABLE", "unavailable": "TEMPORARILY_UNAVAILABLE",
    "model_error": "INTERNAL_ERROR", "model_busy": "TEMPORARILY_UNAVAILABLE", "deadline_exceeded": "DEADLINE_EXCEEDED",
    "resource_limit_exceeded": "RESOURCE_LIMIT_EXCEEDED", "explainer_pending": "TEMPORARILY_UNAVAILABLE",
    "explainer_busy": "TEMPORARILY_UNAVAILABLE",
}


def _error(status: int, code: str, message: str, mlflow_code: str = "", **headers: str) -> Answer:
    """The contract's ``error`` object, with MLflow's ``error_code`` and ``message`` beside it."""
    mlflow_code = mlflow_code or _MLFLOW_CODES.get(code) or protocol.BAD_REQUEST
    return Answer(status, orjson.dumps({"error_code": mlflow_code, "message": message,
                                        **error_body(code, message)}), headers)


def _input_error(exc: protocol.InputError) -> Answer:
    return _error(415 if exc.code == "unsupported_media_type" else 400, exc.code, str(exc), exc.mlflow_code)


def _authenticate(request: HttpRequest) -> tuple[Any, str] | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if not header.startswith("Bearer "):
        return None
    now = time.monotonic()
    cached = _auth_cache.get(header)
    if cached and now - cached[0] < AUTH_CACHE_SECONDS:
        return cached[1]
    try:
        result = BearerTokenAuthentication().authenticate(request)
    except DatabaseError:
        if cached and now - cached[0] < runtime.STALE_SECONDS:
            return cached[1]
        raise
    except Exception:
        result = None
    value = (result[0], str(result[1].uid)) if result else None
    _auth_cache[header] = (now, value)
    if len(_auth_cache) > 10_000:
        _auth_cache.clear()
    return value


def _model_id(user: Any, name: str) -> tuple[int | None, bool]:
    """The id of the model ``name`` among the user's teams (None: not found for them) and whether their role may
    score it. Cached with the token, so the capability costs no query of its own."""
    key = (user.pk, name)
    now = time.monotonic()
    cached = _model_cache.get(key)
    if cached and now - cached[0] < AUTH_CACHE_SECONDS:
        return cached[1]
    found: tuple[int | None, bool] = (None, False)
    try:
        if has_capability(user, "view_models"):
            model_id = (scope_to_teams(RegisteredModel.objects.filter(name=name), user)
                        .values_list("pk", flat=True).first())
            found = (model_id, model_id is not None and has_capability(user, "score"))
    except DatabaseError:
        if cached and now - cached[0] < runtime.STALE_SECONDS:
            return cached[1]
        raise
    _model_cache[key] = (now, found)
    return found


_throttled: dict[str, int] = {}


def _over_limit(token_id: str) -> bool:
    """With Redis, each answered request is counted in the same round trip that logs it (``_count_key``); once a
    token's count for this second passes the limit, this process refuses it until the second is over."""
    limit = settings.PORTAL_SERVE_RATE_LIMIT
    if not limit:
        return False
    second = int(time.time())
    if buffer.redis_client() is not None:
        return _throttled.get(token_id) == second
    with _lock:
        count = _local_counts.get((token_id, second), 0) + 1
        _local_counts[(token_id, second)] = count
        if len(_local_counts) > 10_000:
            _local_counts.clear()
    return count > limit


def _count_key(token_id: str) -> str | None:
    if not settings.PORTAL_SERVE_RATE_LIMIT or buffer.redis_client() is None:
        return None
    return f"portal:rate:{token_id}:{int(time.time())}"


def _record_count(token_id: str, count: int | None) -> None:
    if count is not None and count >= settings.PORTAL_SERVE_RATE_LIMIT:
        _throttled[token_id] = int(time.time())


def _prediction_ids(n: int) -> list[str]:
    """32 hex characters each: 26 random per request, 6 for the row (up to 16 million rows)."""
    base = os.urandom(13).hex()
    return [f"{base}{i:06x}" for i in range(n)]


def subject_hash(subject_id: str) -> str:
    return hmac.new(settings.PORTAL_SUBJECT_HASH_KEY.encode(), subject_id.encode(), hashlib.sha256).hexdigest()


def routing_key(request: HttpRequest, subjects: list[str] | None) -> str | None:
    """What the router assigns a request by: its ``X-Routing-Key``, else its first subject id (None: at random)."""
    return request.META.get("HTTP_X_ROUTING_KEY") or (subjects[0] if subjects else None)


def unit_hash(key: str | None) -> str:
    """The logged form of a routing key (keyed like a subject id, never in clear): an experiment's unit."""
    return subject_hash(key) if key else ""


def _batch(*, name: str, env: str, role: str, version: int, matrix: Any, predictions: list[Any], ids: list[str],
           latency_ms: float, subjects: list[str] | None, error: str = "", unit: str = "") -> dict[str, Any]:
    # A cold start (the host or serving form loading for this process's first request) is not live latency.
    latency_ms = max(latency_ms - hosts.cold_start_seconds() * 1000, 0.0)
    return {
        "model": name, "environment": env, "version": version, "role": role, "ts": time.time(),
        "latency_ms": round(latency_ms, 3), "request_id": context.current().request_id, "error": error,
        "ids": ids, "inputs": matrix, "outputs": predictions,
        "subjects": [subject_hash(s) for s in subjects] if subjects else None, "unit": unit,
    }


def _shadow(route: runtime.Route, name: str, env: str, matrix: Any, ids: list[str], subjects: list[str] | None,
            request_id: str, request: tuple[bytes, str] | None = None) -> None:
    """Score a copy of the request with the shadow challenger, after the response; its answer is only logged.
    ``request`` (body and content type) is given when the champion answered it whole (an MLflow host)."""
    assert route.challenger is not None
    _deployment, loaded = route.challenger
    hosts.cold_start_reset()
    started = time.perf_counter()
    if not loaded.slots.acquire(blocking=False):
        return  # the shadow is as busy as its bulkhead allows: this copy is not scored (nobody waits for it)
    try:
        if loaded.answers_requests and request is not None:
            answer = loaded.invoke(*request, timeout=settings.PORTAL_SCORING_TIMEOUT_SECONDS)
            predictions, error = _predictions(answer.body), ""
            matrix = _logged_rows(answer, loaded.columns)
            if answer.status != 200:
                predictions, error = [], f"MLflow {answer.status}: {answer.body}"[:500]
        else:
            if matrix is None and request is not None:
                matrix = protocol.to_matrix(protocol.parse(request[1], request[0]), loaded.columns,
                                            named=loaded.named, tensor=loaded.tensor, allow_missing=loaded.missing_values)
            predictions, error = loaded.predict(matrix, timeout=settings.PORTAL_SCORING_TIMEOUT_SECONDS), ""
    except Exception as exc:
        predictions, error = [], f"{type(exc).__name__}: {exc}"[:500]
    finally:
        loaded.leave()
    if not isinstance(predictions, list) or len(predictions) != len(ids):
        predictions = []
    if matrix is None:
        matrix = [None] * len(ids)
    with context.bound(context.RequestContext(request_id=request_id)):
        batch = _batch(name=name, env=env, role="shadow", version=loaded.version_number, matrix=matrix,
                       predictions=predictions, ids=_prediction_ids(len(ids)),
                       latency_ms=(time.perf_counter() - started) * 1000, subjects=subjects, error=error)
        batch["shadow_of"] = ids
        buffer.emit(batch)


# --- MLflow models: answered whole by MLflow's own scoring code in their sandboxed host ------------------------

def _split_subjects(content_type: str, body: bytes) -> tuple[list[str] | None, bytes]:
    """The portal's ``subject_ids`` extension, taken out of a JSON body before it goes to MLflow's parser (which
    knows nothing of it). Bodies without it are passed on untouched, byte for byte."""
    if b'"subject_ids"' not in body or not content_type.split(";", 1)[0].strip().lower().endswith("json"):
        return None, body
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, body  # MLflow's parser answers for it
    if not isinstance(payload, dict) or "subject_ids" not in payload:
        return None, body
    subjects = payload.pop("subject_ids")
    if not isinstance(subjects, list) or not all(isinstance(s, (str, int)) for s in subjects):
        raise protocol.InputError("subject_ids must be a list of strings, one per row.")
    return [str(s) for s in subjects], orjson.dumps(payload)


def _predictions(text: str) -> Any:
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        import json

        payload = json.loads(text)  # MLflow writes NaN and Infinity, which orjson does not read (null on the way out)
    return payload.get("predictions", payload) if isinstance(payload, dict) else payload


def _logged_rows(answer: hosts.Invocation, columns: list[str]) -> list[Any]:
    """The request's rows as the prediction log keeps them: in the signature's column order where it has one."""
    rows = answer.rows
    if rows is None:
        return [None] * answer.count
    if answer.columns and columns and answer.columns != columns:
        index = {c: i for i, c in enumerate(answer.columns)}
        return [[row[index[c]] if c in index else None for c in columns] for row in rows]
    return rows


def _mlflow_error(answer: hosts.Invocation) -> Answer:
    """MLflow's own status and ``error_code``/``message``, with the contract's ``error`` object beside them."""
    try:
        body = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        body = {"message": answer.body}
    code = str(body.get("error_code") or ("BAD_REQUEST" if answer.status < 500 else "INTERNAL_ERROR"))
    message = str(body.get("message") or "The model refused this input.")[:2000]
    contract = "unsupported_media_type" if answer.status == 415 else "invalid_input" if answer.status < 500 \
        else "model_error"
    return Answer(answer.status, orjson.dumps({"error_code": code, "message": message,
                                               **error_body(contract, message)}), {})


def _invoke(request: HttpRequest, route: runtime.Route, *, name: str, env: str, token_id: str,
            started: float, extra: Extra | None = None) -> Answer:
    content_type = request.META.get("CONTENT_TYPE", "")
    try:
        subjects, body = _split_subjects(content_type, request.body)
    except protocol.InputError as exc:
        return _input_error(exc)
    role, _deployment, loaded = route.pick(routing_key(request, subjects))
    if not loaded.enter():
        return _busy(name, loaded)
    try:
        return _invoke_one(request, route, loaded, role, body, content_type, subjects, name=name, env=env,
                           token_id=token_id, started=started, extra=extra)
    finally:
        loaded.leave()


def _invoke_one(request: HttpRequest, route: runtime.Route, loaded: runtime.LoadedModel, role: str, body: bytes,
                content_type: str, subjects: list[str] | None, *, name: str, env: str, token_id: str,
                started: float, extra: Extra | None = None) -> Answer:
    timeout = settings.PORTAL_SCORING_TIMEOUT_SECONDS
    if not loaded.answers_requests:  # a canary of another kind beside an MLflow champion
        try:
            parsed = protocol.parse(content_type, request.body)
            matrix = protocol.to_matrix(parsed, loaded.columns, named=loaded.named, tensor=loaded.tensor,
                                        allow_missing=loaded.missing_values)
            protocol.check_params(parsed.params, loaded.params)
            predictions = loaded.predict(matrix, timeout=timeout)
        except protocol.InputError as exc:
            return _input_error(exc)
        except hosts.HostUnavailable as exc:
            return _model_unavailable(name, loaded, exc)
        except runtime.ScoringLimit as exc:
            return _limited(name, loaded, exc)
        except Exception:
            logger.exception("Model %s v%s failed in %s", name, loaded.version_number, env)
            return _error(500, "model_error", "The model failed on this input; the failure is logged.")
        return _answered(name=name, env=env, role=role, loaded=loaded, rows=matrix, predictions=predictions,
                         subjects=parsed.subject_ids, token_id=token_id, started=started, route=route,
                         request=(request.body, content_type), unit=unit_hash(routing_key(request, subjects)),
                         extra=extra)
    if loaded.takes_frames:
        framed = _framed(request, route, loaded, role, body, content_type, subjects, name=name, env=env,
                         token_id=token_id, started=started, extra=extra)
        if framed is not None:
            return framed
    try:
        answer = loaded.invoke(body, content_type, timeout=timeout)
    except hosts.HostUnavailable as exc:
        return _model_unavailable(name, loaded, exc)
    except hosts.HostModelError:
        logger.exception("Model %s v%s failed in %s", name, loaded.version_number, env)
        return _error(500, "model_error", "The model failed on this input; the failure is logged.")
    if answer.status != 200:
        if answer.model_error:  # MLflow answers a model's own failure with 400; monitoring counts it as an error
            logger.warning("Model %s v%s failed in %s: %r", name, loaded.version_number, env, answer.model_error)
            n = answer.count or 1
            buffer.emit(_batch(name=name, env=env, role=role, version=loaded.version_number,
                               matrix=_logged_rows(answer, loaded.columns) if answer.count else [None],
                               predictions=[], ids=_prediction_ids(n),
                               latency_ms=(time.perf_counter() - started) * 1000,
                               subjects=subjects if subjects and len(subjects) == n else None,
                               error=answer.model_error, unit=unit_hash(routing_key(request, subjects))))
        return _mlflow_error(answer)
    if subjects is not None and len(subjects) != answer.count:
        return _error(400, "invalid_input", f"subject_ids has {len(subjects)} entries for {answer.count} rows.")
    try:
        predictions = _predictions(answer.body)
    except (ValueError, RecursionError):
        return _model_unavailable(name, loaded, hosts.HostUnavailable("the model host's answer is not JSON"))
    return _answered(name=name, env=env, role=role, loaded=loaded, rows=_logged_rows(answer, loaded.columns),
                     predictions=predictions, subjects=subjects, token_id=token_id, started=started, route=route,
                     request=(body, content_type), count=answer.count, unit=unit_hash(routing_key(request, subjects)),
                     non_finite="NaN" in answer.body or "Infinity" in answer.body, extra=extra)


def _framed(request: HttpRequest, route: runtime.Route, loaded: runtime.LoadedModel, role: str, body: bytes,
            content_type: str, subjects: list[str] | None, *, name: str, env: str, token_id: str,
            started: float, extra: Extra | None = None) -> Answer | None:
    """The common request to an MLflow model's host without MLflow's parsing: a numeric ``dataframe_split`` whose
    every value MLflow would read as the same number (``protocol.numeric_rows``) goes to the host as one float64
    matrix and is answered by the estimator as MLflow's scoring server answers it (``child._FrameScorer``). None:
    the request is not of that kind, or the host declined it, and MLflow's own scoring code answers it."""
    matrix = protocol.numeric_rows(content_type, body, loaded.columns, loaded.frame_kinds)
    if matrix is None:
        return None
    if subjects is not None and len(subjects) != matrix.shape[0]:
        return _error(400, "invalid_input", f"subject_ids has {len(subjects)} entries for {matrix.shape[0]} rows.")
    try:
        predictions = loaded.predict_frame(matrix, timeout=settings.PORTAL_SCORING_TIMEOUT_SECONDS)
    except hosts.FrameDeclined:
        return None
    except hosts.HostUnavailable as exc:
        return _model_unavailable(name, loaded, exc)
    return _answered(name=name, env=env, role=role, loaded=loaded,
                     rows=protocol.logged_values(matrix, loaded.frame_kinds), predictions=predictions,
                     subjects=subjects, token_id=token_id, started=started, route=route,
                     request=(body, content_type), unit=unit_hash(routing_key(request, subjects)), extra=extra)


def _answered(*, name: str, env: str, role: str, loaded: runtime.LoadedModel, rows: Any, predictions: Any,
              subjects: list[str] | None, token_id: str, started: float, route: runtime.Route,
              request: tuple[bytes, str], count: int | None = None, non_finite: bool = False,
              unit: str = "", extra: Extra | None = None) -> Answer:
    """``non_finite``: MLflow's answer holds NaN or Infinity, which MLflow writes as such (not JSON's null): the
    answer is written the same way, so a client reads what MLflow's own server would have sent."""
    n = count if count is not None else len(rows)
    ids = _prediction_ids(n)
    per_row = predictions if isinstance(predictions, list) and len(predictions) == n else [None] * n
    count_now = buffer.emit(_batch(name=name, env=env, role=role, version=loaded.version_number, matrix=rows,
                                   predictions=per_row, ids=ids, latency_ms=(time.perf_counter() - started) * 1000,
                                   subjects=subjects, unit=unit), count_key=_count_key(token_id))
    _record_count(token_id, count_now)
    if route.mode == "shadow" and route.challenger is not None:
        _shadow_pool.submit(_shadow, route, name, env, None, ids, subjects, context.current().request_id,
                            request)
    payload = {"predictions": predictions, "prediction_ids": ids, "model_version": loaded.version_number}
    if extra is not None:
        payload.update(extra(len(ids), loaded.version_number))
    if non_finite and _has_non_finite(predictions):
        import json

        return Answer(200, json.dumps(payload, allow_nan=True).encode(), {})
    return Answer(200, orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), {})


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    return False


def _model_unavailable(name: str, loaded: runtime.LoadedModel, exc: Exception) -> Answer:
    return _error(503, "model_unavailable", f"Version {loaded.version_number} of {name} cannot answer right now: "
                  f"{exc}. Other models are not affected; retry in a moment.", **{"Retry-After": "2"})


def _busy(name: str, loaded: runtime.LoadedModel) -> Answer:
    """The bulkhead's answer, given at once: this version already has as many requests in progress in this server
    process as it may (they wait on the model, not on anything shared), so this one was not started."""
    return _error(503, "model_busy", f"Version {loaded.version_number} of {name} already has {loaded.in_flight} "
                  "requests in progress in this server process, as many as one model may have; this request was "
                  "not started. Requests to other models are served as usual; retry in a moment.",
                  **{"Retry-After": "1"})


def _limited(name: str, loaded: runtime.LoadedModel, exc: runtime.ScoringLimit) -> Answer:
    """An in-process run stopped by its deadline (504) or the memory ceiling (503): the worker is free again."""
    return _error(exc.status, exc.code, f"Version {loaded.version_number} of {name} was stopped: {exc}.",
                  exc.mlflow_code)


def _unavailable(what: str) -> Answer:
    return _error(503, "unavailable", f"Scoring is briefly unavailable ({what}); retry in a moment.",
                  **{"Retry-After": "1"})


@csrf_exempt
def invocations(request: HttpRequest, name: str, env: str) -> HttpResponse:
    """The scoring route through Django's handler (the test client, and requests the WSGI application hands on)."""
    return score(request, name, env).as_response()


def score(request: HttpRequest, name: str, env: str) -> Answer:
    try:
        return _invocations(request, name, env)
    except DatabaseError as exc:
        logger.warning("Scoring %s in %s: database unavailable (%s)", name, env, type(exc).__name__)
        return _unavailable("the database is unreachable")
    except buffer.BufferUnavailable:
        logger.warning("Scoring %s in %s: neither Redis nor the database takes prediction records", name, env)
        return _unavailable("the prediction log is unreachable")


def _gate(request: HttpRequest, name: str, env: str) -> Answer | tuple[Any, str, runtime.Route]:
    """What every serving route checks first: host, method, token, rate, environment, the model among the
    caller's teams, the ``score`` capability, something deployed, a Content-Type. An error ``Answer``, or the
    (user, token id, route) to serve."""
    caller = gate_caller(request, env)
    if isinstance(caller, Answer):
        return caller
    user, token_id = caller
    model_id, may_score = _model_id(user, name)
    if model_id is None:
        return _error(404, "not_found", f"No model named {name!r} that you may use.")
    if not may_score:
        return _error(403, "permission_denied", "Your role does not allow this (score): viewers and compliance "
                                                "officers read, they do not score.")
    route = runtime.cache.route(model_id, env)
    if route is None or route.champion is None:
        return _error(404, "not_deployed", f"Nothing serves {name} in {env} yet.")
    missing = content_type_missing(request)
    if missing is not None:
        return missing
    return user, token_id, route


def content_type_missing(request: HttpRequest) -> Answer | None:
    if not request.META.get("CONTENT_TYPE", "").strip():
        return _input_error(protocol.InputError(
            f"Say what the body is with a Content-Type header: application/json, text/csv or {protocol.PARQUET}.",
            "unsupported_media_type"))
    return None


def gate_caller(request: HttpRequest, env: str) -> Answer | tuple[Any, str]:
    """The checks every serving route (a model's or an endpoint's) makes before looking up what it serves: host,
    method, token, rate, environment. An error ``Answer``, or the (user, token id)."""
    try:
        request.get_host()  # ALLOWED_HOSTS, which CommonMiddleware checks on every other path
    except DisallowedHost:
        return _error(400, "bad_request", "This host name is not served here.")
    if request.method != "POST":
        return _error(405, "method_not_allowed", "Send predictions with POST.", Allow="POST")
    auth = _authenticate(request)
    if auth is None:
        return _error(401, "not_authenticated", "Send a valid API token: Authorization: Bearer <token>.",
                      **{"WWW-Authenticate": "Bearer"})
    user, token_id = auth
    if _over_limit(token_id):
        return _error(429, "throttled", f"More than {settings.PORTAL_SERVE_RATE_LIMIT} requests a second with this "
                                        "token; slow down.", **{"Retry-After": "1"})
    if env not in Environment.values:
        return _error(404, "not_found", f"Unknown environment {env!r}: use dev, stage or prod.")
    return user, token_id


def _invocations(request: HttpRequest, name: str, env: str) -> Answer:
    started = time.perf_counter()
    hosts.cold_start_reset()
    gate = _gate(request, name, env)
    if isinstance(gate, Answer):
        return gate
    _user, token_id, route = gate
    return serve(request, route, name=name, env=env, token_id=token_id, started=started)


def serve(request: HttpRequest, route: runtime.Route, *, name: str, env: str, token_id: str, started: float,
          extra: Extra | None = None, parsed: protocol.ParsedRequest | None = None) -> Answer:
    """Score the whole request with the model ``name`` (its ``route``), past every check of the gate. ``extra``:
    more keys for the answer from its row count and version (an endpoint names the model that answered);
    ``parsed``: the body, when the caller has parsed it already (an endpoint whose rules read fields)."""
    if route.answers_requests:
        return _invoke(request, route, name=name, env=env, token_id=token_id, started=started, extra=extra)
    try:
        if parsed is None:
            parsed = protocol.parse(request.META.get("CONTENT_TYPE", ""), request.body)
        key = routing_key(request, parsed.subject_ids)
        role, _deployment, loaded = route.pick(key)
        matrix = protocol.to_matrix(parsed, loaded.columns, named=loaded.named, tensor=loaded.tensor,
                                    allow_missing=loaded.missing_values)
        protocol.check_params(parsed.params, loaded.params)
    except protocol.NoRows as exc:
        _role, _deployment, loaded = route.pick(routing_key(request, None))
        if not loaded.answers_empty:
            return _input_error(exc)
        return Answer(200, orjson.dumps({"predictions": [], "prediction_ids": [],
                                         "model_version": loaded.version_number}), {})
    except protocol.InputError as exc:
        return _input_error(exc)
    ids = _prediction_ids(matrix.shape[0])
    if not loaded.enter():
        return _busy(name, loaded)
    try:
        predictions = loaded.predict(matrix, timeout=settings.PORTAL_SCORING_TIMEOUT_SECONDS)
    except (hosts.HostUnavailable, runtime.ScoringLimit) as exc:
        buffer.emit(_batch(name=name, env=env, role=role, version=loaded.version_number, matrix=matrix,
                           predictions=[], ids=ids, latency_ms=(time.perf_counter() - started) * 1000,
                           subjects=parsed.subject_ids, error=f"{type(exc).__name__}: {exc}"[:500],
                           unit=unit_hash(key)))
        if isinstance(exc, runtime.ScoringLimit):
            return _limited(name, loaded, exc)
        return _model_unavailable(name, loaded, exc)
    except Exception as exc:
        logger.exception("Model %s v%s failed in %s", name, loaded.version_number, env)
        buffer.emit(_batch(name=name, env=env, role=role, version=loaded.version_number, matrix=matrix,
                           predictions=[], ids=ids, latency_ms=(time.perf_counter() - started) * 1000,
                           subjects=parsed.subject_ids, error=f"{type(exc).__name__}: {exc}"[:500],
                           unit=unit_hash(key)))
        return _error(500, "model_error", "The model failed on this input; the failure is logged.")
    finally:
        loaded.leave()
    latency_ms = (time.perf_counter() - started) * 1000
    count = buffer.emit(_batch(name=name, env=env, role=role, version=loaded.version_number, matrix=matrix,
                               predictions=predictions, ids=ids, latency_ms=latency_ms, subjects=parsed.subject_ids,
                               unit=unit_hash(key)),
                        count_key=_count_key(token_id))
    _record_count(token_id, count)
    if route.mode == "shadow" and route.challenger is not None:
        _shadow_pool.submit(_shadow, route, name, env, matrix, ids, parsed.subject_ids,
                            context.current().request_id)
    payload = {"predictions": predictions, "prediction_ids": ids, "model_version": loaded.version_number}
    if extra is not None:
        payload.update(extra(len(ids), loaded.version_number))
    return Answer(200, orjson.dumps(payload), {})


# --- Explanations: POST /api/v1/serve/{name}/{env}/explain (issue 37) -----------------------------------------

EXPLAIN_MAX_ROWS = 1000


@csrf_exempt
def explain(request: HttpRequest, name: str, env: str) -> HttpResponse:
    """Each row's prediction with its SHAP attributions and base value, for the same bodies ``invocations`` takes.
    Computed by a sandboxed host (the model and its explainer are the uploader's program), time-bounded; the
    ``score`` capability; a read of data about a person (audited) when the body carries ``subject_ids``."""
    try:
        return _explain(request, name, env).as_response()
    except DatabaseError as exc:
        logger.warning("Explaining %s in %s: database unavailable (%s)", name, env, type(exc).__name__)
        return _unavailable("the database is unreachable").as_response()


def _explain(request: HttpRequest, name: str, env: str) -> Answer:
    hosts.cold_start_reset()
    gate = _gate(request, name, env)
    if isinstance(gate, Answer):
        return gate
    user, token_id, route = gate
    wait = _explain_over_limit(token_id)
    if wait:
        return _error(429, "throttled", f"More than {settings.PORTAL_EXPLAIN_RATE_LIMIT} explain requests a minute "
                                        f"with this token; retry in {wait} s.", **{"Retry-After": str(wait)})
    try:
        parsed = protocol.parse(request.META.get("CONTENT_TYPE", ""), request.body)
        role, deployment, loaded = route.pick(request.META.get("HTTP_X_ROUTING_KEY")
                                              or (parsed.subject_ids[0] if parsed.subject_ids else None))
        matrix = protocol.to_matrix(parsed, loaded.columns, named=loaded.named, tensor=loaded.tensor,
                                    allow_missing=False)
    except protocol.InputError as exc:
        return _input_error(exc)
    if matrix.shape[0] > EXPLAIN_MAX_ROWS:
        return _error(400, "invalid_input", f"Explain at most {EXPLAIN_MAX_ROWS} rows a request, not "
                                            f"{matrix.shape[0]}.")
    version = deployment.version
    info = version.explanation or {}
    what = f"version {version.number} of {name}"
    if info.get("no_explainer"):
        return _no_explainer(what, str(info.get("error") or "no explainer fits the model"))
    if info.get("pending"):
        return _error(503, "explainer_pending", f"The explainer of {what} is still being prepared from its reference "
                      "data (it is computed in the sandbox once the version is ready); retry in a minute.",
                      **{"Retry-After": "30"})
    background = None
    if info.get("background"):
        background = np.asarray(info["background"], dtype="float64")
    columns = [str(c) for c in info.get("columns") or loaded.columns]
    if len(columns) != matrix.shape[1] or (background is not None and background.shape[1] != matrix.shape[1]):
        columns, background = list(loaded.columns), None
    if not loaded.explain_enter():
        return _error(503, "explainer_busy", f"Version {loaded.version_number} of {name} already has "
                      f"{loaded.explain_in_flight} explanations in progress in this server process, as many as one "
                      "model may have; this request was not started (scoring is not affected). Retry in a moment.",
                      **{"Retry-After": "2"})
    try:
        answer = loaded.explain(matrix, background, columns or None, budget=settings.PORTAL_EXPLAIN_BUDGET_SECONDS)
    except hosts.NoExplainer as exc:
        return _no_explainer(what, str(exc))
    except hosts.ExplainOverBudget as exc:
        return _error(504, "deadline_exceeded", f"The explanation of {what} was stopped: {exc}.")
    except hosts.HostUnavailable as exc:
        return _model_unavailable(name, loaded, exc)
    except hosts.HostModelError as exc:
        logger.warning("Explaining %s v%s in %s failed: %s", name, loaded.version_number, env, exc)
        return _error(500, "model_error", "The model or its explainer failed on this input; the failure is logged.")
    finally:
        loaded.explain_leave()
    names = [str(c) for c in answer.get("columns") or columns]
    if parsed.subject_ids:
        _audit_subject_explanations(user=user, name=name, env=env, version=version.number, role=role,
                                    subjects=parsed.subject_ids)
    rows = []
    for prediction, row in zip(answer["predictions"], answer["rows"], strict=True):
        item = {"prediction": prediction, "output": row["output"], "base_value": row["base_value"],
                "attributions": dict(zip(names, row["attributions"], strict=True))}
        if row.get("class") is not None:
            item["class"] = row["class"]
        rows.append(item)
    return Answer(200, orjson.dumps({
        "model_version": loaded.version_number, "method": answer["method"], "approximate": answer["approximate"],
        "output": answer["output"], "explanations": rows, "cost": answer.get("cost") or {},
        "additivity_gap": answer.get("additivity_gap")}), {})


_explain_counts: dict[tuple[str, int], int] = {}


def _explain_over_limit(token_id: str) -> int:
    """Counts this explain request against its token's ``PORTAL_EXPLAIN_RATE_LIMIT`` for the current minute (in
    Redis when the portal has it, so every web process shares the count; in this process otherwise). Over the
    limit: the seconds until the minute is over (the Retry-After); 0 otherwise."""
    limit = settings.PORTAL_EXPLAIN_RATE_LIMIT
    if not limit:
        return 0
    now = time.time()
    minute = int(now // 60)
    count = None
    client = buffer.redis_client()
    if client is not None:
        key = f"portal:explain-rate:{token_id}:{minute}"
        try:
            pipe = client.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, 120)
            count = int(pipe.execute()[0])
        except Exception as exc:  # Redis down: each process counts for itself rather than letting everything by
            logger.warning("Explain rate count in Redis failed (%s); counting in this process", type(exc).__name__)
    if count is None:
        with _lock:
            count = _explain_counts.get((token_id, minute), 0) + 1
            _explain_counts[(token_id, minute)] = count
            if len(_explain_counts) > 10_000:
                _explain_counts.clear()
    if count <= limit:
        return 0
    return max(1, math.ceil((minute + 1) * 60 - now))


def _no_explainer(what: str, why: str) -> Answer:
    return _error(422, "no_explainer", f"No explanation is available for {what}: {why}.", "INVALID_PARAMETER_VALUE")


def _audit_subject_explanations(*, user: Any, name: str, env: str, version: int, role: str,
                                subjects: list[str]) -> None:
    """An explanation of a decision about a person is a read of data about them: one audit event per subject,
    naming the subject by the keyed hash the prediction log uses (never the raw id)."""
    from django.db import transaction

    from portal.audit.actions import AuditAction
    from portal.audit.record import Target, audit_record

    with transaction.atomic():
        for digest in dict.fromkeys(subject_hash(s) for s in subjects):
            audit_record(AuditAction.SUBJECT_EXPLANATION_READ, actor=user,
                         target=Target(type="subject", id=digest, repr=f"subject {digest[:12]}…"),
                         metadata={"model": name, "environment": env, "version": version, "role": role})
