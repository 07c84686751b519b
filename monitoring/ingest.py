"""How far prediction-log ingestion lags: what waits in each buffer, and how old the oldest record is.

Read by ``/metrics`` (``monitoring/metrics.py``), the portfolio page (``{% ingest_lag %}``) and the flushers, which
raise the alarm (an error in the log) when a stream key fills past ``PORTAL_PREDICTION_BUFFER_ALARM`` of its
``MAXLEN``, before XADD starts trimming records no flusher has written yet, and when records were trimmed.

Buffers: ``stream`` (the Redis stream keys: a record stays there until its rows are committed) and ``outbox`` (the
database outbox: the embedded mode, and where serving writes while Redis is unreachable).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Count, Min
from django.utils import timezone

from registry.models import PredictionOutbox
from registry.serving import buffer

logger = logging.getLogger(__name__)


@dataclass
class BufferLag:
    pending: int = 0  # records not yet in the log
    oldest_age_seconds: float | None = None  # age of the oldest of them (None: nothing waits)


@dataclass
class IngestLag:
    buffers: dict[str, BufferLag] = field(default_factory=dict)
    in_flight: int = 0  # stream records a flusher has read and not yet acknowledged
    fill_ratio: float = 0.0  # the fullest stream key's length over its MAXLEN
    lost: int = 0  # records trimmed from the streams before a flusher wrote them (since the keys were made)
    redis_up: bool | None = None  # None: no Redis buffer configured
    streams: int = 0

    @property
    def pending(self) -> int:
        return sum(b.pending for b in self.buffers.values())

    @property
    def oldest_age_seconds(self) -> float | None:
        ages = [b.oldest_age_seconds for b in self.buffers.values() if b.oldest_age_seconds is not None]
        return max(ages) if ages else None


def flushed_key(stream_key: str) -> str:
    """The counter of entries the flushers wrote from ``stream_key`` (kept beside it: the same cluster slot)."""
    return f"{stream_key}:flushed"


def _entry_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def stream_lag(client: Any) -> tuple[BufferLag, int, float, int, list[tuple[str, int]]]:
    """Per stream key in one pipelined round trip: length, oldest entry, pending summary, entries ever added and
    entries flushed. Returns the buffer's lag, the in-flight count, the fill ratio, the lost count and each key's
    length."""
    keys = buffer.stream_keys()
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.xlen(key)
        pipe.execute_command("XRANGE", key, "-", "+", "COUNT", 1)
        pipe.execute_command("XPENDING", key, buffer.STREAM_GROUP)
        pipe.xinfo_stream(key)
        pipe.get(flushed_key(key))
    replies = pipe.execute(raise_on_error=False)
    now_ms = time.time() * 1000
    lag, in_flight, lost, lengths, oldest_ms = BufferLag(), 0, 0, [], None
    maxlen = buffer.stream_maxlen()
    for i, key in enumerate(keys):
        length, first, pending, info, flushed = replies[5 * i:5 * i + 5]
        length = length if isinstance(length, int) else 0
        lengths.append((key, length))
        lag.pending += length
        if isinstance(first, list) and first:
            ms = _entry_ms(first[0][0])
            oldest_ms = ms if oldest_ms is None else min(oldest_ms, ms)
        if isinstance(pending, (list, dict)):
            in_flight += int((pending.get("pending") if isinstance(pending, dict) else pending[0]) or 0)
        if isinstance(info, dict):
            added = info.get("entries-added")
            if added is not None:
                lost += max(0, int(added) - length - int(flushed or 0))
    if oldest_ms is not None:
        lag.oldest_age_seconds = max(0.0, (now_ms - oldest_ms) / 1000)
    fill = max((n for _k, n in lengths), default=0) / maxlen
    return lag, in_flight, fill, lost, lengths


def outbox_lag() -> BufferLag:
    row = PredictionOutbox.objects.aggregate(n=Count("id"), oldest=Min("created_at"))
    lag = BufferLag(pending=row["n"] or 0)
    if row["oldest"] is not None:
        lag.oldest_age_seconds = max(0.0, (timezone.now() - row["oldest"]).total_seconds())
    return lag


def ingest_lag() -> IngestLag:
    """The lag of every buffer. Redis being away is reported (``redis_up`` False), not raised: that is when the
    outbox fills."""
    from redis import RedisError

    from django.conf import settings

    result = IngestLag(streams=settings.PORTAL_PREDICTION_STREAMS)
    client = buffer.redis_client()
    if client is not None:
        try:
            stream, result.in_flight, result.fill_ratio, result.lost, _lengths = stream_lag(client)
            result.buffers["stream"] = stream
            result.redis_up = True
        except RedisError as exc:
            logger.warning("Ingestion lag: Redis did not answer (%s: %s)", type(exc).__name__, str(exc)[:200])
            result.redis_up = False
    result.buffers["outbox"] = outbox_lag()
    return result


_reported_lost: dict[str, int] = {}


def raise_alarms(client: Any) -> None:
    """Called by each flusher run: an error in the log when a stream key is past the alarm share of its MAXLEN (XADD
    trims its oldest records once it is full, flushed or not) and when records were lost to trimming."""
    from django.conf import settings

    _lag, _in_flight, fill, lost, lengths = stream_lag(client)
    if fill >= settings.PORTAL_PREDICTION_BUFFER_ALARM:
        maxlen = buffer.stream_maxlen()
        fullest = max(lengths, key=lambda kn: kn[1])
        logger.error("Prediction buffer alarm: %s holds %d unflushed records, %.0f %% of its MAXLEN %d; past it, XADD "
                     "trims the oldest records before they are written: add flushers (monitor workers) or check the "
                     "database", fullest[0], fullest[1], fill * 100, maxlen)
    if lost > _reported_lost.get("lost", 0):
        logger.error("Prediction buffer: %d records were trimmed from the streams before a flusher wrote them "
                     "(%d since the last report)", lost, lost - _reported_lost.get("lost", 0))
    _reported_lost["lost"] = lost
