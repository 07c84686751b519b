"""Reads about deployments that pages show beside the deployment itself."""

from __future__ import annotations

import statistics
from typing import Any

from registry.models import ColdLoad, Deployment


def cold_load_summary(deployment: Deployment, *, recent: int = 100) -> dict[str, Any] | None:
    """The deployment's cold loads in serving and batch processes: the last and the median of the latest
    ``recent`` (seconds), their count, and the latest estimate of the form's resident memory. None: none yet."""
    loads = list(ColdLoad.objects.filter(deployment=deployment).order_by("-at")
                 .values("seconds", "at", "kind", "resident_bytes")[:recent])
    if not loads:
        return None
    resident = next((x["resident_bytes"] for x in loads if x["resident_bytes"]), None)
    return {"last_seconds": loads[0]["seconds"], "last_at": loads[0]["at"], "kind": loads[0]["kind"],
            "median_seconds": statistics.median(x["seconds"] for x in loads), "count": len(loads),
            "resident_mb": round(resident / 1024 / 1024, 1) if resident else None}
