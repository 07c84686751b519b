"""GDPR subject rights: an access export holds exactly the subject's rows; erasure removes them everywhere while the
audit chain still verifies and never names the subject."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from monitoring.flush import flush_predictions
from monitoring.models import Feedback, PredictionLog
from portal.audit.verify import verify_chain
from portal.models import AuditEvent
from tests.conftest import assert_error_shape
from tests.registry.conftest import rows as _rows

URL = "/api/v1/serve/churn/dev/invocations"


def _predict(serving: Client, subjects: list[str]) -> list[str]:
    columns, data = _rows(len(subjects))
    body = {"dataframe_split": {"columns": columns, "data": data}, "subject_ids": subjects}
    response = serving.post(URL, json.dumps(body), content_type="application/json")
    assert response.status_code == 200, response.content
    return list(response.json()["prediction_ids"])


def test_subject_access_then_erasure(serving: Client, personas: dict[str, Any], api_as: Any) -> None:
    first = _predict(serving, ["alice@example.org", "bob", "alice@example.org"])
    flush_predictions()
    api_as(personas["ds"]).post("/api/v1/serve/churn/dev/feedback",
                                [{"prediction_id": first[0], "actual": 1}, {"prediction_id": first[1], "actual": 0}],
                                format="json")
    late = _predict(serving, ["alice@example.org"])  # still in the buffer, not yet flushed
    compliance = api_as(personas["compliance"])

    export = compliance.get("/api/v1/gdpr/subjects/alice@example.org/export").json()
    assert sorted(p["id"] for p in export["predictions"]) == sorted([first[0], first[2], late[0]])
    assert all(p["inputs"] and p["output"] is not None for p in export["predictions"])
    assert [f["prediction_id"] for f in export["feedback"]] == [first[0]]

    response = compliance.post("/api/v1/gdpr/erasure", {"subject_id": "alice@example.org", "reason": "Art. 17 request"},
                               format="json")
    assert response.status_code == 200, response.content
    receipt = response.json()
    assert receipt["erased"] == {"predictions": 3, "feedback": 1}
    event = AuditEvent.objects.get(seq=receipt["receipt"]["audit_event_seq"])
    assert event.action == "gdpr.erasure" and event.hash == receipt["receipt"]["audit_event_hash"]

    assert compliance.get("/api/v1/gdpr/subjects/alice@example.org/export").json()["predictions"] == []
    for pk in (first[0], first[2], late[0]):
        row = PredictionLog.objects.get(pk=pk)
        assert row.inputs is None and row.output is None and row.subject_hash == ""
        assert row.latency_ms >= 0, "non-personal facts stay for monitoring"
    bob = compliance.get("/api/v1/gdpr/subjects/bob/export").json()
    assert [p["id"] for p in bob["predictions"]] == [first[1]] and bob["predictions"][0]["inputs"]
    assert Feedback.objects.filter(prediction_id=first[1]).exists()
    assert verify_chain().ok
    trail = json.dumps(list(AuditEvent.objects.values("before", "after", "metadata", "target_id", "target_repr")),
                       default=str)
    assert "alice" not in trail, "audit events refer to subjects only by keyed hash"
    assert AuditEvent.objects.filter(action="gdpr.subject_access").count() == 3


@pytest.mark.parametrize("persona,expected", [("ds", 403), ("approver1", 403), ("viewer", 403), ("admin", 200),
                                              ("compliance", 200), (None, 401)])
def test_subject_rights_per_role(personas: dict[str, Any], api_as: Any, persona: str | None, expected: int) -> None:
    client = api_as(personas[persona] if persona else None)
    response = client.get("/api/v1/gdpr/subjects/someone/export")
    assert response.status_code == expected
    response = client.post("/api/v1/gdpr/erasure", {"subject_id": "someone"}, format="json")
    assert response.status_code == expected
    if expected != 200:
        assert_error_shape(response, expected)
        assert not AuditEvent.objects.filter(action__startswith="gdpr.").exists()


def test_bad_erasure_requests_get_400(personas: dict[str, Any], api_as: Any) -> None:
    client = api_as(personas["compliance"])
    assert_error_shape(client.post("/api/v1/gdpr/erasure", {}, format="json"), 400)
    assert_error_shape(client.post("/api/v1/gdpr/erasure", {"subject_id": "x" * 300}, format="json"), 400)
    assert_error_shape(client.post("/api/v1/gdpr/erasure", "{oops", content_type="application/json"), 400)
    assert not AuditEvent.objects.filter(action__startswith="gdpr.").exists()


def test_retention_purges_old_payloads_only_and_audits_the_counts(
        serving: Client, personas: dict[str, Any], settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt

    from django.utils import timezone

    from monitoring import gdpr

    ids = _predict(serving, ["s1", "s2", "s3", "s4"])
    flush_predictions()
    Feedback.objects.create(prediction_id=ids[0], actual=1)
    Feedback.objects.create(prediction_id=ids[3], actual=0)
    now = timezone.now()
    PredictionLog.objects.filter(pk__in=ids[:2]).update(created_at=now - dt.timedelta(days=31))
    PredictionLog.objects.filter(pk=ids[2]).update(created_at=now - dt.timedelta(days=29))
    monkeypatch.setattr(gdpr, "PURGE_SLICE", 1)  # several slices
    settings.PORTAL_PAYLOAD_RETENTION_DAYS = {"dev": 30, "stage": 90, "prod": 365}
    assert gdpr.payloads_purge(now=now) == {"dev": {"predictions": 2, "feedback": 1}}
    assert gdpr.payloads_purge(now=now) == {}, "a second run finds nothing left to purge"
    old = PredictionLog.objects.filter(pk__in=ids[:2])
    assert all(p.inputs is None and p.output is None and p.subject_hash == "" for p in old)
    assert all(p.inputs for p in PredictionLog.objects.filter(pk__in=ids[2:]))
    assert list(Feedback.objects.values_list("prediction_id", flat=True)) == [ids[3]]
    event = AuditEvent.objects.get(action="retention.purge")
    assert event.after == {"predictions_purged": 2, "feedback_purged": 1} and event.metadata["retention_days"] == 30
    assert verify_chain().ok
