"""``{% ingest_lag %}``: how far prediction-log ingestion lags (``monitoring/ingest.py``), as a small panel."""

from __future__ import annotations

from typing import Any

from django import template
from django.conf import settings

from monitoring.ingest import ingest_lag as read_lag

register = template.Library()
LATE_SECONDS = 60  # the oldest waiting record is shown as late past this (the alert rule's warning threshold)


@register.inclusion_tag("monitoring/_ingest_lag.html")
def ingest_lag() -> dict[str, Any]:
    lag = read_lag()
    age = lag.oldest_age_seconds
    alarm = lag.fill_ratio >= settings.PORTAL_PREDICTION_BUFFER_ALARM
    if lag.redis_up is False or alarm or lag.lost:
        state = "alert"
    elif age is not None and age > LATE_SECONDS:
        state = "warning"
    else:
        state = "ok"
    return {"lag": lag, "state": state, "alarm": alarm, "late_seconds": LATE_SECONDS,
            "buffers": sorted(lag.buffers.items())}
