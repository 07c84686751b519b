"""Native partitioning of the prediction log (by day) and the rollups (by month) on PostgreSQL: made ahead, rows in
the right partition, stranded rows moved out of the default, retention dropping whole partitions with an audit
event, and monitoring queries reading only the partitions in their range."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from django.db import connection

from monitoring import partitions
from monitoring.flush import write_batches
from monitoring.models import PredictionLog, Rollup
from portal.audit.verify import verify_chain
from portal.models import AuditEvent

pytestmark = [pytest.mark.django_db,
              pytest.mark.skipif("connection.vendor != 'postgresql'", reason="partitioning is PostgreSQL's")]
LOG = partitions.SPECS[0]


def _batch(at: dt.datetime, n: int = 2, prefix: str = "p") -> dict[str, Any]:
    return {"model": "m", "environment": "dev", "version": 1, "role": "champion", "ts": at.timestamp(),
            "latency_ms": 1.0, "request_id": "", "error": "", "ids": [f"{prefix}{at:%Y%m%d%H}{i:06d}" for i in range(n)],
            "inputs": [[1.0, 2.0]] * n, "outputs": [0] * n, "subjects": None}


def _home(prediction_id: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT tableoid::regclass::text FROM monitoring_predictionlog WHERE id = %s", [prediction_id])
        return str(cursor.fetchone()[0])


def test_both_tables_are_partitioned_with_days_made_ahead() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT c.relname, p.partstrat FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid")
        assert dict(cursor.fetchall()) == {"monitoring_predictionlog": "r", "monitoring_rollup": "r"}
    today = partitions.unit_start(dt.datetime.now(dt.UTC), "day")
    starts = {p.lower for p in partitions.partitions(LOG)}
    assert {today + dt.timedelta(days=d) for d in range(LOG.ahead + 1)} <= starts
    assert partitions.partitions_ensure() == [], "idempotent"


def test_rows_land_in_their_days_partition_and_replays_insert_once() -> None:
    now = dt.datetime.now(dt.UTC)
    batch = _batch(now, n=300)  # > 200 rows: the COPY path
    assert write_batches([batch]) == 300
    write_batches([batch])  # a flusher that died after writing runs again
    assert PredictionLog.objects.filter(model_name="m").count() == 300
    assert _home(batch["ids"][0]) == partitions.partition_name(LOG, partitions.unit_start(now, "day"))
    small = _batch(now, n=3, prefix="s")  # the ORM path
    write_batches([small])
    write_batches([small])
    assert PredictionLog.objects.filter(model_name="m").count() == 303


def test_a_row_outside_the_made_days_waits_in_the_default_and_moves_when_its_day_is_made() -> None:
    far = dt.datetime.now(dt.UTC) + dt.timedelta(days=100)
    batch = _batch(far)
    write_batches([batch])
    assert _home(batch["ids"][0]) == "monitoring_predictionlog_default"
    created = partitions.partitions_ensure(now=far)
    assert partitions.partition_name(LOG, partitions.unit_start(far, "day")) in created
    assert _home(batch["ids"][0]) == partitions.partition_name(LOG, partitions.unit_start(far, "day"))
    assert PredictionLog.objects.filter(id__in=batch["ids"]).count() == 2


def test_retention_drops_whole_partitions_with_an_audit_event(settings: Any) -> None:
    now = dt.datetime.now(dt.UTC)
    old, recent = now - dt.timedelta(days=60), now - dt.timedelta(hours=1)
    partitions.partitions_ensure(extra_starts={LOG.table: [old]})
    write_batches([_batch(old, n=5, prefix="o"), _batch(recent, n=4, prefix="r")])
    Rollup.objects.create(model_name="m", environment="dev", version=1, role="champion", granularity="day",
                          start=partitions.unit_start(old, "day"), count=5)
    settings.PORTAL_PREDICTION_LOG_RETENTION_DAYS = 0
    assert partitions.partitions_drop_expired() == {}, "0 keeps everything"
    settings.PORTAL_PREDICTION_LOG_RETENTION_DAYS = 30
    dropped = partitions.partitions_drop_expired()
    old_name = partitions.partition_name(LOG, partitions.unit_start(old, "day"))
    assert old_name in dropped[LOG.table] and "monitoring_rollup" not in dropped
    assert old_name not in {p.name for p in partitions.partitions(LOG)}
    assert PredictionLog.objects.filter(model_name="m").count() == 4, "only the old day went"
    assert Rollup.objects.filter(model_name="m").count() == 1, "rollups keep their own retention"
    event = AuditEvent.objects.get(action="retention.drop_partition", target_id=old_name)
    assert event.after["rows_dropped"] == 5 and event.after["rows_exact"] is True
    assert event.metadata["retention_days"] == 30 and verify_chain().ok


def test_a_monitoring_query_reads_only_the_partitions_in_its_range() -> None:
    from monitoring.rollups import ROW_SQL

    now = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    write_batches([_batch(now - dt.timedelta(days=d), prefix=f"d{d}") for d in range(3)])
    sql = ROW_SQL.format(log="monitoring_predictionlog", feedback="monitoring_feedback")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE monitoring_predictionlog")
        cursor.execute("EXPLAIN (FORMAT JSON) " + sql, ["m", "dev", now, now + dt.timedelta(hours=1)])
        plan = cursor.fetchone()[0]
    plan = json.loads(plan) if isinstance(plan, str) else plan
    touched: set[str] = set()

    def walk(node: dict[str, Any]) -> None:
        if "Relation Name" in node:
            touched.add(node["Relation Name"])
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    logs = {t for t in touched if t.startswith("monitoring_predictionlog")}
    assert logs == {partitions.partition_name(LOG, partitions.unit_start(now, "day"))}, touched
