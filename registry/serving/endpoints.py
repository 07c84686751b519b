"""``POST /api/v1/serve/endpoints/{name}/{env}/invocations``: one address in front of several models.

The endpoint's rules (``registry.models.Endpoint``) are compiled once per process and re-checked at most every
``REFRESH_SECONDS`` by comparing the endpoint's ``generation`` (one indexed read), so an edit is picked up without a
restart and costs a request nothing in between.

Routing, decided per row and answered in input order (MLflow's protocol answers one list, in order):

- ``header_equals`` and ``share`` rules are about the request: a header's value, or the request's bucket (0-99) from
  its routing key (``X-Routing-Key``, else its first subject id; at random without either, as a canary's split).
  Share rules split the buckets in their order: the first takes the first ``percent`` buckets, the next the
  following ones, so a key always lands on the same model while the rules stay the same.
- ``field_equals`` and ``field_in`` rules are about each row: the value of that input column (compared by
  ``services.normalise_value``: ``1``, ``1.0`` and ``"1"`` are equal). A row without the field does not match.
- The first rule that matches names the model; the endpoint's default takes the rest.

A request whose rows all go to one model (every request, when no rule reads a field) is handed to that model's own
serving path untouched: the same parsing, errors, bulkhead, logging, canary and shadow as
``/api/v1/serve/{model}/{env}/invocations``, MLflow-hosted models included. A request whose rows go to several
models is scored model by model (each group of rows through its model's bulkhead, in its own serving form; a group
for a model MLflow's own code answers goes to it re-encoded in the request's own form: CSV as CSV, JSON as
``dataframe_split`` or ``dataframe_records``, Parquet as ``dataframe_split``), and logged only once every group has
answered, each group under the model and version that answered it: a failure of any group answers that failure, and
none of the request's predictions is handed out or logged as answered.

Every answer names, per row, the model and version that answered it (``models``, ``model_versions``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from portal import context
from portal.permissions import has_capability, scope_to_teams
from registry.models import Endpoint, RuleKind
from registry.sandbox import hosts
from registry.serving import buffer, protocol, runtime, views
from registry.serving.views import Answer

REFRESH_SECONDS = runtime.REFRESH_SECONDS
_ROW_RULES = (RuleKind.FIELD_EQUALS, RuleKind.FIELD_IN)


def normalise(value: Any) -> str:
    """How a field's or rule's value is compared: booleans as ``true``/``false``, numbers by value (``1``, ``1.0``
    and ``"1"`` are equal, as a CSV field and a JSON number are the same input), other text as written. The
    endpoints' services store rule values with this very function."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an integer past a double's range: compared as written
            return str(value)
    else:
        text = str(value)
        try:
            number = float(text)
        except (ValueError, OverflowError):
            return text
        if text.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
            return text
    if number != number or number in (float("inf"), float("-inf")):
        return str(value)
    return str(int(number)) if number.is_integer() else repr(number)


@dataclass(frozen=True)
class Target:
    model_id: int
    name: str


@dataclass(frozen=True)
class CompiledRule:
    kind: str
    key: str  # a field name, or a header as Django's META names it (HTTP_X_REGION)
    values: frozenset[str]
    low: int  # share: the buckets [low, high) it takes
    high: int
    target: Target


@dataclass
class EndpointRoute:
    endpoint_id: int
    team_id: int
    generation: int
    rules: tuple[CompiledRule, ...]
    default: Target | None
    reads_fields: bool
    shares: bool  # a share rule reads the request's routing key
    checked_at: float

    def request_rules(self, request: HttpRequest, key: str | None) -> tuple[list[CompiledRule], Target | None]:
        """The row rules that still matter for this request, in order, and the model the rest of its rows go to:
        rules about the request are decided here, once, so each row only reads its fields."""
        bucket: int | None = None
        offered: list[CompiledRule] = []
        for rule in self.rules:
            if rule.kind in _ROW_RULES:
                offered.append(rule)
                continue
            if rule.kind == RuleKind.HEADER_EQUALS:
                value = request.META.get(rule.key)
                if value is not None and normalise(value) in rule.values:
                    return offered, rule.target
                continue
            if bucket is None:
                bucket = _bucket(key)
            if rule.low <= bucket < rule.high:
                return offered, rule.target
        return offered, self.default


def _bucket(key: str | None) -> int:
    if key:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=2).digest(), "big") % 100
    return random.randrange(100)  # noqa: S311 - traffic splitting, not security


class EndpointCache:
    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], EndpointRoute] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._routes.clear()

    def route(self, name: str, environment: str) -> EndpointRoute | None:
        key = (name, environment)
        now = time.monotonic()
        route = self._routes.get(key)
        if route is not None and now - route.checked_at < REFRESH_SECONDS:
            return route
        try:
            current = (Endpoint.objects.filter(name=name, environment=environment)
                       .values_list("pk", "generation").first())
        except DatabaseError:
            if route is not None and now - route.checked_at < runtime.STALE_SECONDS:
                return route  # the database is away: keep routing as last read, for a while
            raise
        if current is None:
            self._routes.pop(key, None)
            return None
        if route is not None and (route.endpoint_id, route.generation) == current:
            route.checked_at = now
            return route
        route = _compile(name, environment, now)
        if route is not None:
            with self._lock:
                self._routes[key] = route
        return route


def _compile(name: str, environment: str, now: float) -> EndpointRoute | None:
    endpoint = (Endpoint.objects.select_related("default_model")
                .filter(name=name, environment=environment).first())
    if endpoint is None:
        return None
    rules: list[CompiledRule] = []
    low = 0
    for rule in endpoint.rules.select_related("model").order_by("position"):
        if rule.model.team_id != endpoint.team_id:
            continue  # the model moved to another team since: it is no longer this endpoint's to route to
        target = Target(rule.model_id, rule.model.name)
        if rule.kind == RuleKind.SHARE:
            high = min(100, low + (rule.percent or 0))
            rules.append(CompiledRule(rule.kind, "", frozenset(), low, high, target))
            low = high
        elif rule.kind == RuleKind.HEADER_EQUALS:
            meta = "HTTP_" + rule.key.upper().replace("-", "_")
            rules.append(CompiledRule(rule.kind, meta, frozenset(normalise(v) for v in rule.values), 0, 0, target))
        else:
            rules.append(CompiledRule(rule.kind, rule.key, frozenset(normalise(v) for v in rule.values), 0, 0,
                                      target))
    default = endpoint.default_model
    return EndpointRoute(
        endpoint_id=endpoint.pk, team_id=endpoint.team_id, generation=endpoint.generation, rules=tuple(rules),
        default=Target(default.pk, default.name) if default is not None and default.team_id == endpoint.team_id
        else None,
        reads_fields=any(r.kind in _ROW_RULES for r in rules), shares=any(r.kind == RuleKind.SHARE for r in rules),
        checked_at=now)


cache = EndpointCache()

# (user, endpoint, env) -> (read at, (the endpoint's id among the user's teams or None, may score))
_access_cache: dict[tuple[int, str, str], tuple[float, tuple[int | None, bool]]] = {}


def _access(user: Any, name: str, env: str) -> tuple[int | None, bool]:
    key = (user.pk, name, env)
    now = time.monotonic()
    cached = _access_cache.get(key)
    if cached and now - cached[0] < views.AUTH_CACHE_SECONDS:
        return cached[1]
    found: tuple[int | None, bool] = (None, False)
    try:
        if has_capability(user, "view_models"):
            endpoint_id = (scope_to_teams(Endpoint.objects.filter(name=name, environment=env), user)
                           .values_list("pk", flat=True).first())
            found = (endpoint_id, endpoint_id is not None and has_capability(user, "score"))
    except DatabaseError:
        if cached and now - cached[0] < runtime.STALE_SECONDS:
            return cached[1]
        raise
    _access_cache[key] = (now, found)
    if len(_access_cache) > 10_000:
        _access_cache.clear()
    return found


@csrf_exempt
def invocations(request: HttpRequest, endpoint_name: str, env: str) -> HttpResponse:
    """An endpoint's scoring route through Django's handler (the lean WSGI application calls ``score``)."""
    return score(request, endpoint_name, env).as_response()


def score(request: HttpRequest, name: str, env: str) -> Answer:
    try:
        return _score(request, name, env)
    except DatabaseError as exc:
        views.logger.warning("Scoring endpoint %s in %s: database unavailable (%s)", name, env, type(exc).__name__)
        return views._unavailable("the database is unreachable")
    except buffer.BufferUnavailable:
        views.logger.warning("Scoring endpoint %s in %s: the prediction log is unreachable", name, env)
        return views._unavailable("the prediction log is unreachable")


def _one_model(name: str) -> views.Extra:
    def extra(n: int, version: int) -> dict[str, Any]:
        return {"model": name, "models": [name] * n, "model_versions": [version] * n}
    return extra


def _score(request: HttpRequest, name: str, env: str) -> Answer:
    started = time.perf_counter()
    hosts.cold_start_reset()
    caller = views.gate_caller(request, env)
    if isinstance(caller, Answer):
        return caller
    user, token_id = caller
    endpoint_id, may_score = _access(user, name, env)
    if endpoint_id is None:
        return views._error(404, "not_found", f"No endpoint named {name!r} in {env} that you may use.")
    if not may_score:
        return views._error(403, "permission_denied", "Your role does not allow this (score): viewers and "
                                                      "compliance officers read, they do not score.")
    endpoint = cache.route(name, env)
    if endpoint is None:
        return views._error(404, "not_found", f"No endpoint named {name!r} in {env} that you may use.")
    missing = views.content_type_missing(request)
    if missing is not None:
        return missing
    content_type = request.META.get("CONTENT_TYPE", "")
    parsed: protocol.ParsedRequest | None = None
    if endpoint.reads_fields:
        try:
            parsed = protocol.parse(content_type, request.body)
        except protocol.InputError as exc:
            return views._input_error(exc)
        key = views.routing_key(request, parsed.subject_ids)
    else:
        key = request.META.get("HTTP_X_ROUTING_KEY") or (_first_subject(content_type, request.body)
                                                         if endpoint.shares else None)
    row_rules, fallback = endpoint.request_rules(request, key)
    if parsed is None or not row_rules:
        return _whole(request, fallback, env=env, token_id=token_id, started=started, endpoint=name, parsed=parsed)
    targets = _row_targets(parsed, row_rules, fallback)
    groups: dict[Target | None, list[int]] = {}
    for i, target in enumerate(targets):
        groups.setdefault(target, []).append(i)
    if len(groups) == 1:
        return _whole(request, targets[0], env=env, token_id=token_id, started=started, endpoint=name,
                      parsed=parsed)
    return _split(request, parsed, groups, env=env, token_id=token_id, started=started, key=key, endpoint=name)


def _first_subject(content_type: str, body: bytes) -> str | None:
    """The first subject id of a JSON body, read only when it carries one (share rules' key without a header)."""
    if b'"subject_ids"' not in body or "json" not in content_type:
        return None
    try:
        subjects = orjson.loads(body).get("subject_ids")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return str(subjects[0]) if isinstance(subjects, list) and subjects else None


def _no_route(endpoint: str, env: str) -> Answer:
    return views._error(404, "not_deployed", f"Endpoint {endpoint} in {env} has no model for these rows: no rule "
                                             "matched and its default is not set.")


def _served(target: Target, env: str) -> runtime.Route | Answer:
    route = runtime.cache.route(target.model_id, env)
    if route is None or route.champion is None:
        return views._error(404, "not_deployed", f"Nothing serves {target.name} in {env} now; the endpoint routes "
                                                 "these rows to it.")
    return route


def _whole(request: HttpRequest, target: Target | None, *, env: str, token_id: str, started: float,
           endpoint: str, parsed: protocol.ParsedRequest | None) -> Answer:
    if target is None:
        return _no_route(endpoint, env)
    route = _served(target, env)
    if isinstance(route, Answer):
        return route
    return views.serve(request, route, name=target.name, env=env, token_id=token_id, started=started,
                       extra=_one_model(target.name), parsed=parsed)


def _field_values(parsed: protocol.ParsedRequest, key: str) -> list[Any]:
    """Each row's value of the field ``key`` (None where it has none)."""
    rows = parsed.rows
    if parsed.columns is None:
        return [row.get(key) if isinstance(row, dict) else None for row in rows]
    try:
        index = parsed.columns.index(key)
    except ValueError:
        return [None] * len(rows)
    return [row[index] if isinstance(row, list) and index < len(row) else None for row in rows]


def _row_targets(parsed: protocol.ParsedRequest, rules: list[CompiledRule],
                 fallback: Target | None) -> list[Target | None]:
    targets: list[Target | None] = [None] * len(parsed.rows)
    undecided = list(range(len(parsed.rows)))
    columns: dict[str, list[Any]] = {}
    for rule in rules:
        if not undecided:
            break
        values = columns.get(rule.key)
        if values is None:
            values = columns[rule.key] = _field_values(parsed, rule.key)
        left = []
        for i in undecided:
            value = values[i]
            if value is not None and normalise(value) in rule.values:
                targets[i] = rule.target
            else:
                left.append(i)
        undecided = left
    for i in undecided:
        targets[i] = fallback
    return targets


@dataclass
class _Group:
    target: Target
    rows: list[int]
    role: str
    loaded: runtime.LoadedModel
    route: runtime.Route
    matrix: Any = None
    predictions: Any = None
    request: tuple[bytes, str] | None = None


def _subset(parsed: protocol.ParsedRequest, rows: list[int]) -> protocol.ParsedRequest:
    return protocol.ParsedRequest(
        parsed.columns, [parsed.rows[i] for i in rows],
        [parsed.subject_ids[i] for i in rows] if parsed.subject_ids else None, parsed.params, parsed.form)


def reencoded(parsed: protocol.ParsedRequest) -> tuple[bytes, str]:
    """A group of a request's rows as a body MLflow's scoring server reads as it read the whole: CSV stays CSV
    (pandas infers the same types), JSON and Parquet become JSON in the request's own orientation."""
    if parsed.form == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(parsed.columns or [])
        writer.writerows(["" if v == "nan" else v for v in row] for row in parsed.rows)
        return out.getvalue().encode(), "text/csv"
    payload: dict[str, Any]
    if parsed.columns is None and parsed.rows and isinstance(parsed.rows[0], dict):
        payload = {"dataframe_records": parsed.rows}
    elif parsed.columns is None:
        payload = {"instances": parsed.rows}
    elif parsed.form == "tensors":
        payload = {"inputs": {c: [row[i] for row in parsed.rows] for i, c in enumerate(parsed.columns)}}
    else:
        payload = {"dataframe_split": {"columns": parsed.columns, "data": parsed.rows}}
    if parsed.params:
        payload["params"] = parsed.params
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), "application/json"


def _split(request: HttpRequest, parsed: protocol.ParsedRequest, groups: dict[Target | None, list[int]], *,
           env: str, token_id: str, started: float, key: str | None, endpoint: str) -> Answer:
    """Rows for several models: each group scored by its model, all logged once all have answered."""
    prepared: list[_Group] = []
    for target, rows in groups.items():
        if target is None:
            return _no_route(endpoint, env)
        route = _served(target, env)
        if isinstance(route, Answer):
            return route
        role, _deployment, loaded = route.pick(key)
        group = _Group(target, rows, role, loaded, route)
        sub = _subset(parsed, rows)
        try:
            if loaded.answers_requests:
                group.request = reencoded(sub)
            else:
                group.matrix = protocol.to_matrix(sub, loaded.columns, named=loaded.named, tensor=loaded.tensor,
                                                  allow_missing=loaded.missing_values)
                protocol.check_params(parsed.params, loaded.params)
        except protocol.InputError as exc:
            return views._input_error(protocol.InputError(f"{exc} (rows routed to {target.name})", exc.code,
                                                          exc.mlflow_code))
        prepared.append(group)
    timeout = settings.PORTAL_SCORING_TIMEOUT_SECONDS
    unit = views.unit_hash(key)
    for group in prepared:
        failure = _run(group, timeout=timeout, env=env, started=started, unit=unit, subjects=parsed.subject_ids)
        if failure is not None:
            return failure
    n = len(parsed.rows)
    predictions: list[Any] = [None] * n
    ids: list[str] = [""] * n
    models: list[str] = [""] * n
    versions: list[int] = [0] * n
    count_key = views._count_key(token_id)
    latency_ms = (time.perf_counter() - started) * 1000
    for group in prepared:
        group_ids = views._prediction_ids(len(group.rows))
        subjects = [parsed.subject_ids[i] for i in group.rows] if parsed.subject_ids else None
        logged = group.matrix if group.matrix is not None else [parsed.rows[i] for i in group.rows]
        # one latency for the request's groups: a caller waited for all of them
        count = buffer.emit(views._batch(name=group.target.name, env=env, role=group.role,
                                         version=group.loaded.version_number, matrix=logged,
                                         predictions=group.predictions, ids=group_ids, latency_ms=latency_ms,
                                         subjects=subjects, unit=unit), count_key=count_key)
        views._record_count(token_id, count)
        count_key = None  # one request counts once against the rate limit
        for j, i in enumerate(group.rows):
            predictions[i] = group.predictions[j]
            ids[i] = group_ids[j]
            models[i] = group.target.name
            versions[i] = group.loaded.version_number
        if group.route.mode == "shadow" and group.route.challenger is not None:
            views._shadow_pool.submit(views._shadow, group.route, group.target.name, env, group.matrix, group_ids,
                                      subjects, context.current().request_id, group.request)
    return Answer(200, orjson.dumps({"predictions": predictions, "prediction_ids": ids, "models": models,
                                     "model_versions": versions}, option=orjson.OPT_SERIALIZE_NUMPY), {})


def _run(group: _Group, *, timeout: float, env: str, started: float, unit: str,
         subjects: list[str] | None) -> Answer | None:
    """Score one group in its model's bulkhead; an error ``Answer`` (its failure logged as the model's own path
    logs it) or None with ``group.predictions`` set."""
    loaded, name = group.loaded, group.target.name
    if not loaded.enter():
        return views._busy(name, loaded)
    try:
        if group.request is not None:
            answer = loaded.invoke(*group.request, timeout=timeout)
            if answer.status != 200:
                return views._mlflow_error(answer)
            predictions = views._predictions(answer.body)
            group.matrix = views._logged_rows(answer, loaded.columns)
        else:
            predictions = loaded.predict(group.matrix, timeout=timeout)
    except (hosts.HostUnavailable, runtime.ScoringLimit) as exc:
        _log_failure(group, env, started, unit, subjects, f"{type(exc).__name__}: {exc}"[:500])
        if isinstance(exc, runtime.ScoringLimit):
            return views._limited(name, loaded, exc)
        return views._model_unavailable(name, loaded, exc)
    except Exception as exc:
        views.logger.exception("Model %s v%s failed in %s (endpoint rows)", name, loaded.version_number, env)
        _log_failure(group, env, started, unit, subjects, f"{type(exc).__name__}: {exc}"[:500])
        return views._error(500, "model_error", "The model failed on this input; the failure is logged.")
    finally:
        loaded.leave()
    if isinstance(predictions, np.ndarray):
        predictions = predictions.tolist()
    if not isinstance(predictions, list) or len(predictions) != len(group.rows):
        return views._model_unavailable(name, loaded, hosts.HostUnavailable(
            "its answer does not hold one prediction per row"))
    group.predictions = predictions
    return None


def _log_failure(group: _Group, env: str, started: float, unit: str, subjects: list[str] | None,
                 error: str) -> None:
    rows = group.rows
    buffer.emit(views._batch(name=group.target.name, env=env, role=group.role,
                             version=group.loaded.version_number,
                             matrix=group.matrix if group.matrix is not None else [None] * len(rows),
                             predictions=[], ids=views._prediction_ids(len(rows)),
                             latency_ms=(time.perf_counter() - started) * 1000,
                             subjects=[subjects[i] for i in rows] if subjects else None, error=error, unit=unit))

