"""Native PostgreSQL partitioning of the prediction log (by day of ``created_at``) and the rollups (by month of
``start``): partitions are created ahead by beat, and retention drops whole partitions instead of deleting rows.

Each partitioned table keeps a DEFAULT partition for rows outside the ranges made so far (a clock far off, a very
old replay); when a range is created later, its rows move out of the default in the same transaction. Queries that
say a time range (every monitoring query does) read only the partitions in it: PostgreSQL prunes the rest.

On SQLite (the embedded mode) the tables stay plain and everything here does nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record

logger = logging.getLogger(__name__)
EXACT_COUNT_BELOW = 5_000_000


@dataclass(frozen=True)
class Spec:
    table: str
    column: str
    unit: str  # "day" or "month"
    ahead: int  # units created ahead of now
    retention_setting: str  # settings name: days to keep (0: for ever)


SPECS = (
    Spec("monitoring_predictionlog", "created_at", "day", 7, "PORTAL_PREDICTION_LOG_RETENTION_DAYS"),
    Spec("monitoring_rollup", "start", "month", 2, "PORTAL_ROLLUP_RETENTION_DAYS"),
)


def enabled() -> bool:
    return connection.vendor == "postgresql"


def unit_start(ts: dt.datetime, unit: str) -> dt.datetime:
    ts = ts.astimezone(dt.UTC)
    if unit == "day":
        return ts.replace(hour=0, minute=0, second=0, microsecond=0)
    return ts.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_start(start: dt.datetime, unit: str) -> dt.datetime:
    if unit == "day":
        return start + dt.timedelta(days=1)
    return (start + dt.timedelta(days=32)).replace(day=1)


def partition_name(spec: Spec, start: dt.datetime) -> str:
    return f"{spec.table}_p{start:%Y%m%d}"


@dataclass(frozen=True)
class Partition:
    name: str
    lower: dt.datetime | None  # None: the default partition
    upper: dt.datetime | None
    rows_estimate: int


def partitions(spec: Spec) -> list[Partition]:
    """The table's partitions, oldest first (the default partition last), with the planner's row estimates."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), GREATEST(c.reltuples, 0)::bigint "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE p.relname = %s", [spec.table])
        rows = cursor.fetchall()
    found = []
    for name, bound, estimate in rows:
        if bound == "DEFAULT":
            found.append(Partition(name, None, None, int(estimate)))
            continue
        # FOR VALUES FROM ('2026-11-29 00:00:00+00') TO ('2026-11-30 00:00:00+00')
        lower, upper = (dt.datetime.fromisoformat(part.split("'")[1]) for part in bound.split(" TO "))
        found.append(Partition(name, lower, upper, int(estimate)))
    return sorted(found, key=lambda p: (p.lower is None, p.lower or dt.datetime.min.replace(tzinfo=dt.UTC)))


def _create(cursor: Any, spec: Spec, start: dt.datetime) -> str:
    """Create the partition for [start, next); rows already in the default partition for that range move into it.
    Identifiers in the SQL here come from ``SPECS`` and ``pg_class``, never from input."""
    name, end = partition_name(spec, start), next_start(start, spec.unit)
    default = f"{spec.table}_default"
    cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {default} WHERE {spec.column} >= %s AND {spec.column} < %s)",  # noqa: S608 - see above
                   [start, end])
    stranded = cursor.fetchone()[0]
    if stranded:
        cursor.execute(f"ALTER TABLE {spec.table} DETACH PARTITION {default}")
    cursor.execute(f"CREATE TABLE {name} PARTITION OF {spec.table} FOR VALUES FROM (%s) TO (%s)", [start, end])
    if stranded:
        cursor.execute(f"WITH moved AS (DELETE FROM {default} WHERE {spec.column} >= %s AND {spec.column} < %s "  # noqa: S608 - see above
                       f"RETURNING *) INSERT INTO {spec.table} SELECT * FROM moved", [start, end])
        cursor.execute(f"ALTER TABLE {spec.table} ATTACH PARTITION {default} DEFAULT")
    return name


def partitions_ensure(*, now: dt.datetime | None = None, back: int = 1,
                      extra_starts: dict[str, list[dt.datetime]] | None = None) -> list[str]:
    """Create the partitions from ``back`` units before now to ``ahead`` units after (and, per table, those holding
    ``extra_starts``); returns the names created. Idempotent."""
    if not enabled():
        return []
    now = now or timezone.now()
    created = []
    for spec in SPECS:
        existing = {p.lower for p in partitions(spec) if p.lower is not None}
        start = unit_start(now, spec.unit)
        for _ in range(back):
            start = unit_start(start - dt.timedelta(days=1), spec.unit)
        wanted = []
        for _ in range(back + spec.ahead + 1):
            wanted.append(start)
            start = next_start(start, spec.unit)
        wanted += [unit_start(ts, spec.unit) for ts in (extra_starts or {}).get(spec.table, [])]
        for start in sorted(set(wanted) - existing):
            with transaction.atomic(), connection.cursor() as cursor:
                created.append(_create(cursor, spec, start))
    if created:
        logger.info("Created %s partitions, %s to %s", len(created), min(created), max(created))
    return created


def partitions_drop_expired(*, now: dt.datetime | None = None) -> dict[str, list[str]]:
    """Drop every partition wholly older than its table's retention (``PORTAL_PREDICTION_LOG_RETENTION_DAYS``,
    ``PORTAL_ROLLUP_RETENTION_DAYS``; 0 keeps everything). One audit event per dropped partition, in the transaction
    that drops it, with its row count."""
    if not enabled():
        return {}
    now = now or timezone.now()
    dropped: dict[str, list[str]] = {}
    for spec in SPECS:
        days = int(getattr(settings, spec.retention_setting))
        if not days:
            continue
        cutoff = now - dt.timedelta(days=days)
        for part in partitions(spec):
            if part.upper is None or part.upper > cutoff:
                continue
            with transaction.atomic(), connection.cursor() as cursor:
                exact = part.rows_estimate < EXACT_COUNT_BELOW  # counting a billion rows would take minutes
                if exact:
                    cursor.execute(f"SELECT count(*) FROM {part.name}")  # noqa: S608 - a name from pg_class
                    rows = cursor.fetchone()[0]
                else:
                    rows = part.rows_estimate
                cursor.execute(f"ALTER TABLE {spec.table} DETACH PARTITION {part.name}")
                cursor.execute(f"DROP TABLE {part.name}")
                audit_record(AuditAction.RETENTION_DROP_PARTITION, actor=None,
                             target=Target("partition", part.name, f"{spec.table} {part.lower:%Y-%m-%d} to "
                                                                   f"{part.upper:%Y-%m-%d}"),
                             after={"rows_dropped": rows, "rows_exact": exact},
                             metadata={"retention_days": days, "older_than": cutoff.isoformat(), "table": spec.table})
            dropped.setdefault(spec.table, []).append(part.name)
    return dropped


def partitions_maintain() -> dict[str, Any]:
    """Beat's hourly call: create ahead, drop what retention let go."""
    return {"created": partitions_ensure(), "dropped": partitions_drop_expired()}
