"""Cutting a snapshot: the prediction log of one model and environment in a window, joined with its ground truth,
read in keyset-paginated chunks (one query per chunk, ground truth by a correlated subquery on its unique index) and
written chunk by chunk as Parquet parts; the parts are then streamed into one file with ``pyarrow``'s
``ParquetWriter``, one row group per chunk, so memory stays bounded by a chunk whatever the snapshot's size.

Each part is durable before the snapshot row moves its ``cursor`` past it, so a worker that dies is replaced by one
that carries on from the last whole chunk (a part written but not yet recorded is simply written again).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.dispatch import Signal
from django.utils import timezone

from monitoring.models import DatasetSnapshot, Feedback, PredictionLog, SnapshotStatus
from monitoring.sensitive import MASK, PREFIX, encrypt_value
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import AuditOutcome
from registry import storage
from registry.models import ModelVersion

logger = logging.getLogger(__name__)
# Sent inside the transaction that finishes a snapshot, ready or failed (``snapshot``): the retraining requests
# waiting on it call CI or fail (monitoring.datasets.retraining receives it).
snapshot_finished = Signal()

ROLES = ("champion", "canary")  # what production answered; shadow rows repeat the champion's inputs
SIGNATURE_TYPES = {"double": "float64", "float": "float64", "long": "int64", "integer": "int64",
                   "boolean": "bool", "string": "string"}
FIXED_COLUMNS = (("prediction_id", "string"), ("created_at", "timestamp"), ("version", "int32"), ("role", "string"),
                 ("subject_hash", "string"))


class SnapshotError(Exception):
    """A cut that cannot go on (the reason is shown on the snapshot)."""


def snapshot_target(snapshot: DatasetSnapshot) -> Target:
    return Target("dataset_snapshot", str(snapshot.uid), str(snapshot)[:255], snapshot.model.team.slug)


def window_rows(*, model_name: str, environment: str, version: int | None, start: dt.datetime, end: dt.datetime,
                labelled_only: bool = False) -> Any:
    """The log rows a snapshot holds: online predictions whose inputs are still there (neither erased nor purged)."""
    qs = PredictionLog.objects.filter(model_name=model_name, environment=environment, created_at__gte=start,
                                      created_at__lt=end, role__in=ROLES, inputs__isnull=False)
    if version is not None:
        qs = qs.filter(version=version)
    if labelled_only:
        qs = qs.filter(Exists(Feedback.objects.filter(prediction_id=OuterRef("id"))))
    return qs


# --- Columns ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Feature:
    name: str
    arrow: str  # float64 | int64 | bool | string | json
    sensitive: str  # "" | personal | health
    treatment: str  # "" | dropped | masked | encrypted


def plan_features(model: Any, versions: list[int], treatment: dict[str, str]) -> tuple[list[Feature],
                                                                                     dict[int, list[str]]]:
    """The union of the versions' input columns (first version's order first), their Arrow types from the
    signatures (conflicting types: JSON text) and the treatment of each sensitive column; and per version the names
    of the positions in its logged rows."""
    names_by_version: dict[int, list[str]] = {}
    types: dict[str, set[str]] = {}
    sensitive: dict[str, str] = {}
    order: list[str] = []
    for v in ModelVersion.objects.filter(model=model, number__in=versions).order_by("number"):
        inputs = [c for c in (v.signature or {}).get("inputs", []) if isinstance(c, dict)]
        names = [str(c.get("name") or f"input_{i}") for i, c in enumerate(inputs)]
        if not names:
            first = PredictionLog.objects.filter(model_name=model.name, version=v.number,
                                                 inputs__isnull=False).values_list("inputs", flat=True).first()
            names = [f"input_{i}" for i in range(len(first) if isinstance(first, list) else 0)]
        names_by_version[v.number] = names
        for i, name in enumerate(names):
            if name not in types:
                order.append(name)
            kind = str(inputs[i].get("type", "")) if i < len(inputs) else ""
            types.setdefault(name, set()).add(SIGNATURE_TYPES.get(kind, "json"))
        for name, kind in (v.sensitive_columns or {}).items():
            sensitive.setdefault(name, kind)
    features = []
    for name in order:
        kind = sensitive.get(name, "")
        how = (treatment.get(name) or settings.PORTAL_SNAPSHOT_SENSITIVE.get(kind, "dropped")) if kind else ""
        arrow = "string" if how in ("masked", "encrypted") else (next(iter(types[name])) if len(types[name]) == 1
                                                                 else "json")
        features.append(Feature(name, arrow, kind, how))
    return features, names_by_version


def _value_type(values: list[Any]) -> str:
    seen = [v for v in values if v is not None]
    if seen and all(isinstance(v, bool | int | float) for v in seen):
        return "float64"
    if seen and all(isinstance(v, str) for v in seen):
        return "string"
    return "json" if seen else "float64"


ARROW = {"float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_(), "string": pa.string(),
         "json": pa.string(), "int32": pa.int32(), "timestamp": pa.timestamp("us", tz="UTC")}


def arrow_schema(schema: list[list[str]]) -> pa.Schema:
    return pa.schema([pa.field(name, ARROW[kind]) for name, kind in schema])


def _fit(value: Any, kind: str) -> tuple[Any, bool]:
    """(the value as the column's type, whether it fitted); a value that does not fit is written as null."""
    if value is None:
        return None, True
    if kind == "json":
        return orjson.dumps(value).decode(), True
    if kind == "string":
        return (value, True) if isinstance(value, str) else (orjson.dumps(value).decode(), True)
    if kind == "bool":
        return (value, True) if isinstance(value, bool) else (None, False)
    if kind == "int64":
        if isinstance(value, bool):
            return int(value), True
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value), True
        return None, False
    if isinstance(value, bool | int | float):
        return float(value), True
    return None, False


def _treat(value: Any, how: str) -> Any:
    if value is None:
        return None
    if how == "masked":
        return MASK
    if how == "encrypted":  # the log already holds the ciphertext; a plaintext (marked after logging) is sealed now
        return value if isinstance(value, str) and value.startswith(PREFIX) else encrypt_value(value)
    return value


# --- Reading the log in chunks --------------------------------------------------------------------------------

def read_chunk(snapshot: DatasetSnapshot, cursor: list[str] | None, limit: int) -> list[tuple[Any, ...]]:
    """The next ``limit`` rows after ``cursor`` in (time, id) order: one query, the log LEFT JOIN its ground truth
    (unique per prediction), the time index's range scan starting at the cursor; JSON decoded with orjson."""
    log, truth = PredictionLog._meta.db_table, Feedback._meta.db_table
    where = ["p.model_name = %s", "p.environment = %s", "p.created_at >= %s", "p.created_at < %s",
             f"p.role IN ({', '.join(['%s'] * len(ROLES))})", "p.inputs IS NOT NULL"]
    params: list[Any] = [snapshot.model.name, snapshot.environment, snapshot.window_start, snapshot.window_end, *ROLES]
    if snapshot.version is not None:
        where.append("p.version = %s")
        params.append(snapshot.version)
    if snapshot.labelled_only:
        where.append("f.id IS NOT NULL")
    if cursor:
        at = dt.datetime.fromisoformat(cursor[0])
        where.append("p.created_at >= %s AND (p.created_at > %s OR p.id > %s)")
        params += [at, at, cursor[1]]
    sql = (f"SELECT p.id, p.created_at, p.version, p.role, p.subject_hash, p.inputs, p.output, f.actual, "  # noqa: S608 - names from the models, values as parameters
           f"f.id IS NOT NULL FROM {log} p LEFT JOIN {truth} f ON f.prediction_id = p.id "
           f"WHERE {' AND '.join(where)} ORDER BY p.created_at, p.id LIMIT %s")
    with connection.cursor() as cur:
        cur.execute(sql, [*params, limit])
        fetched = cur.fetchall()
    return [(pid, _aware(at), version, role, subject, _json(inputs), _json(output), _json(actual), bool(has))
            for pid, at, version, role, subject, inputs, output, actual, has in fetched]


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _aware(value: Any) -> dt.datetime:
    if isinstance(value, str):  # SQLite hands a raw cursor text
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _column(values: list[Any], kind: str) -> tuple[pa.Array, int]:
    """An Arrow column of ``kind``: at C speed when every value fits, else value by value (misfits become null and
    are counted)."""
    if kind not in ("json",):
        try:
            return pa.array(values, type=ARROW[kind]), 0
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            pass
    fitted = [_fit(v, kind) for v in values]
    return pa.array([v for v, _ok in fitted], type=ARROW[kind]), sum(1 for _v, ok in fitted if not ok)


def chunk_table(rows: list[tuple[Any, ...]], schema: list[list[str]], features: list[Feature],
                names_by_version: dict[int, list[str]], stats: dict[str, Any]) -> pa.Table:
    """One chunk as an Arrow table of ``schema``; ``stats`` (rows, labelled, per version, values that did not fit
    their column) is added to. Rows of one version are transposed in one go (``zip``), not value by value."""
    kinds = dict((name, kind) for name, kind in schema)
    n = len(rows)
    pids, ats, versions, roles, subjects, inputs, outputs, actuals, labelled = (list(c) for c in zip(*rows,
                                                                                                      strict=True))
    kept = [f for f in features if f.treatment != "dropped"]
    columns: dict[str, list[Any]] = {}
    by_version: dict[int, list[int]] = {}
    for i, version in enumerate(versions):
        by_version.setdefault(version, []).append(i)
    for version, idx in by_version.items():
        names = names_by_version.get(version, [])
        width = len(names)
        picked = [inputs[i] for i in idx]
        transposed: list[Any]
        if all(isinstance(row, list) and len(row) == width for row in picked):
            transposed = list(zip(*picked, strict=True)) if picked and width else []
        else:  # rows of another shape: matched by position as far as they go
            transposed = [[row[p] if isinstance(row, list) and p < len(row) else None for row in picked]
                          for p in range(width)]
        position = {name: p for p, name in enumerate(names)}
        whole = len(idx) == n
        for f in kept:
            p = position.get(f.name)
            part = list(transposed[p]) if p is not None and transposed else [None] * len(idx)
            if f.treatment:
                part = [_treat(v, f.treatment) for v in part]
            if whole:
                columns[f.name] = part
            else:
                target = columns.setdefault(f.name, [None] * n)
                for i, v in zip(idx, part, strict=True):
                    target[i] = v
    misfits = 0
    arrays: dict[str, pa.Array] = {
        "prediction_id": pa.array(pids, type=pa.string()), "created_at": pa.array(ats, type=ARROW["timestamp"]),
        "version": pa.array(versions, type=pa.int32()), "role": pa.array(roles, type=pa.string()),
        "subject_hash": pa.array([s or None for s in subjects], type=pa.string()),
        "labelled": pa.array(labelled, type=pa.bool_())}
    for name, values in (*((f.name, columns.get(f.name, [None] * n)) for f in kept), ("prediction", outputs),
                         ("actual", actuals)):
        arrays[name], bad = _column(values, kinds[name])
        misfits += bad
    stats["rows"] = stats.get("rows", 0) + n
    stats["labelled"] = stats.get("labelled", 0) + sum(labelled)
    per = stats.setdefault("versions", {})
    for version, idx in by_version.items():
        per[str(version)] = per.get(str(version), 0) + len(idx)
    stats["values_not_fitting"] = stats.get("values_not_fitting", 0) + misfits
    return pa.table({name: arrays[name] for name, _kind in schema}, schema=arrow_schema(schema))


def first_schema(rows: list[tuple[Any, ...]], features: list[Feature]) -> list[list[str]]:
    schema = [[name, kind] for name, kind in FIXED_COLUMNS]
    schema += [[f.name, f.arrow] for f in features if f.treatment != "dropped"]
    schema.append(["prediction", _value_type([r[6] for r in rows])])
    schema.append(["actual", _value_type([r[7] for r in rows])])
    schema.append(["labelled", "bool"])
    return schema


# --- The worker's loop --------------------------------------------------------------------------------------------

def part_name(snapshot: DatasetSnapshot, index: int) -> str:
    return f"datasets/{snapshot.uid}/part-{index:06d}.parquet"


def snapshot_cut(*, snapshot_id: int, max_chunks: int | None = None,
                 after_chunk: Callable[[int], None] | None = None) -> DatasetSnapshot | None:
    """Claim a pending snapshot (or one whose worker stopped beating) and write it to the end; returns the row, or
    None when another worker holds it. ``max_chunks`` stops early (what a crash looks like, for tests)."""
    now = timezone.now()
    stale = now - dt.timedelta(seconds=settings.PORTAL_SNAPSHOT_STALE_SECONDS)
    claimed = DatasetSnapshot.objects.filter(pk=snapshot_id).filter(
        Q(status=SnapshotStatus.PENDING) | Q(status=SnapshotStatus.RUNNING, heartbeat_at__lt=stale)).update(
        status=SnapshotStatus.RUNNING, heartbeat_at=now, started_at=now)
    if not claimed:
        return None
    snapshot = DatasetSnapshot.objects.select_related("model__team").get(pk=snapshot_id)
    try:
        versions = sorted(int(v) for v in snapshot.manifest.get("source_versions", []))
        features, names_by_version = plan_features(snapshot.model, versions, snapshot.sensitive_treatment)
        limit = int(settings.PORTAL_SNAPSHOT_CHUNK_ROWS)
        written = 0
        while True:
            rows = read_chunk(snapshot, snapshot.cursor, limit)
            if not rows:
                break
            schema = snapshot.schema or first_schema(rows, features)
            stats = dict(snapshot.stats)
            table = chunk_table(rows, schema, features, names_by_version, stats)
            sink = io.BytesIO()
            pq.write_table(table, sink, compression="zstd")
            storage.put_work_file(part_name(snapshot, snapshot.chunks_done), sink.getvalue())
            last = rows[-1]
            cursor = [last[1].isoformat(), last[0]]
            moved = DatasetSnapshot.objects.filter(pk=snapshot.pk, status=SnapshotStatus.RUNNING,
                                                   chunks_done=snapshot.chunks_done).update(
                chunks_done=snapshot.chunks_done + 1, cursor=cursor, schema=schema, stats=stats,
                rows_done=stats["rows"], heartbeat_at=timezone.now())
            if not moved:  # another worker took it over (we were presumed dead): leave it to them
                return None
            snapshot.chunks_done += 1
            snapshot.cursor, snapshot.schema, snapshot.stats, snapshot.rows_done = cursor, schema, stats, stats["rows"]
            written += 1
            if after_chunk is not None:
                after_chunk(snapshot.chunks_done)
            if max_chunks is not None and written >= max_chunks:
                return snapshot
            if len(rows) < limit:
                break
        if not snapshot.chunks_done:
            raise SnapshotError("No rows were left in the window when the worker read it (erased or purged since the "
                                "snapshot was asked for).")
        return _finalize(snapshot, features)
    except SnapshotError as exc:
        return snapshot_fail(snapshot, str(exc))
    except Exception as exc:
        logger.exception("Snapshot %s failed", snapshot.uid)
        return snapshot_fail(snapshot, f"{type(exc).__name__}: {exc}"[:2000])


def _parts(snapshot: DatasetSnapshot) -> Iterator[pa.Table]:
    for index in range(snapshot.chunks_done):
        yield pq.read_table(io.BytesIO(storage.read_work_file(part_name(snapshot, index))))


@dataclass
class Written:
    sha256: str
    size: int
    rows: int
    dropped: int
    labelled: int
    per_version: dict[str, int]


def write_filtered(tables: Iterator[pa.Table], schema: pa.Schema, drop_subjects: set[str], out: Path) -> Written:
    """Stream ``tables`` into one Parquet file at ``out`` (a row group each), leaving out the rows of
    ``drop_subjects``; counts what was written."""
    kept = dropped = labelled = 0
    per_version: dict[str, int] = {}
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for table in tables:
            if drop_subjects:
                mask = pc.fill_null(pc.is_in(table.column("subject_hash"),
                                             value_set=pa.array(sorted(drop_subjects))), False)
                removed = int(pc.sum(mask).as_py() or 0)
                if removed:
                    table = table.filter(pc.invert(mask))
                    dropped += removed
            if table.num_rows:
                writer.write_table(table)
            kept += table.num_rows
            labelled += int(pc.sum(table.column("labelled")).as_py() or 0)
            for item in pc.value_counts(table.column("version")).to_pylist():
                per_version[str(item["values"])] = per_version.get(str(item["values"]), 0) + int(item["counts"])
    sha, size = storage.sha256_of_file(out)
    return Written(sha, size, kept, dropped, labelled, per_version)


def _tmp_path(prefix: str) -> Path:
    tmp_dir = Path(settings.VAR_DIR) / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".parquet", dir=tmp_dir)
    os.close(fd)
    return Path(name)


def _finalize(snapshot: DatasetSnapshot, features: list[Feature]) -> DatasetSnapshot:
    schema = arrow_schema(snapshot.schema)
    erased: set[str] = set(snapshot.erase_subjects)
    while True:
        out = _tmp_path(f"snapshot-{snapshot.uid}-")
        written = write_filtered(_parts(snapshot), schema, erased, out)
        sha, size, rows = written.sha256, written.size, written.rows
        with transaction.atomic():
            locked = DatasetSnapshot.objects.select_for_update().get(pk=snapshot.pk)
            if set(locked.erase_subjects) - erased:  # an erasure arrived while we wrote: write again without them
                erased = set(locked.erase_subjects)
                out.unlink(missing_ok=True)
                continue
            if rows == 0:
                out.unlink(missing_ok=True)
                raise SnapshotError("Every row of the window was erased while the snapshot was being cut.")
            blob = storage.blob_put_moved(out, sha256=sha, size=size)
            stats = locked.stats
            manifest = {
                **locked.manifest,
                "format": "parquet", "sha256": sha, "size": size, "rows": rows,
                "labelled_rows": written.labelled,
                "label_coverage": round(written.labelled / rows, 6) if rows else 0.0,
                "rows_per_version": written.per_version,
                "values_not_fitting": stats.get("values_not_fitting", 0),
                "chunks": locked.chunks_done,
                "columns": [{"name": n, "type": k} for n, k in locked.schema],
                "sensitive_columns": {f.name: {"kind": f.sensitive, "treatment": f.treatment}
                                      for f in features if f.sensitive},
                "subject_ids": "HMAC-SHA256 of the subject id under PORTAL_SUBJECT_HASH_KEY (the prediction log's "
                               "subject_hash); raw ids are never stored",
                "rows_erased_while_cutting": written.dropped,
                "finished_at": timezone.now().isoformat(),
                "chain": [],
            }
            DatasetSnapshot.objects.filter(pk=snapshot.pk).update(
                status=SnapshotStatus.READY, blob=blob, sha256=sha, size=size, manifest=manifest, rows_done=rows,
                finished_at=timezone.now(), heartbeat_at=timezone.now(), error="")
            snapshot.refresh_from_db()
            audit_record(AuditAction.DATASET_READY, actor=None, target=snapshot_target(snapshot),
                         after={"sha256": sha, "rows": rows, "size": size, "label_coverage": manifest["label_coverage"]})
            snapshot_finished.send(sender=DatasetSnapshot, snapshot=snapshot)
        break
    storage.delete_work_files(f"datasets/{snapshot.uid}")
    return snapshot


def snapshot_fail(snapshot: DatasetSnapshot, message: str) -> DatasetSnapshot:
    with transaction.atomic():
        DatasetSnapshot.objects.filter(pk=snapshot.pk).update(status=SnapshotStatus.FAILED, error=message,
                                                              finished_at=timezone.now())
        snapshot.refresh_from_db()
        audit_record(AuditAction.DATASET_FAIL, actor=None, target=snapshot_target(snapshot),
                     outcome=AuditOutcome.FAILURE, after={"error": message})
        snapshot_finished.send(sender=DatasetSnapshot, snapshot=snapshot)
    storage.delete_work_files(f"datasets/{snapshot.uid}")
    return snapshot

