"""Rollups: what the prediction log adds up to per model, environment, version, role and time bucket.

A minute is computed from the raw prediction log joined with its ground truth. Everything stored is additive:
counts, sums, a latency histogram on fixed log-spaced bins (``LATENCY_EDGES_MS``), per-feature histograms on the
version's reference bins (``registry.versions.profiling``), category counts, prediction counts and, for predictions with ground
truth, confusion counts and regression error sums. Hours and days are therefore sums of minutes, and percentiles are
read from merged histograms.

Incremental and idempotent: writing predictions or ground truth marks their minute dirty (``mark_dirty``) in the same
transaction; ``rollup_dirty`` recomputes each dirty minute from the raw rows, replaces it, and adds the difference
between its new and its old numbers to the minute's hour and day. Recomputing a minute twice changes nothing.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from django.db import connection, transaction
from django.dispatch import Signal
from django.utils import timezone

from monitoring.additive import add
from monitoring.drift import numeric_bins
from monitoring.models import Feedback, Granularity, PredictionLog, Rollup, RollupDirty
from registry.models import ModelVersion
from registry.serving.runtime import input_columns

# 20 bins per decade from 0.01 ms to 100 s: a percentile read from them is within 6 % of the exact value.
# Sent inside the roll-up's transaction once minutes ``[start, end)`` of a model and environment are recomputed
# (``model_name``, ``environment``, ``start``, ``end``): the experiments record their keyed units there
# (monitoring.experiments.units receives it).
minutes_rolled_up = Signal()
LATENCY_EDGES_MS = [10 ** (-2 + i / 20) for i in range(141)]
MAX_LABELS = 50
MAX_CONFUSION = 200
MAX_SEGMENTS = 20  # a categorical input with more categories than this is not summed per segment
OTHER = "__other__"
MISSING = "__missing__"
# Raw rows are read and summarised this many at a time. Per minute of 30k one-row predictions (20 inputs), measured
# in-process: 20,000 held 57 MB more at the peak than idle (which the allocator then keeps) and took 396 ms; 5,000
# holds 17 MB and takes 344 ms; 2,000 holds 7 MB but takes 442 ms.
CHUNK_ROWS = 5_000
CLASSIFIER_TYPES = {"long", "integer", "int", "int32", "int64", "string", "str", "boolean", "bool", "binary"}
REGRESSOR_TYPES = {"double", "float", "float32", "float64"}


def minute_of(ts: dt.datetime) -> dt.datetime:
    return ts.replace(second=0, microsecond=0)


def bucket_start(ts: dt.datetime, granularity: str) -> dt.datetime:
    ts = ts.astimezone(dt.UTC)
    if granularity == Granularity.DAY:
        return ts.replace(hour=0, minute=0, second=0, microsecond=0)
    if granularity == Granularity.HOUR:
        return ts.replace(minute=0, second=0, microsecond=0)
    return minute_of(ts)


# --- Reading merged buckets -------------------------------------------------------------------------------------

def percentile(hist: list[int], q: float) -> float | None:
    """The ``q``-quantile (0–1) of a latency histogram, interpolated geometrically inside its bin, in ms."""
    total = sum(hist)
    if not total:
        return None
    target = q * total
    seen = 0
    for i, n in enumerate(hist):
        if n and seen + n >= target:
            if i == 0:
                return LATENCY_EDGES_MS[0]
            if i >= len(LATENCY_EDGES_MS):
                return LATENCY_EDGES_MS[-1]
            lo, hi = LATENCY_EDGES_MS[i - 1], LATENCY_EDGES_MS[i]
            fraction = (target - seen) / n
            return lo * (hi / lo) ** fraction
        seen += n
    return LATENCY_EDGES_MS[-1]


# --- What a version's rows are compared with ---------------------------------------------------------------------

@dataclass
class FeatureSpec:
    name: str
    index: int
    kind: str  # numeric | categorical
    edges: np.ndarray | None = None
    categories: frozenset[str] = frozenset()


@dataclass
class VersionSpec:
    version: int
    features: list[FeatureSpec]
    target: FeatureSpec | None  # the reference's column of true values, for prediction drift
    task: str  # classification | regression | unknown
    reference: dict[str, Any] = field(default_factory=dict)


def segment_count(feature: FeatureSpec) -> int:
    """How many named categories a categorical feature has in its reference (the rest is ``OTHER``)."""
    return len(feature.categories - {OTHER, MISSING})


def category_key(value: Any, known: frozenset[str]) -> str:
    if value is None:
        return MISSING
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text if text in known else OTHER


def task_of(signature: dict[str, Any]) -> str:
    outputs = signature.get("outputs") or []
    kinds = {str(o.get("type", "")).lower() for o in outputs if isinstance(o, dict)}
    if not kinds:
        return "unknown"
    if kinds & REGRESSOR_TYPES:
        return "regression"
    if kinds <= CLASSIFIER_TYPES | {"tensor"}:
        element = [str(o.get("tensor-spec", {}).get("dtype", "")) for o in outputs if o.get("type") == "tensor"]
        if element and any(e.startswith("float") for e in element):
            return "regression"
        return "classification"
    return "unknown"


def target_column(profile: dict[str, Any], inputs: list[str], configured: str = "") -> str | None:
    features = profile.get("features") or {}
    if configured:
        return configured if configured in features else None
    others = [name for name in features if name not in set(inputs)]
    return others[0] if len(others) == 1 else None


def spec_from_profile(feature: str, index: int, profile: dict[str, Any]) -> FeatureSpec:
    if profile.get("kind") == "numeric":
        return FeatureSpec(feature, index, "numeric", edges=np.asarray(profile.get("edges") or [], dtype="float64"))
    return FeatureSpec(feature, index, "categorical", categories=frozenset(profile.get("frequencies") or {}))


def version_spec(model_name: str, version_number: int) -> VersionSpec:
    version = (ModelVersion.objects.select_related("reference", "model__monitoring")
               .filter(model__name=model_name, number=version_number).first())
    if version is None:
        return VersionSpec(version_number, [], None, "unknown")
    profile = version.reference.profile if version.reference else {}
    columns = input_columns(version)
    sensitive = set(version.sensitive_columns or {})
    features = []
    for i, name in enumerate(columns):
        ref = (profile.get("features") or {}).get(name)
        if ref is None or name in sensitive:  # encrypted at rest: no drift on personal data
            continue
        features.append(spec_from_profile(name, i, ref))
    settings_row = getattr(version.model, "monitoring", None) if hasattr(version.model, "monitoring") else None
    configured = settings_row.target_column if settings_row is not None else ""
    target_name = target_column(profile, columns, configured)
    target = spec_from_profile(target_name, -1, profile["features"][target_name]) if target_name else None
    return VersionSpec(version_number, features, target, task_of(version.signature or {}), profile)


# --- Computing minutes from raw rows -----------------------------------------------------------------------------

def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _matrix(inputs: list[Any], width: int) -> np.ndarray:
    try:
        matrix = np.array(inputs, dtype="float64")
        if matrix.ndim == 2 and matrix.shape[1] >= width:
            return matrix
    except (TypeError, ValueError):
        pass
    return np.array([[_as_float(v) for v in (row if isinstance(row, list) else [])[:width]]
                     + [math.nan] * max(0, width - len(row if isinstance(row, list) else []))
                     for row in inputs], dtype="float64").reshape(len(inputs), width)


def _label(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def summarise(rows: list[tuple[float, str, Any, Any, Any]] | list[tuple[float, str, Any, Any, Any, str]]
              | list[tuple[float, str, Any, Any, Any, str, str]], spec: VersionSpec) -> dict[str, Any]:
    """One bucket's additive numbers from its rows ``(latency_ms, error, inputs, output, actual[, request_id[,
    unit_hash]])``."""
    latencies = np.fromiter((r[0] for r in rows), dtype="float64", count=len(rows))
    latency = np.bincount(np.searchsorted(LATENCY_EDGES_MS, latencies, side="right"),
                          minlength=len(LATENCY_EDGES_MS) + 1)
    data: dict[str, Any] = {"latency": [int(c) for c in latency], "latency_sum": float(latencies.sum())}
    if spec.features:
        inputs = [r[2] for r in rows if r[2] is not None]
        width = max(f.index for f in spec.features) + 1
        numeric = [f for f in spec.features if f.kind == "numeric"]
        matrix = _matrix(inputs, width) if numeric and inputs else None
        features: dict[str, Any] = {}
        for f in spec.features:
            if f.kind == "numeric":
                assert f.edges is not None
                features[f.name] = (numeric_bins(matrix[:, f.index], f.edges) if matrix is not None
                                    else [0] * (len(f.edges) + 2))
            else:
                features[f.name] = dict(Counter(category_key(row[f.index] if isinstance(row, list) and
                                                             f.index < len(row) else None, f.categories)
                                                for row in inputs))
        data["features"] = features
    outputs = [r[3] for r in rows if not r[1] and r[3] is not None]
    labels = Counter(_label(o) for o in outputs if not _is_number(o) or float(o).is_integer())
    if len(labels) > MAX_LABELS:
        kept = dict(labels.most_common(MAX_LABELS))
        kept[OTHER] = sum(labels.values()) - sum(kept.values())
        labels = Counter(kept)
    numbers = np.array([float(o) for o in outputs if _is_number(o)], dtype="float64")
    data["predictions"] = {"labels": dict(labels), "n": int(numbers.size), "sum": float(numbers.sum()),
                           "sq": float((numbers ** 2).sum())}
    if spec.target is not None:
        t = spec.target
        if t.kind == "numeric" and t.edges is not None:
            data["predictions"]["bins"] = numeric_bins(np.array([_as_float(o) for o in outputs], dtype="float64"),
                                                        t.edges)
        else:
            data["predictions"]["cats"] = dict(Counter(category_key(o, t.categories) for o in outputs))
    truth_rows = [r for r in rows if r[4] is not None and not r[1]]
    labelled = [(r[3], r[4]) for r in truth_rows]
    if labelled:
        confusion: Counter[str] = Counter()
        for predicted, actual in labelled:
            key = orjson.dumps([_label(predicted), _label(actual)]).decode()
            confusion[key if key in confusion or len(confusion) < MAX_CONFUSION else OTHER] += 1
        data["truth"] = {**truth_sums(labelled), "confusion": dict(confusion)}
        segmented = [f for f in spec.features if f.kind == "categorical" and segment_count(f) <= MAX_SEGMENTS]
        if segmented:
            # Per category of each categorical input (of few categories), the same sums: an experiment asked for
            # one column's segments reads them (``monitoring.experiments.selectors``).
            segments: dict[str, Any] = {}
            for f in segmented:
                by_category: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
                for r in truth_rows:
                    row = r[2]
                    by_category[category_key(row[f.index] if isinstance(row, list) and f.index < len(row) else None,
                                             f.categories)].append((r[3], r[4]))
                segments[f.name] = {category: truth_sums(pairs) for category, pairs in by_category.items()}
            data["truth"]["segments"] = segments
    if rows and len(rows[0]) > 5:
        # A request's rows share one time, hence one minute: the count stays additive across buckets.
        data["requests"] = len({r[5] or f"row{i}" for i, r in enumerate(rows)})  # type: ignore[misc]
        # What the router assigns is a unit: a routing key or subject (counted once per experiment, in
        # ``monitoring.experiments.units``), or, for a request with neither, the request itself, counted here.
        data["anonymous"] = len({r[5] or f"row{i}" for i, r in enumerate(rows)
                                 if len(r) < 7 or not r[6]})  # type: ignore[misc]
    return data


LOG_LOSS_EPS = 1e-15


def truth_sums(labelled: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Of ``(predicted, actual)`` pairs: how many, how many right, the regression error sums (n, sum |e|, sum e^2,
    sum y, sum y^2) and ``outcome_sums``."""
    correct = 0
    reg = [0, 0.0, 0.0, 0.0, 0.0]
    for predicted, actual in labelled:
        correct += _label(predicted) == _label(actual)
        if _is_number(predicted) and _is_number(actual):
            error = float(predicted) - float(actual)
            reg[0] += 1
            reg[1] += abs(error)
            reg[2] += error * error
            reg[3] += float(actual)
            reg[4] += float(actual) ** 2
    return {"n": len(labelled), "correct": correct, "reg": reg, **outcome_sums(labelled)}


def outcome_sums(labelled: list[tuple[Any, Any]]) -> dict[str, list[float]]:
    """Sufficient statistics (n, sum, sum of squares) of the per-prediction values the experiments test: the ground
    truth itself as a number (a business outcome: converted 0/1, revenue), and the log loss of a predicted
    probability of class 1 against a 0/1 truth."""
    outcome = [0, 0.0, 0.0]
    logloss = [0, 0.0, 0.0]
    for predicted, actual in labelled:
        value = float(actual) if _is_number(actual) or isinstance(actual, bool) else None
        if value is None:
            continue
        outcome[0] += 1
        outcome[1] += value
        outcome[2] += value * value
        if _is_number(predicted) and 0.0 <= float(predicted) <= 1.0 and value in (0.0, 1.0):
            p = min(max(float(predicted), LOG_LOSS_EPS), 1 - LOG_LOSS_EPS)
            loss = -math.log(p) if value == 1.0 else -math.log(1 - p)
            logloss[0] += 1
            logloss[1] += loss
            logloss[2] += loss * loss
    return {"outcome": outcome, "logloss": logloss}


ROW_SQL = """
SELECT p.created_at, p.version, p.role, p.latency_ms, p.error, CAST(p.inputs AS TEXT), CAST(p.output AS TEXT),
       CAST(f.actual AS TEXT), p.request_id, p.unit_hash
FROM {log} p LEFT JOIN {feedback} f ON f.prediction_id = p.id
WHERE p.model_name = %s AND p.environment = %s AND p.created_at >= %s AND p.created_at < %s
"""


def _raw_rows(model_name: str, environment: str, start: dt.datetime, end: dt.datetime) -> Iterator[list[Any]]:
    sql = ROW_SQL.format(log=PredictionLog._meta.db_table, feedback=Feedback._meta.db_table)
    with connection.chunked_cursor() as cursor:
        cursor.execute(sql, [model_name, environment, start, end])
        while True:
            chunk = cursor.fetchmany(CHUNK_ROWS)
            if not chunk:
                return
            yield chunk


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _created(value: Any) -> dt.datetime:
    if isinstance(value, str):  # SQLite through a raw cursor
        value = dt.datetime.fromisoformat(value)
    if timezone.is_naive(value):
        value = value.replace(tzinfo=dt.UTC)
    return value


Key = tuple[dt.datetime, int, str]  # (bucket start, version, role)


def compute_minutes(model_name: str, environment: str, start: dt.datetime, end: dt.datetime,
                    specs: dict[int, VersionSpec] | None = None) -> dict[Key, dict[str, Any]]:
    """Every minute in ``[start, end)`` from the raw rows: ``{(minute, version, role): {count, errors, labelled,
    data}}``. Rows are read in chunks; only the sums are kept."""
    specs = {} if specs is None else specs
    result: dict[Key, dict[str, Any]] = {}
    for chunk in _raw_rows(model_name, environment, start, end):
        groups: dict[Key, list[tuple[float, str, Any, Any, Any, str, str]]] = defaultdict(list)
        for created, version, role, latency, error, inputs, output, actual, request_id, unit in chunk:
            groups[(minute_of(_created(created)), int(version), role)].append(
                (float(latency), error or "", _loads(inputs), _loads(output), _loads(actual), request_id or "",
                 unit or ""))
        for key, rows in groups.items():
            spec = specs.get(key[1])
            if spec is None:
                spec = specs[key[1]] = version_spec(model_name, key[1])
            part = {"count": len(rows), "errors": sum(1 for r in rows if r[1]),
                    "labelled": sum(1 for r in rows if r[4] is not None and not r[1]), "data": summarise(rows, spec)}
            result[key] = add(result.get(key), part) if key in result else part
    return result


# --- Marking and rolling up --------------------------------------------------------------------------------------

def mark_dirty(keys: Iterable[tuple[str, str, dt.datetime]]) -> None:
    """Mark ``(model_name, environment, any time in the minute)`` for rolling up; call inside the writer's
    transaction. Marks are appended, never updated: flushers writing the same minute at once take no lock on a shared
    row (an upsert here serialised them), and a mark made while its minute is being rolled up is a row that roll-up
    did not select, so it survives it."""
    now = timezone.now()
    marks = {(m, e, minute_of(ts.astimezone(dt.UTC))) for m, e, ts in keys}
    if marks:
        RollupDirty.objects.bulk_create(
            [RollupDirty(model_name=m, environment=e, minute=t, marked_at=now) for m, e, t in sorted(marks)])


def mark_dirty_for_predictions(prediction_ids: list[str]) -> None:
    """Ground truth arrived for these predictions: their minutes (where already logged) need rolling up again."""
    for i in range(0, len(prediction_ids), 5000):
        rows = PredictionLog.objects.filter(id__in=prediction_ids[i:i + 5000]).values_list(
            "model_name", "environment", "created_at")
        mark_dirty(rows)


MAX_GAP = dt.timedelta(minutes=60)


def _runs(minutes: list[dt.datetime]) -> list[tuple[dt.datetime, dt.datetime]]:
    """Marked minutes joined into ``[start, end)`` runs, each read in one query. Minutes less than ``MAX_GAP`` apart
    share a run: the clean minutes between them are recomputed too, which changes nothing (a recomputation is
    idempotent) and costs less than a query per minute when traffic is sparse."""
    runs: list[tuple[dt.datetime, dt.datetime]] = []
    step = dt.timedelta(minutes=1)
    for minute in sorted(minutes):
        if runs and minute - runs[-1][1] < MAX_GAP:
            runs[-1] = (runs[-1][0], minute + step)
        else:
            runs.append((minute, minute + step))
    return runs


def _apply(model_name: str, environment: str, granularity: str, deltas: dict[Key, dict[str, Any]]) -> None:
    """Add ``deltas`` to the stored buckets of ``granularity`` (creating and deleting rows as they appear and
    empty)."""
    if not deltas:
        return
    starts = {k[0] for k in deltas}
    existing = {(r.start, r.version, r.role): r for r in Rollup.objects.select_for_update().filter(
        model_name=model_name, environment=environment, granularity=granularity, start__in=starts)}
    create: list[Rollup] = []
    update: list[Rollup] = []
    delete: list[int] = []
    for key, delta in deltas.items():
        row = existing.get(key)
        if row is None:
            row = Rollup(model_name=model_name, environment=environment, granularity=granularity, start=key[0],
                         version=key[1], role=key[2])
        row.count += delta["count"]
        row.errors += delta["errors"]
        row.labelled += delta["labelled"]
        row.data = add(row.data or {}, delta["data"])
        if row.pk is None:
            if row.count or row.labelled:
                create.append(row)
        elif row.count <= 0 and row.labelled <= 0:
            delete.append(row.pk)
        else:
            update.append(row)
    Rollup.objects.bulk_create(create, batch_size=500)
    Rollup.objects.bulk_update(update, ["count", "errors", "labelled", "data"], batch_size=500)
    Rollup.objects.filter(pk__in=delete).delete()


def _negate(part: dict[str, Any]) -> dict[str, Any]:
    return {"count": -part["count"], "errors": -part["errors"], "labelled": -part["labelled"],
            "data": add({}, part["data"], -1)}


def rollup_range(model_name: str, environment: str, start: dt.datetime, end: dt.datetime,
                 specs: dict[int, VersionSpec] | None = None) -> int:
    """Recompute the minutes of ``[start, end)`` and correct their hours and days; returns the minutes written.
    Runs in the caller's transaction."""
    new = compute_minutes(model_name, environment, start, end, specs)
    old = {(r.start, r.version, r.role): {"count": r.count, "errors": r.errors, "labelled": r.labelled,
                                          "data": r.data}
           for r in Rollup.objects.select_for_update().filter(
               model_name=model_name, environment=environment, granularity=Granularity.MINUTE, start__gte=start,
               start__lt=end)}
    deltas: dict[Key, dict[str, Any]] = {}
    for key in new.keys() | old.keys():
        if key in new and key in old:
            deltas[key] = add(new[key], _negate(old[key]))
        else:
            deltas[key] = new[key] if key in new else _negate(old[key])
    for granularity in (Granularity.MINUTE, Granularity.HOUR, Granularity.DAY):
        merged: dict[Key, dict[str, Any]] = {}
        for (minute, version, role), delta in deltas.items():
            key = (bucket_start(minute, granularity), version, role)
            merged[key] = add(merged[key], delta) if key in merged else delta
        _apply(model_name, environment, granularity, merged)
    minutes_rolled_up.send(sender=Rollup, model_name=model_name, environment=environment, start=start, end=end)
    return len(new)


def rollup_dirty(*, limit: int = 5000) -> int:
    """Roll up marked minutes (oldest first, at most ``limit`` per call); returns how many minutes were done. A minute
    marked again while it is being rolled up stays marked and is done on the next call."""
    done = 0
    pairs = list(RollupDirty.objects.values_list("model_name", "environment").distinct())
    for model_name, environment in pairs:
        with transaction.atomic():
            marks = list(RollupDirty.objects.select_for_update(skip_locked=True).filter(
                model_name=model_name, environment=environment).order_by("minute")[:limit])
            if not marks:
                continue
            specs: dict[int, VersionSpec] = {}
            minutes = {m.minute for m in marks}
            for start, end in _runs(list(minutes)):
                rollup_range(model_name, environment, start, end, specs)
            RollupDirty.objects.filter(pk__in=[m.pk for m in marks]).delete()
            done += len(minutes)
    return done


def rollups(model_name: str, environment: str, granularity: str, start: dt.datetime, end: dt.datetime,
            roles: Iterable[str] | None = None) -> list[Rollup]:
    qs = Rollup.objects.filter(model_name=model_name, environment=environment, granularity=granularity,
                               start__gte=start, start__lt=end)
    if roles is not None:
        qs = qs.filter(role__in=list(roles))
    return list(qs.order_by("start", "version", "role"))
