"""GDPR in the browser: a compliance officer searches a subject, downloads the report, confirms an erasure that names
what goes, and gets the receipt; the pages call the API's services, so they are audited as the API is."""

from __future__ import annotations

import json
from typing import Any

from django.test import Client

from monitoring.flush import flush_predictions
from monitoring import gdpr
from monitoring.models import PredictionLog, SubjectAccessReport
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
    asked = page.post("/compliance/subjects/", {"subject_id": "alice@example.org"})
    job = SubjectAccessReport.objects.get()
    assert asked.status_code == 302 and asked["Location"] == f"/compliance/subjects/reports/{job.uid}/"
    assert job.subject_hash == api["subject_hash"] and job.requested_by == personas["compliance"]
    assert "alice@example.org" not in json.dumps(list(SubjectAccessReport.objects.values()), default=str)
    waiting = page.get(asked["Location"]).content.decode()  # no worker yet: the page says so and refreshes
    assert '<meta http-equiv="refresh" content="3">' in waiting and "Waiting for a worker" in waiting
    assert 'data-testid="subject-report"' not in waiting
    assert page.get(f"{asked['Location']}download").status_code == 409, "nothing to download before it is ready"
    gdpr.subject_report_compile(report_id=job.pk)  # the task the search enqueued, as the worker runs it
    job.refresh_from_db()
    assert job.status == "ready" and job.report.startswith("enc:") and "alice" not in job.report
    found = page.get(asked["Location"])
    content = found.content.decode()
    assert found.status_code == 200 and found.headers["Cache-Control"].startswith("max-age=0")
    assert 'http-equiv="refresh"' not in content
    assert f'data-testid="subject-hash">{api["subject_hash"]}<' in content
    assert 'data-testid="subject-predictions">2<' in content and 'data-testid="subject-feedback">1<' in content
    download = page.get(f"{asked['Location']}download")
    assert download.headers["Content-Disposition"].startswith('attachment; filename="subject-')
    report = json.loads(download.content)
    assert sorted(p["id"] for p in report["predictions"]) == sorted(p["id"] for p in api["predictions"])
    assert AuditEvent.objects.filter(action="gdpr.subject_access").count() == before + 2, "report and download"
    assert "alice@example.org" not in json.dumps(list(AuditEvent.objects.values("after", "metadata", "target_repr")))
    assert page.post("/compliance/subjects/", {"subject_id": "  "}).status_code == 400
    other = Client()
    other.force_login(personas["admin"])  # may answer subject requests, but did not ask for this report
    assert other.get(asked["Location"]).status_code == 404
    assert other.get(f"{asked['Location']}download").status_code == 404

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
    # the compiled report was a copy of alice's data: it went with the rest
    assert event.metadata["access_reports_deleted"] == 1 and not SubjectAccessReport.objects.exists()
    assert page.get(asked["Location"]).status_code == 404


def test_the_audit_page_serves_the_verifier(personas: dict[str, Any]) -> None:
    page = Client()
    page.force_login(personas["compliance"])
    audit = page.get("/audit/").content.decode()
    assert 'href="/audit/verify_export.py"' in audit and "pip install cryptography" in audit
    script = page.get("/audit/verify_export.py")
    assert script.headers["Content-Disposition"] == 'attachment; filename="verify_export.py"'
    assert b"".join(script) == open("scripts/verify_export.py", "rb").read()
