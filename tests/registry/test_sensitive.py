"""Sensitive input columns: encrypted in the database, masked for roles without view_sensitive, never logged, and
every read of payloads is an audit event; keys rotate."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ValidationError
from django.db import connection
from django.test import Client

from monitoring import sensitive
from monitoring.flush import flush_predictions
from portal import services as portal_services
from portal.models import AuditEvent, Team
from registry.models import ModelVersion
from registry.versions import services
from registry.versions.localfiles import LocalUpload
from tests.conftest import assert_error_shape
from tests.registry import files
from tests.registry.conftest import deploy_now
from tests.registry.conftest import rows as _rows

SECRET_VALUE = 123.456789
MARKED = {"mean radius": "health", "mean texture": "personal"}


def _upload(personas: dict[str, Any], tmp_path: Path, marked: dict[str, str]) -> ModelVersion:
    model = services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    path = files.joblib_file(tmp_path / "m.joblib")
    ref = files.reference_csv(tmp_path / "ref.csv")
    version = services.version_upload(model=model, upload=LocalUpload(path, path.name),
                                      reference=LocalUpload(ref, ref.name),
                                      meta=services.UploadMetadata(sensitive_columns=marked), actor=personas["ds"])
    return services.version_scan(version_id=version.pk)


@pytest.fixture
def logged(personas: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    version = _upload(personas, tmp_path, MARKED)
    assert version.status == "ready", version.status_detail
    deploy_now(version, personas["ds"])
    _t, token = portal_services.token_create(user=personas["ds"], name="serve", actor=personas["ds"])
    columns, data = _rows(3)
    data[0][columns.index("mean radius")] = SECRET_VALUE
    caplog.set_level(logging.DEBUG)
    response = Client(HTTP_AUTHORIZATION=f"Bearer {token}").post(
        "/api/v1/serve/churn/dev/invocations", json.dumps({"dataframe_split": {"columns": columns, "data": data}}),
        content_type="application/json")
    assert response.status_code == 200, response.content
    assert flush_predictions() == 3
    assert str(SECRET_VALUE) not in caplog.text, "sensitive values never reach the application logs"
    return list(response.json()["prediction_ids"])


def test_sensitive_columns_are_unreadable_in_the_database(logged: list[str]) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT inputs::text FROM monitoring_predictionlog WHERE id = %s", [logged[0]])
        stored = cursor.fetchone()[0]
    assert str(SECRET_VALUE) not in stored and stored.count("\"enc:") == 2
    X, _y = files._data()
    assert str(round(float(X.iloc[0]["mean perimeter"]), 2)).rstrip("0") in stored, "other columns stay readable"


def test_payloads_are_masked_without_view_sensitive_and_every_read_is_audited(
        logged: list[str], personas: dict[str, Any], api_as: Any) -> None:
    url = "/api/v1/models/churn/environments/dev/predictions"
    as_ds = api_as(personas["ds"]).get(url).json()
    first = next(p for p in as_ds["predictions"] if p["id"] == logged[0])
    values = {c["name"]: c["value"] for c in first["inputs"]}
    assert as_ds["masked"] and values["mean radius"] == "•••" and values["mean texture"] == "•••"
    assert isinstance(values["mean area"], float)
    as_compliance = api_as(personas["compliance"]).get(url).json()
    first = next(p for p in as_compliance["predictions"] if p["id"] == logged[0])
    assert {c["name"]: c["value"] for c in first["inputs"]}["mean radius"] == SECRET_VALUE
    events = AuditEvent.objects.filter(action="prediction.payload_view").order_by("seq")
    assert [(e.actor_username, e.metadata["sensitive_values_shown"]) for e in events] == [("dana", False),
                                                                                         ("casey", True)]
    assert events[0].metadata["masked_values"] == 6
    page = Client()
    page.force_login(personas["ds"])
    html = page.get("/models/churn/environments/dev/predictions").content.decode()
    assert "•••" in html and str(SECRET_VALUE) not in html
    assert AuditEvent.objects.filter(action="prediction.payload_view").count() == 3
    assert_error_shape(api_as(personas["outsider"]).get(url), 404)
    assert_error_shape(api_as(None).get(url), 401)
    viewer = api_as(personas["viewer"]).get(url).json()  # view_monitoring, not view_sensitive
    assert viewer["masked"] and "•••" in json.dumps(viewer, ensure_ascii=False)
    assert_error_shape(api_as(personas["ds"]).get(url + "?limit=9999"), 400)


def test_keys_rotate_without_losing_old_rows(logged: list[str], settings: Any) -> None:
    old = list(settings.PORTAL_PAYLOAD_KEYS)
    new = Fernet.generate_key().decode()
    settings.PORTAL_PAYLOAD_KEYS = [new, *old]
    from monitoring.models import PredictionLog

    row = PredictionLog.objects.get(pk=logged[0])
    assert sensitive.reveal_row(row.inputs, may_see=True)[0] == SECRET_VALUE
    from django.core.management import call_command

    call_command("rotate_payload_keys")
    assert AuditEvent.objects.get(action="payload_keys.rotate").after == {"rows_reencrypted": 3}
    settings.PORTAL_PAYLOAD_KEYS = [new]
    row.refresh_from_db()
    assert sensitive.reveal_row(row.inputs, may_see=True)[0] == SECRET_VALUE


def test_marking_a_column_the_model_does_not_have_is_refused_before_anything_is_stored(personas: dict[str, Any],
                                                                                       tmp_path: Path) -> None:
    """Checked against the reference data's columns at upload, so a wrong name burns no version number."""
    with pytest.raises(ValidationError, match="shoe size is not among the columns"):
        _upload(personas, tmp_path, {"shoe size": "personal"})
    assert not ModelVersion.objects.exists()


def test_bad_sensitive_columns_get_400(personas: dict[str, Any], api_as: Any, tmp_path: Path) -> None:
    services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    path = files.joblib_file(tmp_path / "m.joblib")
    for bad in ("{not json", '["age"]', '{"age": "secret"}'):
        with path.open("rb") as fh:
            response = api_as(personas["ds"]).post("/api/v1/models/churn/versions/",
                                                   {"file": fh, "sensitive_columns": bad}, format="multipart")
        body = assert_error_shape(response, 400)
        assert "sensitive_columns" in json.dumps(body)
    assert not ModelVersion.objects.exists()


def test_records_of_processing_list_categories_serving_retention_and_access(
        logged: list[str], personas: dict[str, Any]) -> None:
    client = Client()
    client.force_login(personas["compliance"])
    html = client.get("/compliance/processing").content.decode()
    row = html[html.index('href="/models/churn/"'):]
    row = row[:row.index("</tr>")]
    assert "health data" in row and "personal data" in row and "dev: v1" in row and "dev 30 d" in row
    assert "dana (data_scientist)" in row and "olly" not in row
    ds = Client()
    ds.force_login(personas["ds"])
    assert ds.get("/compliance/processing").status_code == 403
