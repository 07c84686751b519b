"""What the registry needs of monitoring, as hooks that monitoring fills when it starts (MonitoringConfig.ready).

Imports point monitoring -> registry -> portal, never back: the registry says what it needs here and never imports
monitoring. (The promotion gate's live evidence is such a hook too: ``registry.promotions.services.register_live_evidence``.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.core.exceptions import ImproperlyConfigured

# Writes prediction-log batches (the serving buffer's record format: model, environment, version, role, ts,
# latency_ms, request_id, error, ids, inputs, outputs, subjects) and returns the rows written; a prediction id
# already in the log is skipped, so a repeat writes nothing twice.
PredictionLogWriter = Callable[[list[dict[str, Any]]], int]

_prediction_log_writer: PredictionLogWriter | None = None


def register_prediction_log_writer(writer: PredictionLogWriter) -> None:
    global _prediction_log_writer
    _prediction_log_writer = writer


def write_prediction_log(batches: list[dict[str, Any]]) -> int:
    if _prediction_log_writer is None:
        raise ImproperlyConfigured("No prediction log is installed (the monitoring app registers it when it starts).")
    return _prediction_log_writer(batches)


# The A/B experiment a promotion request was opened by, as the promotion page and API show it (verdict, interval,
# plot data, link), or None. Monitoring's experiments register it (``monitoring.experiments``).
PromotionExperiment = Callable[[Any], dict[str, Any] | None]

_promotion_experiment: PromotionExperiment | None = None


def register_promotion_experiment(provider: PromotionExperiment) -> None:
    global _promotion_experiment
    _promotion_experiment = provider


def promotion_experiment(promotion: Any) -> dict[str, Any] | None:
    """The experiment attached to ``promotion`` as evidence, or None (none attached, or no monitoring installed)."""
    if _promotion_experiment is None:
        return None
    return _promotion_experiment(promotion)


# Lineage: a version registered with ``trained_on`` naming dataset snapshots (cut by monitoring). The registry keeps
# no snapshot table of its own: it asks the hook to resolve and check the references (another team's snapshot, an
# unknown one or one not ready is a ValidationError) before anything is stored, and to record the links inside the
# transaction that creates the version.
TrainingSetsResolver = Callable[[Any, list[str], Any], list[str]]  # (model, references, actor) -> snapshot uids
TrainingSetsRecorder = Callable[[Any, list[str], Any], list[dict[str, Any]]]  # (version, uids, actor) -> links

_training_sets: tuple[TrainingSetsResolver, TrainingSetsRecorder] | None = None


def register_training_sets(resolver: TrainingSetsResolver, recorder: TrainingSetsRecorder) -> None:
    global _training_sets
    _training_sets = (resolver, recorder)


def resolve_training_sets(*, model: Any, references: list[str], actor: Any) -> list[str]:
    if not references:
        return []
    if _training_sets is None:
        raise ImproperlyConfigured("No dataset lineage is installed (the monitoring app registers it when it starts).")
    return _training_sets[0](model, references, actor)


def record_training_sets(*, version: Any, snapshots: list[str], actor: Any) -> list[dict[str, Any]]:
    if not snapshots:
        return []
    if _training_sets is None:
        raise ImproperlyConfigured("No dataset lineage is installed (the monitoring app registers it when it starts).")
    return _training_sets[1](version, snapshots, actor)
