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


def emit(batch: dict[str, Any]) -> None:
    client = redis_client()
    if client is not None:
        client.rpush(REDIS_KEY, orjson.dumps(batch))
        return
    from registry.models import PredictionOutbox

    PredictionOutbox.objects.create(payload=batch)
