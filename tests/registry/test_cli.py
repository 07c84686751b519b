"""`portal upload` from a CI pipeline: streams the file, waits for the verdict, exits non-zero on refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from portal import services as portal_services
from portal.models import Team
from registry import services
from registry.models import ModelVersion
from tests.conftest import ROOT, clean_env
from tests.registry import files

pytestmark = pytest.mark.slow


def _portal(live_server: Any, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "portal.cli", "--url", live_server.url, *args], cwd=ROOT,
                          env=clean_env(PORTAL_TOKEN=token), capture_output=True, text=True, timeout=300)


def test_portal_upload_waits_for_ready(live_server: Any, celery_worker_process: str, personas: dict[str, Any],
                                       tmp_path: Path) -> None:
    services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="ci", actor=personas["ds"])
    model = files.joblib_file(tmp_path / "model.joblib")
    ref = files.reference_csv(tmp_path / "ref.csv")
    result = _portal(live_server, plaintext, "upload", "churn", str(model), "--reference", str(ref),
                     "--metrics", '{"auc": 0.9}', "--git-commit", "0123abcd", "--wait")
    assert result.returncode == 0, result.stderr
    assert "churn v1: scanning" in result.stdout and "churn v1: ready" in result.stdout
    version = ModelVersion.objects.get()
    assert version.metrics == {"auc": 0.9} and version.git_commit == "0123abcd" and version.reference is not None


def test_portal_upload_reports_a_refusal_with_its_findings(live_server: Any, personas: dict[str, Any],
                                                           tmp_path: Path, transactional_db: None) -> None:
    services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="ci", actor=personas["ds"])
    evil = tmp_path / "model.pkl"
    evil.write_bytes(files.pickle_builtins_eval())
    result = _portal(live_server, plaintext, "upload", "churn", str(evil))
    assert result.returncode == 1
    assert "builtins.eval" in result.stderr
    bad_token = _portal(live_server, "mlp_nope", "upload", "churn", str(evil))
    assert bad_token.returncode == 1 and "unknown, revoked or expired" in bad_token.stderr


def test_portal_promote_approve_and_rollback(live_server: Any, worker_factory: Any, personas: dict[str, Any],
                                             tmp_path: Path) -> None:
    from registry import promotions
    from tests.registry.test_promotions import promote_live, upload

    model = services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    v1 = upload(model, personas["ds"], tmp_path)
    promote_live(v1, "stage", personas)
    v2 = upload(model, personas["ds"], tmp_path, c=0.5)
    worker_factory()
    tokens = {who: portal_services.token_create(user=personas[who], name="ci", actor=personas[who])[1]
              for who in ("ds", "approver1")}
    result = _portal(live_server, tokens["ds"], "promote", "churn", "2", "--to", "stage", "--reason", "better")
    assert result.returncode == 0, result.stderr
    assert "to stage pending (0/1 approvals)" in result.stdout and "pass       Signature compatible" in result.stdout
    uid = result.stdout.split()[1].rstrip(":")
    mine = _portal(live_server, tokens["ds"], "approve", uid)
    assert mine.returncode == 1 and "role does not allow" in mine.stderr
    result = _portal(live_server, tokens["approver1"], "approve", uid, "--comment", "ok", "--wait")
    assert result.returncode == 0, result.stderr
    assert ": live" in result.stdout and promotions.champion_version(model, "stage") == v2
    result = _portal(live_server, tokens["approver1"], "rollback", "churn", "stage", "--reason", "v2 drifts",
                     "--wait")
    assert result.returncode == 0, result.stderr
    assert "back to v1" in result.stdout and promotions.champion_version(model, "stage") == v1
    refused = _portal(live_server, tokens["approver1"], "rollback", "churn", "stage", "--reason", "x",
                      "--to-version", "7")
    assert refused.returncode == 1 and "never served stage" in refused.stderr


def test_portal_deploy_predict_and_batch(live_server: Any, worker_factory: Any, two_versions: list[ModelVersion],
                                         personas: dict[str, Any], tmp_path: Path) -> None:
    worker_factory()
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="ci", actor=personas["ds"])
    deployed = _portal(live_server, plaintext, "deploy", "churn", "1", "--env", "dev", "--wait")
    assert deployed.returncode == 0, deployed.stderr
    assert "live" in deployed.stdout
    X, _y = files._data()
    frame = X.head(40).copy()
    frame.insert(0, "customer", [f"c{i}" for i in range(len(frame))])
    source = tmp_path / "customers.csv"
    frame.to_csv(source, index=False)
    predicted = _portal(live_server, plaintext, "predict", "churn", "dev", str(source))
    assert predicted.returncode == 0, predicted.stderr
    expected = files.logistic_regression().predict(X.head(40)).tolist()
    import json

    assert json.loads(predicted.stdout)["predictions"] == expected
    scored = _portal(live_server, plaintext, "batch", "churn", "dev", str(source), "--id-column", "customer", "--wait")
    assert scored.returncode == 0, scored.stderr
    assert "done, 40 rows, 0 bad" in scored.stdout
    import csv

    rows = list(csv.DictReader((tmp_path / "customers-scored.csv").open()))
    assert [int(r["prediction"]) for r in rows] == expected and rows[0]["customer"] == "c0"
    refused = _portal(live_server, plaintext, "batch", "churn", "prod", str(source))
    assert refused.returncode == 1 and "Nothing serves churn in prod" in refused.stderr
