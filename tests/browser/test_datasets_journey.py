"""A data scientist cuts a training set from the model page and downloads it once a worker has written it; a
compliance officer finds the version trained on erased data and records a decision."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from monitoring.datasets.cut import snapshot_cut
from monitoring.gdpr import subject_erase
from monitoring.models import DatasetSnapshot, TrainingLink
from registry.models import ModelVersion
from tests.browser.conftest import screenshot
from tests.browser.test_upload_journey import _sign_in
from tests.monitoring.conftest import live, two_versions  # noqa: F401 - fixtures
from tests.monitoring.test_datasets import SUBJECTS, log_traffic

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_a_data_scientist_cuts_and_downloads_a_training_set(page: Any, personas: dict[str, Any],
                                                            live: ModelVersion, tmp_path: Path) -> None:  # noqa: F811
    log_traffic(60, at=timezone.now() - dt.timedelta(hours=2))
    _sign_in(page, "dana")
    page.goto("/models/churn/")
    page.click("[data-testid=datasets-link]")
    page.click("[data-testid=snapshot-form] button[type=submit]")
    page.wait_for_selector("[data-testid=snapshot-progress]")
    assert page.inner_text("[data-testid=snapshot-status]") == "Waiting for a worker"
    snapshot = DatasetSnapshot.objects.get()
    snapshot_cut(snapshot_id=snapshot.pk)  # the worker's task, run here
    page.wait_for_selector("[data-testid=snapshot-download]", timeout=15_000)  # the page refreshes itself
    assert page.inner_text("[data-testid=snapshot-status]") == "Ready"
    screenshot(page, "dataset-snapshot")
    with page.expect_download() as download:
        page.click("[data-testid=snapshot-download]")
    path = tmp_path / "train.parquet"
    download.value.save_as(path)
    snapshot.refresh_from_db()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == snapshot.sha256


def test_a_compliance_officer_decides_on_a_version_trained_on_erased_data(
        page: Any, personas: dict[str, Any], live: ModelVersion) -> None:  # noqa: F811
    start = timezone.now() - dt.timedelta(hours=2)
    log_traffic(30, at=start)
    from monitoring.datasets.services import snapshot_create

    snapshot = snapshot_create(model=live.model, environment="dev", start=start, end=timezone.now(),
                               actor=personas["ds"])
    snapshot = snapshot_cut(snapshot_id=snapshot.pk) or snapshot
    TrainingLink.objects.create(version=live, snapshot=snapshot, snapshot_sha256=snapshot.sha256)
    receipt = subject_erase(subject_id=SUBJECTS[0], actor=personas["compliance"], reason="Art. 17")
    assert receipt["training_data"]["versions_flagged"]
    _sign_in(page, "casey")
    page.goto("/models/churn/versions/1/")
    assert "Trained on erased data" in page.inner_text("[data-testid=version-lineage]")
    page.goto("/compliance/erased-data")
    page.check("[data-testid=decide-form] input[value=keep]")
    page.fill("[data-testid=decide-form] input[name=reason]", "five rows of thirty; retraining brings nothing")
    page.click("[data-testid=decide-form] button[type=submit]")
    page.wait_for_selector("text=keep by casey")
    screenshot(page, "erased-data-decision")
    page.goto("/models/churn/versions/1/")
    assert "Trained on erased data" not in page.inner_text("[data-testid=version-lineage]")
