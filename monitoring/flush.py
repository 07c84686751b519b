"""Monitoring's flushers: move prediction records from serving's buffer into the prediction log, in bulk.

Any number of flushers run at once, on any hosts. Serving adds each record to one of the Redis stream keys
(``registry/serving/buffer.py``); every flusher reads new entries through the consumer group (``XREADGROUP``), so each
entry is delivered to one flusher, writes their rows in one transaction, and only then acknowledges and deletes the
entries (``XACK`` and ``XDEL`` in one script, which also counts them). A flusher that dies after reading leaves its
entries pending in the group: after ``PORTAL_PREDICTION_CLAIM_SECONDS`` another flusher takes them over
(``XAUTOCLAIM``) and writes them again. Rows are keyed by prediction id and inserted with ``ON CONFLICT DO NOTHING``,
so a record written twice (its flusher died between the commit and the acknowledgement) is in the log once.

The outbox rows (the embedded mode's buffer, and where serving writes while Redis is unreachable) are deleted in the
same transaction that inserts them.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
from django.conf import settings
from django.db import IntegrityError, connection, transaction

from monitoring.ingest import flushed_key, raise_alarms
from monitoring.models import PredictionLog
from monitoring.rollups import mark_dirty
from monitoring.sensitive import protect_row, sensitive_positions
from registry.models import PredictionOutbox
from registry.serving import buffer

MOVE_BATCHES = 1000  # records (one per request) read from one stream key and written at a time
FLUSH_BUDGET_SECONDS = 10  # a run drains until the buffer is empty or this much time has passed
FAN_OUT_KEY = "portal:predlog:fan-out"
CONSUMER_IDLE_FORGET_MS = 3_600_000  # a consumer (a flusher process) with nothing pending, idle this long, is removed
logger = logging.getLogger(__name__)


COLUMNS = ("id", "model_name", "version", "environment", "role", "created_at", "latency_ms", "inputs", "output",
           "subject_hash", "request_id", "error", "shadow_of", "unit_hash")
TEXT_COLUMNS = ("id", "model_name", "environment", "role", "subject_hash", "request_id", "error", "shadow_of",
                "unit_hash")
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
    request_id, error, unit = batch.get("request_id", ""), batch.get("error", ""), batch.get("unit") or ""
    return [(ids[i], model, version, environment, role, created, latency, inputs[i],
             outputs[i] if i < len(outputs) else None, subjects[i] or "", request_id, error, shadow_of[i], unit)
            for i in range(n)]


def write_batches(batches: list[dict[str, Any]], *, first_delivery: bool = False) -> int:
    """Insert the batches' rows, skipping ids already there. On PostgreSQL the rows go through COPY into a staging
    table and one INSERT … ON CONFLICT DO NOTHING (several times faster than multi-row INSERTs). Records read for the
    first time (``first_delivery``) are copied straight into the log instead, in a savepoint (half the database's
    work); should one of them be there already (its write raced a Redis timeout into the outbox), the savepoint is
    rolled back and the staging table used."""
    rows = [row for batch in batches for row in _rows(batch)]
    with transaction.atomic():
        if connection.vendor == "postgresql" and len(rows) > COPY_ABOVE:
            out = _csv(rows)
            if not (first_delivery and _copy_direct(out)):
                _copy(out)
        else:
            PredictionLog.objects.bulk_create([PredictionLog(**dict(zip(COLUMNS, row, strict=True))) for row in rows],
                                              ignore_conflicts=True, batch_size=2000)
        minutes = {(b["model"], b["environment"], int(b["ts"] // 60)) for b in batches}
        mark_dirty((model, environment, dt.datetime.fromtimestamp(minute * 60, tz=dt.UTC))
                   for model, environment, minute in minutes)
    return len(rows)


def _csv(rows: list[tuple[Any, ...]]) -> io.StringIO:
    """The rows in COPY's CSV format: empty unquoted fields are NULL; JSON null is stored as SQL NULL, as the ORM
    does. (The flusher's hot loop: names bound locally, a batch's one timestamp formatted once.)"""
    out = io.StringIO()
    writerow = csv.writer(out, lineterminator="\n").writerow
    dumps, option = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
    last, stamp = None, ""
    for r in rows:
        if r[5] is not last:
            last, stamp = r[5], r[5].isoformat()
        inputs, output = r[7], r[8]
        writerow((r[0], r[1], r[2], r[3], r[4], stamp, r[6],
                  "" if inputs is None else dumps(inputs, option=option).decode(),
                  "" if output is None else dumps(output, option=option).decode(), r[9], r[10], r[11], r[12],
                  r[13]))
    out.seek(0)
    return out


_COPY_OPTIONS = f"WITH (FORMAT csv, FORCE_NOT_NULL ({', '.join(TEXT_COLUMNS)}))"


def _copy_direct(out: io.StringIO) -> bool:
    """COPY the rows into the log itself; False (nothing written) when one of them is there already."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.copy_expert(f"COPY {PredictionLog._meta.db_table} ({', '.join(COLUMNS)}) FROM STDIN "
                               f"{_COPY_OPTIONS}", out)  # type: ignore[attr-defined]
        return True
    except (IntegrityError, connection.Database.IntegrityError):  # type: ignore[attr-defined]
        out.seek(0)
        return False


def _copy(out: io.StringIO) -> None:
    table = PredictionLog._meta.db_table
    columns = ", ".join(COLUMNS)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS predlog_stage (LIKE {table}) ON COMMIT DELETE ROWS")
        cursor.copy_expert(f"COPY predlog_stage ({columns}) FROM STDIN {_COPY_OPTIONS}", out)  # type: ignore[attr-defined]
        cursor.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM predlog_stage "  # noqa: S608 - our names
                       "ON CONFLICT DO NOTHING")
        cursor.execute("TRUNCATE predlog_stage")


def flush_predictions(*, on_backlog: Callable[[], None] | None = None) -> int:
    """Drain the buffer once; returns how many predictions this flusher wrote. With Redis, the database outbox is
    drained too: serving writes there while Redis is unreachable. ``on_backlog`` is called (once) when a read comes
    back full, that is when more flushers would help (the task starts another)."""
    client = buffer.redis_client()
    if client is None:
        return _flush_outbox()
    try:
        written = _flush_streams(client, on_backlog=on_backlog)
    finally:
        written_outbox = _flush_outbox()  # even when Redis is away: that is when the outbox fills
    return written + written_outbox


def drain(*, timeout: float = FLUSH_BUDGET_SECONDS * 6) -> int:
    """Flush until nothing is on its way to the log, and return how many predictions this call wrote. Records another
    flusher has read but not yet acknowledged are waited for (or taken over once they have been pending for
    ``PORTAL_PREDICTION_CLAIM_SECONDS``: their flusher died), up to ``timeout``; then log and give up."""
    client = buffer.redis_client()
    written = 0
    deadline = time.monotonic() + timeout
    while True:
        moved = flush_predictions()
        written += moved
        if moved:
            continue
        if not (client is not None and _waiting_in_redis(client)) and not PredictionOutbox.objects.exists():
            return written
        if time.monotonic() >= deadline:
            logger.warning("Prediction flusher: records still on their way to the log after %.0f s", timeout)
            return written
        time.sleep(0.1)


def _waiting_in_redis(client: Any) -> bool:
    pipe = client.pipeline(transaction=False)
    for key in buffer.stream_keys():
        pipe.xlen(key)
    return any(pipe.execute())


# --- Redis Streams ---------------------------------------------------------------------------------------------------

# Acknowledge entries, delete them (a stream holds only records not yet in the log) and count the deletions, in one
# step: KEYS[1] the stream, KEYS[2] its counter of flushed entries (same hash tag, so the same cluster slot).
_ACK_SCRIPT = """
local n = 0
for i = 2, #ARGV, 500 do
  local ids = {}
  for j = i, math.min(i + 499, #ARGV) do ids[#ids + 1] = ARGV[j] end
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  n = n + redis.call('XDEL', KEYS[1], unpack(ids))
end
if n > 0 then redis.call('INCRBY', KEYS[2], n) end
return n
"""


@functools.lru_cache(maxsize=4)
def _consumer_name(pid: int) -> str:
    """This process's name in the consumer group (one per process: a forked worker is a flusher of its own)."""
    return f"{socket.gethostname()}:{pid}:{os.urandom(3).hex()}"


def ensure_groups(client: Any, keys: list[str] | None = None) -> None:
    """Create the consumer group on each stream key (and the key itself), from the stream's first entry."""
    import redis

    for key in keys or buffer.stream_keys():
        try:
            client.xgroup_create(key, buffer.STREAM_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def _grouped(client: Any, command: Callable[[], Any], key: str) -> Any:
    """Run a consumer-group command, creating the group first when the key or group is not there yet."""
    import redis

    try:
        return command()
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
    ensure_groups(client, [key])
    return command()


def _read(client: Any, key: str, consumer: str, start: str) -> list[tuple[bytes, bytes | None]]:
    """Up to ``MOVE_BATCHES`` entries for this consumer: new ones (``>``), or the ones it read before and did not
    acknowledge (``0``). An entry whose content is gone (``None``) was trimmed while pending."""
    # The command's name as bytes: redis-py then hands back the reply as read (lists), without turning each entry into
    # a dict (a third of the flusher's Python time with one-row records).
    reply = _grouped(client, lambda: client.execute_command(
        b"XREADGROUP", "GROUP", buffer.STREAM_GROUP, consumer, "COUNT", MOVE_BATCHES, "STREAMS", key, start), key)
    if not reply:
        return []
    return [(entry_id, fields[1] if fields else None) for entry_id, fields in reply[0][1]]


def _claim(client: Any, key: str, consumer: str, deadline: float) -> int:
    """Take over and write the entries other flushers read and left unacknowledged for longer than the claim time."""
    idle_ms = int(settings.PORTAL_PREDICTION_CLAIM_SECONDS * 1000)
    written, cursor = 0, b"0-0"
    while time.monotonic() < deadline:
        reply = _grouped(client, functools.partial(client.execute_command, "XAUTOCLAIM", key, buffer.STREAM_GROUP,
                                                   consumer, idle_ms, cursor, "COUNT", MOVE_BATCHES), key)
        cursor, claimed = reply[0], reply[1]
        trimmed = reply[2] if len(reply) > 2 else []
        if trimmed:
            logger.error("Prediction flusher: %d records pending in %s were trimmed (MAXLEN) before they were "
                         "written: they are lost", len(trimmed), key)
        if claimed:
            logger.warning("Prediction flusher: took over %d records another flusher left unacknowledged in %s",
                           len(claimed), key)
            written += _write_entries(client, key, [(i, f[buffer.STREAM_FIELD] if f else None) for i, f in claimed])
        if cursor in (b"0-0", "0-0"):
            return written
    return written


def _write_entries(client: Any, key: str, entries: list[tuple[bytes, bytes | None]], *,
                   first_delivery: bool = False) -> int:
    """Write the entries' rows (one transaction), then acknowledge and delete the entries."""
    if not entries:
        return 0
    batches = [orjson.loads(raw) for _id, raw in entries if raw is not None]
    written = write_batches(batches, first_delivery=first_delivery) if batches else 0
    _ack(client, key, [entry_id for entry_id, _raw in entries])
    return written


def _ack(client: Any, key: str, ids: list[bytes]) -> None:
    script = _ack_script(client)
    script(keys=[key, flushed_key(key)], args=[buffer.STREAM_GROUP, *ids])


@functools.lru_cache(maxsize=8)
def _ack_script(client: Any) -> Any:
    return client.register_script(_ACK_SCRIPT)


def _flush_streams(client: Any, *, on_backlog: Callable[[], None] | None = None) -> int:
    """Read and write entries until every stream key is empty for this flusher or ``FLUSH_BUDGET_SECONDS`` have
    passed: first what this process read before and did not acknowledge (its last run failed), and what other
    flushers left pending too long; then new entries, one key after the other from a random one."""
    keys = buffer.stream_keys()
    consumer = _consumer_name(os.getpid())
    deadline = time.monotonic() + FLUSH_BUDGET_SECONDS
    written = 0
    for key in keys:
        written += _write_entries(client, key, _read(client, key, consumer, "0"))
        written += _claim(client, key, consumer, deadline)
    first = random.randrange(len(keys))  # noqa: S311 - spreads flushers over the keys, nothing secret
    order = keys[first:] + keys[:first]
    while time.monotonic() < deadline:
        moved = 0
        for key in order:
            entries = _read(client, key, consumer, ">")
            if len(entries) == MOVE_BATCHES and on_backlog is not None:
                on_backlog()
                on_backlog = None
            moved += len(entries)
            written += _write_entries(client, key, entries, first_delivery=True)
        if not moved:
            break
    _forget_idle_consumers(client, keys)
    raise_alarms(client)
    return written


def fan_out_allowed(client: Any) -> bool:
    """At most one extra flusher started a second, whichever flusher asks (a backlog adds flushers one by one, up to
    the monitor workers' concurrency; extra tasks that find nothing left return at once)."""
    return bool(client.set(FAN_OUT_KEY, b"1", nx=True, px=1000))


_forgotten_at: dict[int, float] = {}


def _forget_idle_consumers(client: Any, keys: list[str]) -> None:
    """Remove consumers (flusher processes long gone) that hold nothing, at most once a minute per process."""
    now = time.monotonic()
    if now - _forgotten_at.get(os.getpid(), 0.0) < 60:
        return
    _forgotten_at[os.getpid()] = now
    for key in keys:
        for consumer in client.xinfo_consumers(key, buffer.STREAM_GROUP):
            if consumer["pending"] == 0 and consumer["idle"] > CONSUMER_IDLE_FORGET_MS:
                client.xgroup_delconsumer(key, buffer.STREAM_GROUP, consumer["name"])


def _flush_outbox() -> int:
    written = 0
    while True:
        with transaction.atomic():
            pending = list(PredictionOutbox.objects.select_for_update(skip_locked=True).order_by("pk")[:200])
            if not pending:
                return written
            written += write_batches([p.payload for p in pending])
            PredictionOutbox.objects.filter(pk__in=[p.pk for p in pending]).delete()
