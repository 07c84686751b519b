"""Comparing two versions of a model: their inputs (signature) and their recorded metrics, row by row. The
version-compare page shows these, and promotion gates judge a candidate against the champion with them."""

from __future__ import annotations

from typing import Any

from registry.models import ModelVersion

# Metrics where lower is better; every other metric is taken as higher-is-better.
LOWER_IS_BETTER = ("loss", "error", "rmse", "mse", "mae", "mape", "logloss", "brier", "latency")


def _columns(signature: dict[str, Any]) -> dict[str, str]:
    inputs = (signature or {}).get("inputs") or []
    return {str(c["name"]): str(c.get("type", "")) for c in inputs if isinstance(c, dict) and c.get("name")}


def signature_diff(candidate: ModelVersion, champion: ModelVersion | None) -> list[dict[str, Any]]:
    """One row per input of either version: name, champion's type, candidate's type, change. With no champion
    every input is ``new`` (nothing to compare with), never ``added``."""
    new = _columns(candidate.signature)
    if champion is None:
        return [{"name": name, "champion": None, "candidate": kind, "change": "new"} for name, kind in new.items()]
    old = _columns(champion.signature)
    rows = []
    for name in list(old) + [n for n in new if n not in old]:
        before, after = old.get(name), new.get(name)
        change = ("unchanged" if before == after else "removed" if after is None else "added" if before is None
                  else "retyped")
        rows.append({"name": name, "champion": before, "candidate": after, "change": change})
    return rows


def _lower_is_better(metric: str) -> bool:
    lowered = metric.lower()
    return any(token in lowered for token in LOWER_IS_BETTER)


def metric_diff(candidate: ModelVersion, champion: ModelVersion | None, tolerance: float) -> list[dict[str, Any]]:
    new = candidate.metrics or {}
    old = (champion.metrics or {}) if champion else {}
    rows = []
    for name in sorted(set(new) | set(old)):
        a, b = old.get(name), new.get(name)
        row: dict[str, Any] = {"name": name, "champion": a, "candidate": b, "delta": None, "worse": False,
                               "direction": "lower is better" if _lower_is_better(name) else "higher is better"}
        if isinstance(a, int | float) and isinstance(b, int | float):
            row["delta"] = b - a
            row["worse"] = (b - a > tolerance) if _lower_is_better(name) else (a - b > tolerance)
        rows.append(row)
    return rows
