"""The subject access page with a real Celery worker: the search answers at once with the report's page, which
follows the worker (its status and how many decisions are explained) until the report is ready; the worker explains
each decision in a sandboxed host and records the access under the search's request id, as the officer who asked."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from monitoring.flush import flush_predictions
from monitoring.models import SubjectAccessReport
from portal.models import AuditEvent
from tests.conftest import wait_for
from tests.registry import files
from tests.registry.serving.test_explain import body, client_for, live, models

pytestmark = [pytest.mark.real_sandbox]


def test_a_worker_compiles_the_report_while_its_page_shows_the_progress(
        worker_factory: Any, personas: dict[str, Any], tmp_path: Path) -> None:
    live("credit", models()["forest"], tmp_path, personas)  # a tree explainer: milliseconds, whatever the load
    X: Any = files._data()[0]
    scored = client_for(personas["ds"]).post("/api/v1/serve/credit/dev/invocations",
                                             body(X.iloc[[3, 40, 77]], subjects=["erin", "frank", "erin"]),
                                             content_type="application/json")
    assert scored.status_code == 200, scored.content
    ids = scored.json()["prediction_ids"]
    flush_predictions()
    page = Client()
    page.force_login(personas["compliance"])
    started = time.monotonic()
    asked = page.post("/compliance/subjects/", {"subject_id": "erin"})
    assert asked.status_code == 302 and time.monotonic() - started < 2.0, "the search waits for no explanation"
    location = asked["Location"]
    first = page.get(location).content.decode()
    assert 'data-testid="subject-report-job"' in first and '<meta http-equiv="refresh" content="3">' in first

    worker_factory()
    statuses: list[str] = []

    def ready() -> str:
        html = page.get(location).content.decode()
        statuses.append(SubjectAccessReport.objects.values_list("status", flat=True).get())
        return html if 'data-testid="subject-report"' in html else ""

    html = wait_for(ready, timeout=120, interval=0.25, what=lambda: f"the report; statuses seen {statuses}")
    job = SubjectAccessReport.objects.get()
    assert job.status == "ready" and job.decisions_total == 2 and job.decisions_done == 2 and job.progress == 100
    assert statuses[0] in ("pending", "running") and statuses[-1] == "ready"
    assert 'data-testid="subject-predictions">2<' in html and html.count('data-testid="subject-why"') == 2
    why = re.findall(r'data-testid="subject-why">(.*?)</td>', html, re.S)
    assert len(why) == 2 and all("shap.TreeExplainer" in w and "Not explained" not in w for w in why), why

    event = AuditEvent.objects.filter(action="gdpr.subject_access").latest("seq")
    assert event.actor == personas["compliance"] and event.metadata["report"] == str(job.uid)
    assert event.request_id == asked["X-Request-ID"], "the worker's access points back to the search"
    download = page.get(f"{location}download").json()
    assert sorted(p["id"] for p in download["predictions"]) == sorted([ids[0], ids[2]])
    assert all(len(p["explanation"]["top_features"]) == 3 for p in download["predictions"])
    assert AuditEvent.objects.filter(action="gdpr.subject_access").count() == 2
