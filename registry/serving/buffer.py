"""Where serving puts prediction records for monitoring's flusher: a Redis list, or the database outbox in the
embedded mode. Serving never imports monitoring (the flusher lives there and drains this buffer)."""

from __future__ import annotations

import functools
from typing import Any

import orjson
from django.conf import settings

REDIS_KEY = "portal:predictions"
PROCESSING_KEY = "portal:predictions:processing"


@functools.lru_cache(maxsize=1)
def redis_client() -> Any:
    url = settings.PORTAL_PREDICTION_BUFFER_URL
    if not url:
        return None
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30)


def encode(batch: dict[str, Any]) -> bytes:
    return orjson.dumps(batch, option=orjson.OPT_SERIALIZE_NUMPY)


def emit(batch: dict[str, Any], *, count_key: str | None = None) -> int | None:
    """Buffer one batch of records. With ``count_key`` (Redis only) the same round trip also counts the request
    against the caller's rate limit and returns the count."""
    client = redis_client()
    if client is not None:
        if count_key is None:
            client.rpush(REDIS_KEY, encode(batch))
            return None
        pipe = client.pipeline(transaction=False)
        pipe.rpush(REDIS_KEY, encode(batch))
        pipe.incr(count_key)
        pipe.expire(count_key, 2)
        return int(pipe.execute()[1])
    from registry.models import PredictionOutbox

    PredictionOutbox.objects.create(payload=orjson.loads(encode(batch)))
    return None
