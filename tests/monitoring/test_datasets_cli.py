"""``portal dataset create|status|download`` against a running portal with a real worker: one JSON object on stdout,
the CLI's exit codes (0 done, 1 refused, 2 usage, 4 still going on), the download's SHA-256 checked; and
``portal upload --trained-on``."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from monitoring.models import DatasetSnapshot, TrainingLink
from portal import services as portal_services
from registry.models import ModelVersion
from tests.monitoring.test_datasets import log_traffic
from tests.registry import files
from tests.registry.test_cli import Cli

pytestmark = pytest.mark.django_db(transaction=True)


def test_dataset_commands_and_trained_on(live_server: Any, worker_factory: Any, live: ModelVersion,
                                         personas: dict[str, Any], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    worker_factory()
    ds = portal_services.token_create(user=personas["ds"], name="ci", actor=personas["ds"])[1]
    viewer = portal_services.token_create(user=personas["viewer"], name="ci", actor=personas["viewer"])[1]
    outsider = portal_services.token_create(user=personas["outsider"], name="ci", actor=personas["outsider"])[1]
    cli = Cli(live_server.url, tmp_path)
    start = timezone.now() - dt.timedelta(hours=1)
    log_traffic(120, at=start + dt.timedelta(minutes=1))
    window = ["--from", start.isoformat(), "--to", timezone.now().isoformat()]

    assert cli.run(ds, "dataset", "create", "churn", *window, expect=2)["outcome"] == "usage"  # no --env
    empty = cli.run(ds, "dataset", "create", "churn", "--env", "stage", *window, expect=1)
    assert empty["error"]["status"] == 400 and "No predictions of churn in stage" in empty["error"]["message"]
    assert cli.run(viewer, "dataset", "create", "churn", "--env", "dev", *window, expect=1)["error"]["status"] == 403

    made = cli.run(ds, "dataset", "create", "churn", "--env", "dev", *window, "--wait", expect=0)["snapshot"]
    assert made["status"] == "ready" and made["rows_done"] == 120 and made["manifest"]["rows"] == 120
    status = cli.run(viewer, "dataset", "status", made["id"], expect=0)
    assert status["outcome"] == "ready" and status["snapshot"]["sha256"] == made["sha256"]
    got = cli.run(ds, "dataset", "download", made["id"], "-o", "train.parquet", expect=0)
    assert got["sha256"] == made["sha256"] == hashlib.sha256((tmp_path / "train.parquet").read_bytes()).hexdigest()
    assert cli.run(viewer, "dataset", "download", made["id"], expect=1)["error"]["status"] == 403
    assert cli.run(outsider, "dataset", "status", made["id"], expect=1)["error"]["status"] == 404

    pending = DatasetSnapshot.objects.create(model=live.model, environment="dev", window_start=start,
                                             window_end=timezone.now(), status="running", rows_expected=10)
    assert cli.run(ds, "dataset", "status", str(pending.uid), expect=4)["outcome"] == "running"

    model_file = files.joblib_file(tmp_path / "retrained.joblib")
    version = cli.run(ds, "upload", "churn", str(model_file), "--trained-on", made["id"], expect=0)["version"]
    link = TrainingLink.objects.get()
    assert link.version.number == version["number"] and str(link.snapshot.uid) == made["id"]
    refused = cli.run(ds, "upload", "churn", str(model_file), "--trained-on", str(pending.uid), expect=1)
    assert "not ready" in refused["error"]["message"]
