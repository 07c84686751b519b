"""Which units an experiment assigned to which arm: what its sample-ratio check counts.

The router assigns a request by its routing key (``X-Routing-Key``, else its first subject id), sticky: the same key
always lands on the same side while the split stays. A user who sends fifty requests is therefore one assignment,
not fifty, and counting requests would let a few heavy users fake a sample-ratio mismatch (or hide one). The log
keeps each prediction's key as a keyed hash (``PredictionLog.unit_hash``); when the roll-up recomputes a minute it
also records, here, each keyed unit of a running experiment in the arm of its first request (``units_record``).
Recording is idempotent (one row per experiment and unit, the earliest request wins), so minutes rolled up twice or
out of order change nothing. Requests without a key are each their own unit and are counted from the rollups
(``data.anonymous``), so neither count ever needs a scan of the log.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from django.db import connection
from django.db.models import Q
from django.dispatch import receiver

from monitoring.experiments.models import Experiment, ExperimentUnit
from monitoring.models import PredictionLog
from monitoring.rollups import minutes_rolled_up

INSERT_CHUNK = 1000
ERASED_UNIT = "-"  # a keyed prediction whose key hash was erased (GDPR erasure, retention purge)


def _experiments_over(model_name: str, environment: str, start: dt.datetime, end: dt.datetime) -> list[Experiment]:
    return list(Experiment.objects.filter(model__name=model_name, environment=environment, started_at__lt=end)
                .filter(Q(ended_at__isnull=True) | Q(ended_at__gte=start)))


@receiver(minutes_rolled_up, dispatch_uid="monitoring.experiments.units.units_record")
def _minutes_rolled_up(*, model_name: str, environment: str, start: dt.datetime, end: dt.datetime, **_: Any) -> None:
    units_record(model_name, environment, start, end)


def units_record(model_name: str, environment: str, start: dt.datetime, end: dt.datetime) -> int:
    """Record the keyed units of the experiments on this model and environment whose time overlaps ``[start, end)``;
    returns how many (unit, experiment) rows were offered. Runs in the roll-up's transaction."""
    offered = 0
    for experiment in _experiments_over(model_name, environment, start, end):
        arms = {("champion", experiment.champion_version): "champion",
                ("canary", experiment.challenger_version): "challenger"}
        lower = max(start, experiment.started_at)
        upper = min(end, experiment.ended_at) if experiment.ended_at is not None else end
        if lower >= upper:
            continue
        rows = (PredictionLog.objects.filter(model_name=model_name, environment=environment, created_at__gte=lower,
                                             created_at__lt=upper, role__in=("champion", "canary"))
                .exclude(unit_hash__in=("", ERASED_UNIT)).order_by("created_at")
                .values_list("unit_hash", "role", "version", "created_at"))
        first: dict[str, tuple[str, dt.datetime]] = {}
        for unit, role, version, created in rows.iterator(chunk_size=5000):
            arm = arms.get((role, version))
            if arm is not None and unit not in first:
                first[unit] = (arm, created)
        _upsert(experiment.pk, first)
        offered += len(first)
    return offered


def units_unlink(digest: str) -> int:
    """An erased subject's key hash leaves the experiments' assignments; the assignment itself stays counted (under
    a random name, unique per experiment), so the sample-ratio check does not change. Returns the rows renamed."""
    rows = list(ExperimentUnit.objects.filter(unit_hash=digest).values_list("pk", flat=True))
    for pk in rows:
        ExperimentUnit.objects.filter(pk=pk).update(unit_hash=f"erased-{os.urandom(16).hex()}")
    return len(rows)


def _upsert(experiment_id: int, first: dict[str, tuple[str, dt.datetime]]) -> None:
    """Insert each unit, or move it to an earlier first request (a minute rolled up after a later one)."""
    table = ExperimentUnit._meta.db_table
    items = list(first.items())
    for i in range(0, len(items), INSERT_CHUNK):
        part = items[i:i + INSERT_CHUNK]
        values = ", ".join(["(%s, %s, %s, %s)"] * len(part))
        params: list[Any] = []
        for unit, (arm, created) in part:
            params.extend([experiment_id, unit, arm, created])
        sql = f"INSERT INTO {table} (experiment_id, unit_hash, arm, first_seen) VALUES {values} "  # noqa: S608
        with connection.cursor() as cursor:  # the table's name is ours, the values are parameters
            cursor.execute(
                sql + "ON CONFLICT (experiment_id, unit_hash) DO UPDATE SET arm = EXCLUDED.arm, "
                f"first_seen = EXCLUDED.first_seen WHERE EXCLUDED.first_seen < {table}.first_seen", params)
