# Today's flusher before issue 24 (a Redis list, a processing list and a lock: one flusher at a time), kept verbatim
# from monitoring/flush.py at 0321c87 as the baseline of bench/ingest.py. Nothing in the portal imports it.
"""Monitoring's flusher: moves prediction records from serving's buffer into the prediction log, in bulk.

Nothing is lost when the flusher dies mid-way: records are moved atomically from the buffer to a processing list
(Redis LMOVE) before they are written, the processing list is written again on the next run, and rows are keyed by
prediction id so writing twice inserts once. The outbox rows (the embedded mode's buffer, and where serving
writes while Redis is unreachable) are deleted in the same transaction that inserts them.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import time
from typing import Any

import orjson
from django.db import connection, transaction

from monitoring.models import PredictionLog
from monitoring.rollups import mark_dirty
from monitoring.sensitive import protect_row, sensitive_positions
from registry.models import PredictionOutbox
from registry.serving import buffer

MOVE_BATCHES = 500  # records (one per request) moved and written at a time
FLUSH_BUDGET_SECONDS = 10  # a run drains until the buffer is empty or this much time has passed
LOCK_KEY = "portal:predictions:flush-lock"
logger = logging.getLogger(__name__)


COLUMNS = ("id", "model_name", "version", "environment", "role", "created_at", "latency_ms", "inputs", "output",
           "subject_hash", "request_id", "error", "shadow_of")
TEXT_COLUMNS = ("id", "model_name", "environment", "role", "subject_hash", "request_id", "error", "shadow_of")
COPY_ABOVE = 50  # rows; fewer go through the ORM (and always on SQLite)


def _rows(batch: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The batch's rows as tuples in ``COLUMNS`` order (no model instances: the flusher's hot loop)."""
    created = dt.datetime.fromtimestamp(batch["ts"], tz=dt.UTC)
    ids, inputs, outputs = batch["ids"], batch["inputs"], batch["outputs"] or [None] * len(batch["ids"])
    n = len(ids)
    positions = sensitive_positions(batch["model"], batch["version"])
    if positions:  # personal and health columns never reach the database in clear
        inputs = [protect_row(row, positions) for row in inputs]
    subjects = batch.get("subjects") or [""] * n
    shadow_of = batch.get("shadow_of") or [""] * n
    latency = batch["latency_ms"] / n if n > 1 else batch["latency_ms"]
    model, version, environment, role = batch["model"], batch["version"], batch["environment"], batch["role"]
    request_id, error = batch.get("request_id", ""), batch.get("error", "")
    return [(ids[i], model, version, environment, role, created, latency, inputs[i],
             outputs[i] if i < len(outputs) else None, subjects[i] or "", request_id, error, shadow_of[i])
            for i in range(n)]


def write_batches(batches: list[dict[str, Any]]) -> int:
    """Insert the batches' rows, skipping ids already there. On PostgreSQL the rows go through COPY into a staging
    table and one INSERT … ON CONFLICT DO NOTHING (several times faster than multi-row INSERTs)."""
    rows = [row for batch in batches for row in _rows(batch)]
    with transaction.atomic():
        if connection.vendor == "postgresql" and len(rows) > COPY_ABOVE:
            _copy(rows)
        else:
            PredictionLog.objects.bulk_create([PredictionLog(**dict(zip(COLUMNS, row))) for row in rows],
                                              ignore_conflicts=True, batch_size=2000)
        mark_dirty((b["model"], b["environment"], dt.datetime.fromtimestamp(b["ts"], tz=dt.UTC)) for b in batches)
    return len(rows)


def _json(value: Any) -> str:
    return "" if value is None else orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def _copy(rows: list[tuple[Any, ...]]) -> None:
    table = PredictionLog._meta.db_table
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    stamps: dict[dt.datetime, str] = {}
    for r in rows:  # empty unquoted fields are NULL in COPY's CSV format; JSON null is stored as SQL NULL, as the ORM does
        stamp = stamps.get(r[5]) or stamps.setdefault(r[5], r[5].isoformat())
        writer.writerow((*r[:5], stamp, r[6], _json(r[7]), _json(r[8]), *r[9:]))
    out.seek(0)
    columns = ", ".join(COLUMNS)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS predlog_stage (LIKE {table}) ON COMMIT DELETE ROWS")
        cursor.copy_expert(f"COPY predlog_stage ({columns}) FROM STDIN WITH (FORMAT csv, FORCE_NOT_NULL "
                            f"({', '.join(TEXT_COLUMNS)}))", out)  # type: ignore[attr-defined]
        cursor.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM predlog_stage ON CONFLICT DO NOTHING")
        cursor.execute("TRUNCATE predlog_stage")


def flush_predictions() -> int:
    """Drain the buffer once; returns how many predictions were written. With Redis, the database outbox is drained
    too: serving writes there while Redis is unreachable."""
    client = buffer.redis_client()
    if client is None:
        return _flush_outbox()
    try:
        written = _flush_redis(client)
    finally:
        written_outbox = _flush_outbox()  # even when Redis is away: that is when the outbox fills
    return written + written_outbox


def drain(*, timeout: float = FLUSH_BUDGET_SECONDS * 6) -> int:
    """Flush until nothing is on its way to the log, and return how many predictions this call wrote. A flush that
    finds another flusher at work (beat's) moves nothing while that flusher still holds records in the processing list
    or locked outbox rows: wait for it, up to ``timeout`` (the flush lock's own lifetime), then log and give up."""
    client = buffer.redis_client()
    written = 0
    deadline = time.monotonic() + timeout
    while True:
        moved = flush_predictions()
        written += moved
        if moved:
            continue
        in_redis = client is not None and (client.llen(buffer.REDIS_KEY) or client.llen(buffer.PROCESSING_KEY))
        if not in_redis and not PredictionOutbox.objects.exists():
            return written
        if time.monotonic() >= deadline:
            logger.warning("Prediction flusher: records still on their way to the log after %.0f s", timeout)
            return written
        time.sleep(0.1)


def _flush_redis(client: Any) -> int:
    """Move up to ``MOVE_BATCHES`` records at a time (one atomic round trip) and write them, until the buffer is
    empty or ``FLUSH_BUDGET_SECONDS`` have passed. One flusher at a time (a Redis lock): two would each write what
    the other moved to the processing list."""
    lock = client.lock(LOCK_KEY, timeout=FLUSH_BUDGET_SECONDS * 6, blocking=False)
    if not lock.acquire(blocking=False):
        return 0
    try:
        written = 0
        # Leftovers of a flusher that died after moving but before writing.
        leftovers = client.lrange(buffer.PROCESSING_KEY, 0, -1)
        if leftovers:
            written += write_batches([orjson.loads(raw) for raw in leftovers])
            client.delete(buffer.PROCESSING_KEY)
        deadline = time.monotonic() + FLUSH_BUDGET_SECONDS
        while time.monotonic() < deadline:
            pipe = client.pipeline(transaction=True)
            for _ in range(MOVE_BATCHES):
                pipe.lmove(buffer.REDIS_KEY, buffer.PROCESSING_KEY, "LEFT", "RIGHT")
            moved = [raw for raw in pipe.execute() if raw is not None]
            if not moved:
                break
            written += write_batches([orjson.loads(raw) for raw in moved])
            client.delete(buffer.PROCESSING_KEY)
        return written
    finally:
        try:
            lock.release()
        except Exception:  # expired (a very slow write): the next flusher takes over
            logger.warning("Prediction flusher: the lock expired before the flush ended")


def _flush_outbox() -> int:
    written = 0
    while True:
        with transaction.atomic():
            pending = list(PredictionOutbox.objects.select_for_update(skip_locked=True).order_by("pk")[:200])
            if not pending:
                return written
            written += write_batches([p.payload for p in pending])
            PredictionOutbox.objects.filter(pk__in=[p.pk for p in pending]).delete()
