"""Health and readiness probes, and the request id that follows a click into the audit trail and the worker."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client, override_settings

pytestmark = pytest.mark.django_db


def test_healthz_answers_without_touching_anything(client: Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_checks_the_database_and_the_broker(client: Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert {"database": "ok", "broker": "ok", "keys": "ok"}.items() <= response.json()["checks"].items()


def test_readyz_is_503_naming_each_key_production_must_set(client: Client, settings: Any) -> None:
    settings.PORTAL_KEYS_NOT_SET = ("PORTAL_SUBJECT_HASH_KEY", "PORTAL_AUDIT_SIGNING_KEY")
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["checks"]["keys"] == "failing"
    assert response.json()["keys"] == "not set: PORTAL_SUBJECT_HASH_KEY, PORTAL_AUDIT_SIGNING_KEY"
    settings.PORTAL_DEBUG = settings.DEBUG = True  # the demo generates them
    assert client.get("/readyz").json()["checks"]["keys"] == "ok"


@override_settings(CELERY_BROKER_URL="redis://127.0.0.1:1/0", BROKER_IS_FILESYSTEM=False)
def test_readyz_is_503_when_the_broker_is_down(client: Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert {"database": "ok", "broker": "failing"}.items() <= response.json()["checks"].items()


def test_a_request_id_is_minted_or_kept_and_echoed(client: Client) -> None:
    minted = client.get("/healthz").headers["X-Request-ID"]
    assert len(minted) == 32
    assert client.get("/healthz", HTTP_X_REQUEST_ID="trace-abc-123456").headers["X-Request-ID"] == "trace-abc-123456"
    hostile = client.get("/healthz", HTTP_X_REQUEST_ID="<script>alert(1)</script>").headers["X-Request-ID"]
    assert hostile != "<script>alert(1)</script>" and len(hostile) == 32


def test_a_request_id_in_the_page_footer_matches_the_header(client: Client, personas: dict[str, Any]) -> None:
    client.force_login(personas["ds"])
    response = client.get("/", HTTP_X_REQUEST_ID="footer-check-0001")
    assert b"footer-check-0001" in response.content
