"""GDPR in the browser: a compliance officer searches a subject, downloads the report, confirms an erasure that names
what goes, and gets the receipt; the pages call the API's services, so they are audited as the API is."""

from __future__ import annotations

import json
from typing import Any

from django.test import Client

from monitoring.flush import flush_predictions
from monitoring.models import PredictionLog
from portal.models import AuditEvent
from tests.registry.conftest import fresh_serving_cache, serving, two_versions  # noqa: F401 - fixtures
from tests.registry.test_gdpr import _predict


def test_access_download_confirm_and_erase_from_the_pages(serving: Client, personas: dict[str, Any],  # noqa: F811
                                                          api_as: Any) -> None:
    ids = _predict(serving, ["alice@example.org", "bob", "alice@example.org"])
    flush_predictions()
    api_as(personas["ds"]).post("/api/v1/serve/churn/dev/feedback", [{"prediction_id": ids[0], "actual": 1}],
                                format="json")
    api = api_as(personas["compliance"]).get("/api/v1/gdpr/subjects/alice@example.org/export").json()
    page = Client()
    page.force_login(personas["compliance"])

    before = AuditEvent.objects.filter(action="gdpr.subject_access").count()
    found = page.post("/compliance/subjects/", {"subject_id": "alice@example.org"})
    content = found.content.decode()
    assert found.status_code == 200 and found.headers["Cache-Control"].startswith("max-age=0")
    assert f'data-testid="subject-hash">{api["subject_hash"]}<' in content
    assert 'data-testid="subject-predictions">2<' in content and 'data-testid="subject-feedback">1<' in content
    download = page.post("/compliance/subjects/", {"subject_id": "alice@example.org", "download": "1"})
    assert download.headers["Content-Disposition"].startswith('attachment; filename="subject-')
    report = json.loads(download.content)
    assert sorted(p["id"] for p in report["predictions"]) == sorted(p["id"] for p in api["predictions"])
    assert AuditEvent.objects.filter(action="gdpr.subject_access").count() == before + 2, "search and download"
    assert "alice@example.org" not in json.dumps(list(AuditEvent.objects.values("after", "metadata", "target_repr")))
    assert page.post("/compliance/subjects/", {"subject_id": "  "}).status_code == 400

    confirm = page.post("/compliance/erasure/", {"subject_id": "alice@example.org", "step": "review"})
    text = confirm.content.decode()
    assert 'data-testid="confirm-predictions">2<' in text and 'data-testid="confirm-feedback">1<' in text
    assert "churn in dev: 2" in text and "inputs, output, error, subject link" in text
    assert PredictionLog.objects.filter(pk=ids[0]).exclude(inputs=None).exists(), "nothing removed yet"
    unconfirmed = page.post("/compliance/erasure/", {"subject_id": "alice@example.org", "step": "erase"})
    assert unconfirmed.status_code == 400 and PredictionLog.objects.filter(pk=ids[0]).exclude(inputs=None).exists()

    done = page.post("/compliance/erasure/", {"subject_id": "alice@example.org", "step": "erase", "confirm": "yes",
                                              "reason": "ticket 42"}).content.decode()
    event = AuditEvent.objects.filter(action="gdpr.erasure").latest("seq")
    assert f'data-testid="receipt-hash">{event.hash}<' in done and 'data-testid="receipt-predictions">2<' in done
    assert event.after == {"predictions_erased": 2, "feedback_erased": 1,
                           "training_data": {"snapshots": [], "versions_trained_on_them": []}}, event.after
    assert event.metadata["reason"] == "ticket 42"
    assert PredictionLog.objects.get(pk=ids[0]).inputs is None
    assert PredictionLog.objects.get(pk=ids[1]).inputs is not None, "bob's rows stay"


def test_the_audit_page_serves_the_verifier(personas: dict[str, Any]) -> None:
    page = Client()
    page.force_login(personas["compliance"])
    audit = page.get("/audit/").content.decode()
    assert 'href="/audit/verify_export.py"' in audit and "pip install cryptography" in audit
    script = page.get("/audit/verify_export.py")
    assert script.headers["Content-Disposition"] == 'attachment; filename="verify_export.py"'
    assert b"".join(script) == open("scripts/verify_export.py", "rb").read()
