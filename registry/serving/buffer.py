"""Where serving puts prediction records for monitoring's flushers: Redis Streams, or the database outbox in the
embedded mode. Serving never imports monitoring (the flushers live there and drain this buffer).

Each record is one stream entry (field ``d``: the encoded batch), added with ``XADD … MAXLEN ~`` to one of
``PORTAL_PREDICTION_STREAMS`` stream keys (round robin per process; the keys' hash tags differ, so a Redis Cluster
spreads them over its nodes). The flushers read them through the consumer group ``STREAM_GROUP``, and delete each
entry once its rows are committed, so a stream holds only records not yet in the log: its length is the backlog and
``MAXLEN`` trims only when that backlog reaches it (the flushers raise an alarm well before, see
``monitoring/ingest.py``).

When Redis cannot be reached, records go to the database outbox instead (the flusher drains both), and Redis is
left alone for ``REDIS_PAUSE_SECONDS`` so that requests do not each wait for a refused connection. If neither can
take the record, ``emit`` raises ``BufferUnavailable`` and the caller must not hand out the prediction: an answer
is only given once its log record is safe.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from typing import Any

import orjson
from django.conf import settings
from django.db import DatabaseError

from registry.models import PredictionOutbox

logger = logging.getLogger(__name__)
# The buffer before Redis Streams (a list, and the list a flusher moved records to before writing them): records left
# there by an upgrade, or by a web process not yet upgraded, are still flushed once (monitoring/flush.py).
REDIS_KEY = "portal:predictions"
PROCESSING_KEY = "portal:predictions:processing"
STREAM_GROUP = "flushers"
STREAM_FIELD = b"d"
REDIS_PAUSE_SECONDS = 1.0
_redis_paused_until = 0.0


def stream_keys() -> list[str]:
    """The stream keys records are spread over; ``{i}`` is the hash tag that places each on its own cluster slot."""
    return [f"portal:predlog:{{{i}}}" for i in range(settings.PORTAL_PREDICTION_STREAMS)]


def stream_maxlen() -> int:
    """Entries one stream key may hold before XADD trims its oldest (the total bound shared by the keys)."""
    return max(1, settings.PORTAL_PREDICTION_BUFFER_MAXLEN // settings.PORTAL_PREDICTION_STREAMS)


@functools.lru_cache(maxsize=4)
def _xadd_prefixes(streams: int, maxlen: int) -> tuple[tuple[Any, ...], ...]:
    return tuple(("XADD", f"portal:predlog:{{{i}}}", "MAXLEN", "~", maxlen, "*", STREAM_FIELD)
                 for i in range(streams))


_next_stream = itertools.count()


class BufferUnavailable(Exception):
    """Neither Redis nor the database would take the record."""


@functools.lru_cache(maxsize=1)
def redis_client() -> Any:
    url = settings.PORTAL_PREDICTION_BUFFER_URL
    if not url:
        return None
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # One immediate retry: it reconnects a socket that a Redis restart closed; a server that is down fails fast.
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30,
                                retry=Retry(NoBackoff(), 1))


class ScoringConnection:
    """The scoring path's one Redis connection in this process: each record (with the caller's rate count) is one
    pipelined write and one read, with no pool and no script.

    A pooled client's bookkeeping and readiness poll cost about a third of the round trip's client CPU; a Lua script
    copies a record twice more inside Redis (about 90 us of Redis CPU for a 100-row record). A connection Redis closed
    (a restart, CLIENT KILL) is opened again once, at once; a server that is down fails fast. A lock serialises the
    request thread and the shadow thread."""

    def __init__(self, url: str) -> None:
        import redis

        pool = redis.ConnectionPool.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30)
        self._connection = pool.make_connection()  # connects on first use
        self._lock = threading.Lock()

    def run(self, *commands: tuple[Any, ...]) -> list[Any]:
        import redis

        with self._lock:
            try:
                return self._round_trip(commands)
            except redis_errors() as exc:
                self._connection.disconnect()
                if not isinstance(exc, redis.ConnectionError):
                    raise  # a timeout: Redis is there but slow, and a request must not wait for it twice
            try:
                return self._round_trip(commands)
            except redis_errors():
                self._connection.disconnect()
                raise

    def _round_trip(self, commands: tuple[tuple[Any, ...], ...]) -> list[Any]:
        import redis

        self._connection.send_packed_command(self._connection.pack_commands(commands))
        replies, refused = [], None
        for _command in commands:  # read every reply, even after an error reply, so the next request is in step
            try:
                replies.append(self._connection.read_response())
            except redis.ResponseError as exc:
                refused = refused or exc
        if refused is not None:
            raise refused
        return replies


@functools.lru_cache(maxsize=4)
def _scoring_connection(url: str, pid: int) -> ScoringConnection:
    """One per process (``pid``: never a socket shared across a fork) and Redis URL."""
    return ScoringConnection(url)


def redis_errors() -> tuple[type[Exception], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError)


def _refused() -> type[Exception]:
    import redis

    return redis.ResponseError


def encode(batch: dict[str, Any]) -> bytes:
    return orjson.dumps(batch, option=orjson.OPT_SERIALIZE_NUMPY)


def emit(batch: dict[str, Any], *, count_key: str | None = None) -> int | None:
    """Buffer one batch of records. With ``count_key`` (Redis only) the same round trip also counts the request
    against the caller's rate limit and returns the count."""
    global _redis_paused_until
    url = settings.PORTAL_PREDICTION_BUFFER_URL
    if url and time.monotonic() >= _redis_paused_until:
        try:
            connection = _scoring_connection(url, os.getpid())
            prefixes = _xadd_prefixes(settings.PORTAL_PREDICTION_STREAMS, stream_maxlen())
            add = (*prefixes[next(_next_stream) % len(prefixes)], encode(batch))
            if count_key is None:
                connection.run(add)
                return None
            return int(connection.run(add, ("INCR", count_key), ("EXPIRE", count_key, 2, "NX"))[1])
        except (*redis_errors(), _refused()) as exc:  # refused: out of memory, read-only replica...
            _redis_paused_until = time.monotonic() + REDIS_PAUSE_SECONDS
            logger.warning("Prediction buffer: Redis unreachable or refusing (%s: %s); writing to the database outbox "
                           "for %.0f s", type(exc).__name__, str(exc)[:200], REDIS_PAUSE_SECONDS)

    try:
        PredictionOutbox.objects.create(payload=orjson.loads(encode(batch)))
    except DatabaseError as exc:
        raise BufferUnavailable(f"prediction log unavailable: {type(exc).__name__}") from exc
    return None
