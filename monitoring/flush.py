"""Monitoring's flusher: moves prediction records from serving's buffer into the prediction log, in bulk.

Nothing is lost when the flusher dies mid-way: records are moved atomically from the buffer to a processing list
(Redis LMOVE) before they are written, the processing list is written again on the next run, and rows are keyed by
prediction id so writing twice inserts once. In the embedded mode the outbox rows are deleted in the same
transaction that inserts them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
from django.db import transaction

from monitoring.models import PredictionLog
from monitoring.sensitive import protect_row, sensitive_positions
from registry.models import PredictionOutbox
from registry.serving import buffer

BATCHES_PER_RUN = 500


def _rows(batch: dict[str, Any]) -> list[PredictionLog]:
    created = dt.datetime.fromtimestamp(batch["ts"], tz=dt.UTC)
    ids, inputs, outputs = batch["ids"], batch["inputs"], batch["outputs"] or [None] * len(batch["ids"])
    positions = sensitive_positions(batch["model"], batch["version"])
    if positions:  # personal and health columns never reach the database in clear
        inputs = [protect_row(row, positions) for row in inputs]
    subjects = batch.get("subjects") or [""] * len(ids)
    per_row = batch["latency_ms"] / max(len(ids), 1)
    return [PredictionLog(id=ids[i], model_name=batch["model"], version=batch["version"],
                          environment=batch["environment"], role=batch["role"], created_at=created,
                          latency_ms=per_row if len(ids) > 1 else batch["latency_ms"], inputs=inputs[i],
                          output=outputs[i] if i < len(outputs) else None, subject_hash=subjects[i] or "",
                          request_id=batch.get("request_id", ""), error=batch.get("error", ""),
                          shadow_of=(batch.get("shadow_of") or [""] * len(ids))[i])
            for i in range(len(ids))]


def write_batches(batches: list[dict[str, Any]]) -> int:
    rows = [row for batch in batches for row in _rows(batch)]
    PredictionLog.objects.bulk_create(rows, ignore_conflicts=True, batch_size=2000)
    return len(rows)


def flush_predictions() -> int:
    """Drain the buffer once; returns how many predictions were written."""
    client = buffer.redis_client()
    if client is None:
        return _flush_outbox()
    written = 0
    # Leftovers of a flusher that died after moving but before writing.
    leftovers = client.lrange(buffer.PROCESSING_KEY, 0, -1)
    if leftovers:
        written += write_batches([orjson.loads(raw) for raw in leftovers])
        client.delete(buffer.PROCESSING_KEY)
    for _ in range(BATCHES_PER_RUN // 50):
        moved = []
        for _ in range(50):
            raw = client.lmove(buffer.REDIS_KEY, buffer.PROCESSING_KEY, "LEFT", "RIGHT")
            if raw is None:
                break
            moved.append(raw)
        if not moved:
            break
        written += write_batches([orjson.loads(raw) for raw in moved])
        client.delete(buffer.PROCESSING_KEY)
    return written


def _flush_outbox() -> int:
    written = 0
    while True:
        with transaction.atomic():
            pending = list(PredictionOutbox.objects.select_for_update(skip_locked=True).order_by("pk")[:200])
            if not pending:
                return written
            written += write_batches([p.payload for p in pending])
            PredictionOutbox.objects.filter(pk__in=[p.pk for p in pending]).delete()
