"""Ground truth arriving late: ``POST /api/v1/serve/{name}/{env}/feedback``.

Ground truth feeds a model's accuracy monitoring and alerts, so it is taken only for predictions of the model and
environment named in the URL. Each ``prediction_id`` is looked up in the prediction log; ids not found there first
wait for the prediction buffer to drain (a prediction answered a moment ago may still be on its way), and those
still unknown, or logged for another model or environment, are refused one by one: the rest is accepted, the answer
counts both, and the refusals are an audit event of their own (``feedback.refuse``, outcome ``denied``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from monitoring.flush import FLUSH_BUDGET_SECONDS, drain
from monitoring.models import Feedback, PredictionLog
from monitoring.rollups import mark_dirty_for_predictions
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import AuditOutcome

LOOKUP_SLICE = 5000
REFUSALS_LISTED = 1000  # the answer names at most this many refused items; the count covers them all
AUDITED_IDS = 100  # refused prediction ids copied into the audit event


@dataclass
class FeedbackReceipt:
    accepted: int
    refused: int
    refusals: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "refused": self.refused, "refusals": self.refusals}


def _owners(prediction_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """prediction id -> (model name, environment), for the ids found in the prediction log."""
    ids = list(prediction_ids)
    owners: dict[str, tuple[str, str]] = {}
    for i in range(0, len(ids), LOOKUP_SLICE):
        for pk, model_name, environment in PredictionLog.objects.filter(id__in=ids[i:i + LOOKUP_SLICE]).values_list(
                "id", "model_name", "environment"):
            owners[pk] = (model_name, environment)
    return owners


def feedback_receive(*, model: Any, environment: str, items: list[dict[str, Any]], actor: Any) -> FeedbackReceipt:
    """Attach ``items`` (``{"prediction_id", "actual"}``, validated) to predictions of ``model`` in ``environment``;
    later values replace earlier ones (within the request too). Items for any other prediction are refused."""
    wanted = (model.name, environment)
    owners = _owners({item["prediction_id"] for item in items})
    missing = {item["prediction_id"] for item in items} - owners.keys()
    if missing:
        drain(timeout=FLUSH_BUDGET_SECONDS)  # outside any transaction: it writes the log in its own
        owners.update(_owners(missing))

    accepted: dict[str, Any] = {}
    refusals: list[dict[str, Any]] = []
    elsewhere: set[str] = set()
    unknown = 0
    for index, item in enumerate(items):
        pid = item["prediction_id"]
        owner = owners.get(pid)
        if owner == wanted:
            accepted[pid] = item["actual"]
            continue
        if owner is None:
            unknown += 1
        else:
            elsewhere.add(f"{owner[0]}/{owner[1]}")
        # One reason for both cases: the answer does not tell a caller which other model an id belongs to.
        refusals.append({"index": index, "prediction_id": pid,
                         "reason": f"not a logged prediction of {model.name} in {environment}"})

    target = Target("environment", f"{model.name}/{environment}", f"{model.name} {environment}", model.team.slug)
    username = actor.get_username()
    with transaction.atomic():
        if accepted:
            rows = [Feedback(prediction_id=pid, actual=actual, submitted_by=username)
                    for pid, actual in accepted.items()]
            Feedback.objects.bulk_create(rows, update_conflicts=True, unique_fields=["prediction_id"],
                                         update_fields=["actual", "received_at", "submitted_by"], batch_size=2000)
            mark_dirty_for_predictions(list(accepted))
            audit_record(AuditAction.FEEDBACK_RECEIVE, actor=actor, target=target,
                         metadata={"count": len(accepted), "refused": len(refusals)})
        if refusals:
            audit_record(AuditAction.FEEDBACK_REFUSE, actor=actor, target=target, outcome=AuditOutcome.DENIED,
                         metadata={"count": len(refusals), "unknown": unknown,
                                   "other_model_or_environment": len(refusals) - unknown,
                                   "belong_to": sorted(elsewhere),
                                   "prediction_ids": [r["prediction_id"] for r in refusals[:AUDITED_IDS]]})
    return FeedbackReceipt(accepted=len(accepted), refused=len(refusals), refusals=refusals[:REFUSALS_LISTED])
