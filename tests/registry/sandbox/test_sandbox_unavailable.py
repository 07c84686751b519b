"""Where bubblewrap cannot start, nothing is loaded: the start-up check and /readyz say why, a scan waits with the
reason (the upload is kept), and a model host answers 503 instead of loading the model some other way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.management import call_command
from django.test import Client

from portal.models import Team
from registry.models import ModelVersion
from registry.sandbox import bwrap, hosts
from registry.serving import runtime
from registry.versions import services
from registry.versions.localfiles import LocalUpload
from tests.registry import files

pytestmark = pytest.mark.real_sandbox

REASON = "bubblewrap is not installed: install it (Debian/Ubuntu: apt-get install bubblewrap)"


@pytest.fixture
def no_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bwrap, "probe", lambda: REASON)


@pytest.mark.django_db
def test_readyz_fails_and_names_the_cause_unless_told_otherwise(no_sandbox: None, settings: Any) -> None:
    response = Client().get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["sandbox"] == "failing" and "bubblewrap" in response.json()["sandbox"]
    settings.PORTAL_SANDBOX_REQUIRED = False
    response = Client().get("/readyz")
    assert response.status_code == 200 and response.json()["checks"]["sandbox"] == "unavailable"


def test_the_start_up_check_warns(no_sandbox: None, capsys: pytest.CaptureFixture[str]) -> None:
    call_command("check")
    captured = capsys.readouterr()
    assert "registry.W001" in captured.err + captured.out and "bubblewrap" in captured.err + captured.out


@pytest.mark.django_db
def test_a_scan_waits_with_the_reason_and_keeps_the_upload(no_sandbox: None, personas: dict[str, Any],
                                                            tmp_path: Path) -> None:
    model = services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    path = files.joblib_file(tmp_path / "m.joblib", files.logistic_regression())
    version = services.version_upload(model=model, upload=LocalUpload(path, path.name), reference=None,
                                      meta=services.UploadMetadata(), actor=personas["ds"])
    version = services.version_scan(version_id=version.pk)
    assert version.status == "scanning" and "sandbox is unavailable" in version.status_detail
    assert version.artifact is not None  # nothing lost: a worker with a sandbox checks it later


@pytest.mark.django_db
def test_a_host_refuses_to_load_without_a_sandbox(no_sandbox: None, personas: dict[str, Any],
                                                  tmp_path: Path) -> None:
    from registry import storage

    path = files.joblib_file(tmp_path / "m.joblib", files.logistic_regression())
    version = ModelVersion(number=1, format="joblib", artifact=storage.blob_put_path(path), signature={})
    loaded = runtime.load_serving_model(version=version, kind="native", blob=None, key="t-nosandbox")
    try:
        with pytest.raises(hosts.HostUnavailable, match="sandbox is unavailable"):
            loaded.predict(np.zeros((1, 30)))
    finally:
        loaded.close()
