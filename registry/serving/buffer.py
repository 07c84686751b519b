"""Where serving puts prediction records for monitoring's flusher: a Redis list, or the database outbox in the
embedded mode. Serving never imports monitoring (the flusher lives there and drains this buffer).

When Redis cannot be reached, records go to the database outbox instead (the flusher drains both), and Redis is
left alone for ``REDIS_PAUSE_SECONDS`` so that requests do not each wait for a refused connection. If neither can
take the record, ``emit`` raises ``BufferUnavailable`` and the caller must not hand out the prediction: an answer
is only given once its log record is safe.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import orjson
from django.conf import settings
from django.db import DatabaseError

logger = logging.getLogger(__name__)
REDIS_KEY = "portal:predictions"
PROCESSING_KEY = "portal:predictions:processing"
REDIS_PAUSE_SECONDS = 1.0
_redis_paused_until = 0.0


class BufferUnavailable(Exception):
    """Neither Redis nor the database would take the record."""


@functools.lru_cache(maxsize=1)
def redis_client() -> Any:
    url = settings.PORTAL_PREDICTION_BUFFER_URL
    return _connect(url) if url else None


def _connect(url: str, **options: Any) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # One immediate retry: it reconnects a socket that a Redis restart closed; a server that is down fails fast.
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30,
                                retry=Retry(NoBackoff(), 1), **options)


@functools.lru_cache(maxsize=4)
def _scoring_client(url: str, pid: int) -> Any:
    """The scoring path's own connection, one per process (``pid``: never a socket shared across a fork): a single
    connection skips the pool's bookkeeping and its readiness poll on every command, a fifth of the round trip's
    CPU. redis-py serialises its use with a lock, for the shadow thread. It connects when first made, so it is made
    inside ``emit``'s error handling."""
    return _connect(url, single_connection_client=True)


# Push the record and count the request in one command (one reply to parse instead of three). redis-py's Script
# sends EVALSHA and loads the script again when the server has lost it (a restart).
PUSH_AND_COUNT = """
redis.call('RPUSH', KEYS[1], ARGV[1])
local count = redis.call('INCR', KEYS[2])
if count == 1 then redis.call('EXPIRE', KEYS[2], 2) end
return count
"""


@functools.lru_cache(maxsize=1)
def _push_and_count(client: Any) -> Any:
    return client.register_script(PUSH_AND_COUNT)


def redis_errors() -> tuple[type[Exception], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError)


def encode(batch: dict[str, Any]) -> bytes:
    return orjson.dumps(batch, option=orjson.OPT_SERIALIZE_NUMPY)


def emit(batch: dict[str, Any], *, count_key: str | None = None) -> int | None:
    """Buffer one batch of records. With ``count_key`` (Redis only) the same round trip also counts the request
    against the caller's rate limit and returns the count."""
    global _redis_paused_until
    url = settings.PORTAL_PREDICTION_BUFFER_URL
    if url and time.monotonic() >= _redis_paused_until:
        try:
            client = _scoring_client(url, os.getpid())
            if count_key is None:
                client.rpush(REDIS_KEY, encode(batch))
                return None
            return int(_push_and_count(client)(keys=[REDIS_KEY, count_key], args=[encode(batch)]))
        except redis_errors() as exc:
            _redis_paused_until = time.monotonic() + REDIS_PAUSE_SECONDS
            logger.warning("Prediction buffer: Redis unreachable (%s); writing to the database outbox for %.0f s",
                           type(exc).__name__, REDIS_PAUSE_SECONDS)
    from registry.models import PredictionOutbox

    try:
        PredictionOutbox.objects.create(payload=orjson.loads(encode(batch)))
    except DatabaseError as exc:
        raise BufferUnavailable(f"prediction log unavailable: {type(exc).__name__}") from exc
    return None
