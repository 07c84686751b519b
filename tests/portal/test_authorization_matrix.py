"""The authorisation matrix: every URL the resolver knows (pages and API alike), for every role, anonymous and an
outsider from another team, against the table below. A route without an entry fails the test, so a new endpoint
cannot ship without someone deciding who may call it.

Every request runs inside a savepoint that is rolled back, so each persona meets the same world: model ``churn`` of
team ``acme`` with two ready versions, v1 live in dev, a pending promotion, a batch job, a schedule, a webhook, an
alert, a token and an audit event. The outsider is a data scientist of team ``other``: for them, every object of
``acme`` must be as if it did not exist (404), however it is addressed (IDOR attempts by name, number and id).
Pages answer anonymous visitors with a redirect to sign in; the API answers 401.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from django.db import transaction
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from rest_framework.test import APIClient

from monitoring.datasets import services as dataset_services
from monitoring.datasets.cut import snapshot_cut
from monitoring.experiments.models import Experiment
from monitoring.flush import write_batches
from monitoring.models import Alert, ErasedDataFlag, Feedback, RetrainingRequest, SubjectAccessReport
from monitoring.sensitive import encrypt_value
from portal import services as portal_services
from portal.models import AuditEvent, Team, TeamWebhook
from registry.batch import services as batch
from registry.endpoints import services as endpoint_services
from registry.mlflow_sync import services as mlflow_sync
from registry import storage
from registry.edge import services as edge_services
from registry.models import (
    EdgePackage,
    EdgePackageStatus,
    EnvironmentState,
    MlflowConnection,
    MlflowSyncJob,
    MlflowSyncStatus,
    ModelVersion,
)
from registry.promotions import services as promotions
from tests.conftest import free_port
from tests.registry import files
from tests.registry.conftest import deploy_now, fresh_serving_cache, two_versions  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db

PERSONAS = (None, "outsider", "viewer", "ds", "approver1", "compliance", "admin")
MEMBERS = ("viewer", "ds", "approver1", "compliance", "admin")


class Call(NamedTuple):
    method: str
    expected: dict[str | None, int]
    allowed: tuple[str | None, ...]
    body: Any = None
    api: bool = False  # the API: bearer tokens, 401 for anonymous callers
    number: int = 1  # the version named in the path
    env: str = "dev"  # the environment named in the path


def page(method: str, allowed: tuple[str, ...] = MEMBERS, *, ok: int = 200, denied: int = 403,
         outsider: int | None = None, anonymous: int = 302, body: Any = None, number: int = 1,
         env: str = "dev") -> Call:
    """A session page: ``allowed`` personas get ``ok``, other members ``denied``; the outsider ``ok`` if allowed
    (pages that are not about acme's objects), else 404 unless said otherwise."""
    expected: dict[str | None, int] = {
        None: anonymous, "outsider": outsider if outsider is not None else ok if "outsider" in allowed else 404}
    expected.update({who: ok if who in allowed else denied for who in MEMBERS})
    return Call(method, expected, allowed, body, number=number, env=env)


def api(method: str, allowed: tuple[str, ...] = MEMBERS, *, ok: int = 200, denied: int = 403,
        outsider: int | None = None, anonymous: int = 401, body: Any = None, number: int = 1,
        env: str = "dev") -> Call:
    call = page(method, allowed, ok=ok, denied=denied, outsider=outsider, anonymous=anonymous, body=body,
                number=number, env=env)
    return call._replace(api=True)


def everyone(method: str, status: int = 200, *, body: Any = None, **overrides: int) -> Call:
    expected: dict[str | None, int] = dict.fromkeys(PERSONAS, status)
    expected.update({None if who == "anonymous" else who: code for who, code in overrides.items()})
    return Call(method, expected, PERSONAS, body)


ALL = (*MEMBERS, "outsider")
DS = ("ds", "admin")  # register_model, deploy_dev, request_promotion, run_batch
APPROVERS = ("approver1", "admin")  # approve_promotion, rollback_environment, decide_trust
ALERTS = ("ds", "approver1", "admin")  # manage_alerts
DOWNLOAD = ("ds", "approver1", "admin")  # download_artifact
SCORE = ("ds", "approver1", "admin")  # score: real-time scoring and ground truth (viewers only read)
AUDIT = ("compliance", "admin")  # view_audit, export_audit, manage_subjects
ADMIN = ("admin",)  # manage_teams
SCHEDULE = {"environment": "dev", "name": "second", "location": "second/", "cron": "0 3 * * *"}
TRUST = {"decision": "trust", "reason": "reviewed for the matrix"}
EXPERIMENT = {"model": "churn", "environment": "dev", "metric": "accuracy", "mde": 0.05}
DECISION = {"decision": "keep", "reason": "reviewed for the matrix"}
ENDPOINT = {"team": "acme", "name": "matrix-endpoint", "environment": "dev", "default": "churn"}
ENDPOINT_RULES_FORM = {"kind-0": "field_in", "key-0": "mean radius", "values-0": "1, 2", "model-0": "churn",
                       "default": "churn"}

OWN_REPORT = Call("GET", {None: 302, "outsider": 403, "viewer": 403, "ds": 403, "approver1": 403, "compliance": 200,
                          "admin": 404}, ("compliance",))

# pattern -> the calls made on it, each with the status per persona. Objects in paths are team acme's, so the
# outsider gets 404 wherever one is named; a capability held by nobody in a team is a 403. Personas outside
# ``allowed`` must also leave no audit event behind (nothing changed), which catches pages that refuse with a
# redirect and a message.
TABLE: dict[str, list[Call]] = {
    "": [page("GET", ALL)],
    "login/": [everyone("GET", 302, anonymous=200), everyone("POST", 302, anonymous=400)],
    "logout/": [everyone("POST", 302)],
    "account/": [page("GET", ALL), page("POST", ALL, ok=400)],
    "account/2fa/enroll": [page("GET", ALL), page("POST", ALL, ok=400)],
    "account/2fa/verify": [page("GET", ALL, ok=302), page("POST", ALL, ok=302)],
    "account/tokens/<uuid:uid>/revoke": [page("POST", ("ds",), ok=302, denied=302, outsider=302)],
    "audit/": [page("GET", AUDIT, outsider=403)],
    "audit/verify": [page("POST", AUDIT, ok=302, outsider=403)],
    "audit/events/<int:seq>/": [page("GET", AUDIT, outsider=403)],
    "compliance/processing": [page("GET", AUDIT, outsider=403)],
    "audit/verify_export.py": [page("GET", AUDIT, outsider=403)],
    # GDPR pages: the same capability as the API's; a search is an audited access, erasure needs the confirmation.
    "compliance/subjects/": [page("GET", AUDIT, outsider=403),
                             page("POST", AUDIT, ok=302, outsider=403, body={"subject_id": "subject-1"}),
                             page("POST", AUDIT, ok=400, outsider=403, body={"subject_id": " "})],
    # A compiled subject access report is the asking officer's only: another one (here the admin) gets 404.
    "compliance/subjects/reports/<uuid:uid>/": [OWN_REPORT],
    "compliance/subjects/reports/<uuid:uid>/download": [OWN_REPORT],
    "compliance/erasure/": [page("GET", AUDIT, outsider=403),
                            page("POST", AUDIT, outsider=403, body={"subject_id": "subject-1", "step": "review"}),
                            page("POST", AUDIT, outsider=403, body={"subject_id": "subject-1", "step": "erase",
                                                                    "confirm": "yes", "reason": "asked"}),
                            page("POST", AUDIT, ok=400, outsider=403, body={"subject_id": "subject-1",
                                                                            "step": "erase"})],
    "healthz": [everyone("GET")],
    "readyz": [everyone("GET")],
    "metrics": [everyone("GET")],  # from loopback; other addresses need the token (tests/monitoring)
    "api/schema/": [everyone("GET")],
    "api/docs/": [everyone("GET")],
    # Registry pages
    "models/": [page("GET", ALL)],
    "models/new": [page("GET", (*DS, "outsider"), outsider=200),
                   page("POST", (*DS, "outsider"), ok=400, outsider=400)],
    "models/<str:name>/": [page("GET")],
    "models/<str:name>/upload": [page("GET", DS)],
    "models/<str:name>/tags": [page("POST", DS, ok=302, body={"tags": "matrix"})],
    "models/<str:name>/aliases": [page("POST", DS, ok=302, body={"alias": "champion", "version": "1"})],
    "models/<str:name>/aliases/<str:alias>/delete": [page("POST", DS, ok=302)],
    "models/<str:name>/compare": [page("GET")],
    "models/<str:name>/versions/<int:number>/tags": [page("POST", DS, ok=302, body={"tags": "matrix"})],
    "models/<str:name>/import": [page("POST", DS, ok=302, body={"uri": ""})],
    "models/<str:name>/versions/<int:number>/": [page("GET")],
    "models/<str:name>/versions/<int:number>/trust": [page("POST", APPROVERS, ok=302, body=TRUST)],
    "models/<str:name>/versions/<int:number>/deploy": [page("POST", DS, ok=302, body={"environment": "dev"})],
    "models/<str:name>/versions/<int:number>/promote": [
        page("POST", DS, ok=302, body={"target": "stage", "reason": "matrix"}, number=2)],
    "deployments/<uuid:uid>/": [page("GET")],
    "models/<str:name>/environments/<str:env>/": [page("GET")],
    "models/<str:name>/environments/<str:env>/predictions": [page("GET")],
    # Rolling back dev is a dev deployment (data scientists); stage and prod take an approver.
    # A rollback is confirmed first (the unconfirmed POST shows the confirmation); refusals redirect with the reason.
    "models/<str:name>/environments/<str:env>/rollback": [
        page("POST", DS, ok=302, denied=302, body={"reason": "matrix rollback", "confirm": "yes"}),
        page("POST", DS, ok=200, denied=302, body={"reason": "matrix rollback"}),
        page("POST", APPROVERS, ok=302, denied=302, body={"reason": "matrix rollback", "confirm": "yes"},
             env="stage")],
    "models/<str:name>/batch/": [page("GET")],
    "models/<str:name>/batch/schedules": [page("POST", DS, ok=302, body=SCHEDULE)],
    "batch/<uuid:uid>/": [page("GET")],
    "batch/<uuid:uid>/cancel": [page("POST", DS, ok=302)],
    "batch-schedules/<int:pk>/toggle": [page("POST", DS, ok=302)],
    "batch-schedules/<int:pk>/delete": [page("POST", DS, ok=302)],
    # Edge packages: every member reads; makers build and manage device tokens; downloads as artifacts (audited).
    "models/<str:name>/edge/": [page("GET")],
    "models/<str:name>/edge/packages": [page("POST", DS, ok=302, body={"version": "1"})],
    "models/<str:name>/edge/tokens": [page("POST", DS, body={"name": "matrix fleet"})],
    "edge/<uuid:uid>/": [page("GET")],
    "edge-tokens/<uuid:uid>/revoke": [page("POST", DS, ok=302)],
    "promotions/": [page("GET", ALL)],
    "promotions/<uuid:uid>/": [page("GET")],
    "promotions/<uuid:uid>/decide": [
        page("POST", APPROVERS, ok=302, denied=302, body={"decision": "approve", "comment": "ok"})],
    "promotions/<uuid:uid>/cancel": [page("POST", DS, ok=302, denied=302)],
    # Monitoring pages
    "monitoring/": [page("GET", ALL)],
    "models/<str:name>/environments/<str:env>/monitoring": [page("GET")],
    "models/<str:name>/environments/<str:env>/monitoring/settings": [
        page("POST", ALERTS, ok=302, body={"thresholds": "{}", "target_column": ""})],
    "alerts/<uuid:uid>/acknowledge": [page("POST", ALERTS, ok=302, body={"comment": "seen"})],
    "alerts/<uuid:uid>/resolve": [page("POST", ALERTS, ok=302, body={"resolution": "fixed"})],
    # A/B experiments: read by every member, started and stopped where one deploys (dev: data scientists). The world's
    # experiment runs, so a second start is refused (400) after the permission check.
    "models/<str:name>/environments/<str:env>/experiments": [page("GET"), page("POST", DS, ok=400)],
    "experiments/<uuid:uid>/": [page("GET")],
    "experiments/<uuid:uid>/stop": [page("POST", DS, ok=302, denied=302, body={"reason": "matrix"})],
    # Dataset pages
    "models/<str:name>/datasets/": [page("GET")],
    "models/<str:name>/datasets/create": [page("POST", DS, ok=302, body={"environment": "dev", "from": "bad"})],
    "models/<str:name>/environments/<str:env>/retraining-policy": [
        page("POST", ALERTS, ok=302, body={"snapshot_days": "7"})],
    "datasets/<uuid:uid>/": [page("GET")],
    "datasets/<uuid:uid>/download": [page("GET", DOWNLOAD)],
    "retraining/<uuid:uid>/close": [page("POST", ALERTS, ok=302, body={"reason": "matrix"})],
    "compliance/erased-data": [page("GET", AUDIT, outsider=403)],
    "erased-data/<uuid:uid>/decide": [page("POST", AUDIT, ok=302, outsider=403, body=DECISION)],
    # API: the foundation
    "api/v1/me": [api("GET", ALL)],
    # Tokens are created from a signed-in session only (tests/portal/test_tokens.py), never with a bearer token.
    "api/v1/tokens/": [api("GET", ALL), api("POST", (), outsider=403, body={"name": "matrix"})],
    "api/v1/tokens/<uuid:uid>/": [api("DELETE", ("ds",), denied=404)],  # anyone else's token: not found
    "api/v1/audit/events": [api("GET", AUDIT, outsider=403)],
    "api/v1/audit/verify": [api("GET", AUDIT, outsider=403)],
    "api/v1/audit/export": [api("GET", AUDIT, outsider=403)],
    "api/v1/audit/public-key": [api("GET", AUDIT, outsider=403)],
    "api/v1/teams/<slug:slug>/webhooks/": [api("GET", ADMIN), api("POST", ADMIN, ok=400)],
    "api/v1/teams/<slug:slug>/webhooks/<int:pk>/deliveries": [api("GET", ADMIN)],
    # MLflow: connecting a team's tracking server is a team manager's; the webhook takes no session or token, only
    # MLflow's signature (none here: 401 for everyone, audited as mlflow.webhook_refuse).
    "api/v1/integrations/mlflow/connections": [api("GET", ADMIN, outsider=403), api("POST", ADMIN, ok=400, outsider=403)],
    "api/v1/integrations/mlflow/webhook": [everyone("POST", 401)],
    # The connections page: every member reads (their own teams' connections; the outsider sees theirs, none), team
    # managers act. Connect is refused for want of a tracking URI (the form comes back, 302).
    "integrations/mlflow/": [page("GET", ALL)],
    "integrations/mlflow/connect": [page("POST", ADMIN, ok=302, outsider=403,
                                         body={"team": "acme", "tracking_uri": ""})],
    "integrations/mlflow/<uuid:uid>/disable": [page("POST", ADMIN, ok=302)],
    "integrations/mlflow/jobs/<uuid:uid>/retry": [page("POST", ADMIN, ok=302)],
    # Multi-model endpoints: every member reads; changing one is a dev deployment's (data scientists) in dev, a team
    # manager's in stage and prod. Creating one names its team, so the outsider meets acme as if it did not exist.
    "endpoints/": [page("GET", ALL)],
    "endpoints/new": [page("POST", DS, ok=302, body=ENDPOINT)],
    "endpoints/<str:endpoint_name>/<str:env>/": [page("GET")],
    "endpoints/<str:endpoint_name>/<str:env>/rules": [page("POST", DS, ok=302, body=ENDPOINT_RULES_FORM)],
    "endpoints/<str:endpoint_name>/<str:env>/delete": [page("POST", DS, ok=302)],
    "api/v1/endpoints/": [api("GET", ALL), api("POST", DS, ok=201, body=ENDPOINT)],
    "api/v1/endpoints/<str:endpoint_name>/<str:env>/": [
        api("GET"), api("PUT", DS, body={"rules": [{"kind": "share", "percent": 10, "model": "churn"}]}),
        api("DELETE", DS, ok=204)],
    "api/v1/serve/endpoints/<str:endpoint_name>/<str:env>/invocations": [api("POST", SCORE, body="ROWS")],
    # API: the registry
    "api/v1/models/": [api("GET", ALL), api("POST", DS, ok=201, body={"name": "matrix-model", "team": "acme"})],
    "api/v1/models/<str:name>/": [api("GET")],
    "api/v1/models/<str:name>/versions/": [api("POST", DS, ok=415)],
    "api/v1/models/<str:name>/versions/import": [api("POST", DS, ok=400)],
    "api/v1/models/<str:name>/versions/<int:number>/": [api("GET")],
    "api/v1/models/<str:name>/tags": [api("PUT", DS, body={"tags": ["matrix"]})],
    "api/v1/models/<str:name>/aliases": [api("GET")],
    "api/v1/models/<str:name>/aliases/<str:alias>": [api("PUT", DS, body={"version": 1}),
                                                     api("DELETE", DS, ok=400)],
    "api/v1/models/<str:name>/versions/<int:number>/tags": [api("PUT", DS, body={"tags": ["matrix"]})],
    "api/v1/models/<str:name>/versions/<int:number>/artifact": [api("GET", DOWNLOAD)],
    "api/v1/models/<str:name>/versions/<int:number>/reference": [api("GET", DOWNLOAD)],
    "api/v1/models/<str:name>/versions/<int:number>/trust": [api("POST", APPROVERS, ok=400, body=TRUST)],
    "api/v1/models/<str:name>/versions/<int:number>/deploy": [
        api("POST", DS, ok=202, body={"environment": "dev"})],
    "api/v1/deployments/<uuid:uid>/": [api("GET")],
    "api/v1/models/<str:name>/versions/<int:number>/promote": [
        api("POST", DS, ok=201, body={"target": "stage", "reason": "matrix"}, number=2)],
    "api/v1/promotions/": [api("GET", ALL)],
    "api/v1/promotions/<uuid:uid>/": [api("GET")],
    "api/v1/promotions/<uuid:uid>/evidence": [api("GET")],
    "api/v1/promotions/<uuid:uid>/approve": [api("POST", APPROVERS, body={"comment": "ok"})],
    "api/v1/promotions/<uuid:uid>/reject": [api("POST", APPROVERS, body={"comment": "not yet"})],
    "api/v1/promotions/<uuid:uid>/cancel": [api("POST", DS)],
    "api/v1/models/<str:name>/environments/<str:env>/rollback": [
        api("POST", DS, ok=202, body={"reason": "matrix rollback"}),
        api("POST", APPROVERS, ok=400, body={"reason": "nothing serves stage"}, env="stage")],
    "api/v1/models/<str:name>/environments/<str:env>/history": [api("GET")],
    "api/v1/batch-jobs/": [api("GET", ALL), api("POST", DS, ok=415, outsider=415)],
    "api/v1/batch-jobs/<uuid:uid>/": [api("GET")],
    "api/v1/batch-jobs/<uuid:uid>/result": [api("GET", DS, ok=400)],
    "api/v1/batch-jobs/<uuid:uid>/errors": [api("GET", DS, ok=400)],
    "api/v1/batch-jobs/<uuid:uid>/cancel": [api("POST", DS)],
    "api/v1/models/<str:name>/edge-packages/": [api("GET"), api("POST", DS, ok=202, body={"version": 1})],
    "api/v1/edge-packages/<uuid:uid>/": [api("GET")],
    "api/v1/edge-packages/<uuid:uid>/download": [api("GET", DOWNLOAD)],
    "api/v1/models/<str:name>/edge-tokens/": [api("GET"), api("POST", DS, ok=201, body={"name": "matrix fleet"})],
    "api/v1/edge-tokens/<uuid:uid>/revoke": [api("POST", DS)],
    # Uploads take a device token (mle_…) and nothing else: a user's token or session is not one (401).
    "api/v1/edge/uploads": [everyone("POST", 401)],
    "api/v1/edge/public-key": [api("GET", ALL)],
    "api/v1/models/<str:name>/batch-schedules/": [
        api("GET"), api("POST", DS, ok=201, body={**SCHEDULE, "env": "dev"})],
    "api/v1/batch-schedules/<int:pk>/": [api("GET"), api("PATCH", DS, body={"enabled": False}),
                                        api("DELETE", DS, ok=204)],
    # API: serving and monitoring
    "api/v1/serve/<str:name>/<str:env>/invocations": [api("POST", SCORE, body="ROWS")],
    # The world's versions were scanned, but their explain task (a second sandbox run) has not run: those allowed get
    # 503 explainer_pending, which is past every permission check.
    "api/v1/serve/<str:name>/<str:env>/explain": [api("POST", SCORE, ok=503, body="ROWS")],
    "api/v1/serve/<str:name>/<str:env>/feedback": [api("POST", SCORE, ok=202, body="FEEDBACK")],
    "api/v1/models/<str:name>/environments/<str:env>/predictions": [api("GET")],
    "api/v1/models/<str:name>/environments/<str:env>/monitoring": [api("GET")],
    "api/v1/models/<str:name>/monitoring-settings": [
        api("GET"), api("PUT", ALERTS, body={"thresholds": {}, "target_column": ""})],
    "api/v1/alerts/": [api("GET", ALL)],
    "api/v1/alerts/<uuid:uid>/acknowledge": [api("POST", ALERTS, body={"comment": "seen"})],
    "api/v1/alerts/<uuid:uid>/resolve": [api("POST", ALERTS, body={"resolution": "fixed"})],
    "api/v1/experiments/": [api("GET", ALL), api("POST", DS, ok=400, body=EXPERIMENT)],
    # The world has no ground truth, so the plan is refused (400) once the caller may see the model.
    "api/v1/experiments/plan": [api("GET", ok=400, body={**EXPERIMENT, "mde": "0.05"})],
    "api/v1/experiments/<uuid:uid>/": [api("GET"), api("PATCH", DS, body={"name": "matrix"})],
    "api/v1/experiments/<uuid:uid>/stop": [api("POST", DS, body={"reason": "matrix"})],
    "api/v1/gdpr/subjects/<str:subject_id>/export": [api("GET", AUDIT, outsider=403)],
    # Datasets, retraining and lineage (monitoring.datasets)
    "api/v1/datasets/": [api("GET", ALL), api("POST", DS, ok=202, body="SNAPSHOT")],
    "api/v1/datasets/<uuid:uid>/": [api("GET")],
    "api/v1/datasets/<uuid:uid>/download": [api("GET", DOWNLOAD)],
    "api/v1/models/<str:name>/environments/<str:env>/retraining-policy": [
        api("GET"), api("PUT", ALERTS, body={"snapshot_days": 7})],
    "api/v1/models/<str:name>/retraining-requests": [api("GET")],
    "api/v1/retraining-requests/<uuid:uid>/close": [api("POST", ALERTS, body={"reason": "matrix"})],
    "api/v1/models/<str:name>/versions/<int:number>/lineage": [api("GET")],
    "api/v1/erased-data-flags/": [api("GET", AUDIT, outsider=403)],
    "api/v1/erased-data-flags/<uuid:uid>/decide": [api("POST", AUDIT, outsider=403, body=DECISION)],
    "api/v1/gdpr/erasure": [api("POST", AUDIT, outsider=403, body={"subject_id": "subject-1", "reason": "asked"}),
                            api("POST", AUDIT, ok=400, outsider=403, body={"reason": "no subject"})],
}


# --- The world --------------------------------------------------------------------------------------------------

@pytest.fixture
def world(two_versions: list[ModelVersion], personas: dict[str, Any], tmp_path: Path) -> dict[str, Any]:  # noqa: F811
    v1, v2 = two_versions
    model = v1.model
    deployment = deploy_now(v1, personas["ds"])
    promotion = promotions.promotion_request(version=v1, target="stage", reason="matrix", actor=personas["ds"])
    deploy_now(v2, personas["ds"])  # v2 serves dev now; rolling back goes to v1, promoting v2 is allowed
    canary = deploy_now(v1, personas["ds"], strategy="canary", traffic_percent=50)  # v1 its canary: an experiment
    experiment = Experiment.objects.create(
        model=model, environment="dev", champion=EnvironmentState.objects.get(model=model, environment="dev").champion,
        challenger=canary, champion_version=2, challenger_version=1, traffic_percent=50, metric="accuracy", mde=0.05,
        baseline_sd=0.4, tau2=0.0025, planned_sample=1500, fixed_horizon_sample=800, started_by=personas["ds"])
    X, _y = files._data()
    source = tmp_path / "in.csv"
    X.head(20).to_csv(source, index=False)
    job = batch.batch_submit(model=model, environment="dev", path=source, filename="in.csv", actor=personas["ds"])
    schedule = batch.schedule_create(model=model, environment="dev", name="nightly", location="nightly/",
                                     cron="0 2 * * *", actor=personas["ds"])
    hook = TeamWebhook.objects.create(team=Team.objects.get(slug="acme"), url="https://hooks.example.com/in",
                                      secret="s" * 32)
    alert = Alert.objects.create(model=model, environment="dev", kind="error_rate", subject="", severity="alert",
                                 value=0.5, threshold=0.05, message="error rate 50%")
    victim_token, _ = portal_services.token_create(user=personas["ds"], name="victim", actor=personas["ds"])
    start = timezone.now() - dt.timedelta(hours=1)
    pids = [os.urandom(16).hex() for _ in range(5)]
    write_batches([{"model": "churn", "environment": "dev", "version": 1, "role": "champion", "ts": start.timestamp(),
                    "latency_ms": 1.0, "request_id": "", "error": "", "ids": pids,
                    "inputs": X.head(5).to_numpy().tolist(), "outputs": [0] * 5, "subjects": None}])
    Feedback.objects.bulk_create([Feedback(prediction_id=pid, actual=0) for pid in pids])
    snapshot = dataset_services.snapshot_create(model=model, environment="dev", start=start,
                                                end=timezone.now(), actor=personas["ds"])
    snapshot_cut(snapshot_id=snapshot.pk)
    retrain = RetrainingRequest.objects.create(model=model, environment="dev", trigger="manual", reason="matrix",
                                               snapshot=snapshot, status="called")
    flag = ErasedDataFlag.objects.create(version=v1, snapshot=snapshot, erasure_seq=1, erasure_hash="0" * 64)
    connection = MlflowConnection.objects.create(team=Team.objects.get(slug="acme"),
                                                 tracking_uri=f"http://127.0.0.1:{free_port()}",
                                                 secret_encrypted=mlflow_sync.secret_encrypt("s" * 32),
                                                 webhook_id="wh-1", created_by=personas["admin"])
    sync_job = MlflowSyncJob.objects.create(connection=connection, kind="import", registered_model="churn",
                                            mlflow_version="1", status=MlflowSyncStatus.FAILED, error="did not answer",
                                            attempts=8)
    archive = tmp_path / "edge.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty ZIP: the matrix asks who may download, not what
    edge_package = EdgePackage.objects.create(model=model, version=v1, status=EdgePackageStatus.READY, progress=100,
                                              blob=storage.blob_put_path(archive))
    edge_token, _ = edge_services.device_token_create(model=model, name="matrix devices", actor=personas["ds"])
    endpoint_services.endpoint_create(team=Team.objects.get(slug="acme"), name="front", environment="dev",
                                      default_model="churn", actor=personas["ds"],
                                      rules=[endpoint_services.RuleInput(kind="share", model="churn", percent=50)])
    report = SubjectAccessReport.objects.create(
        subject_hash="0" * 64, requested_by=personas["compliance"], status="ready",
        report=encrypt_value({"subject_hash": "0" * 64, "generated_at": timezone.now(), "predictions": [],
                              "feedback": [], "training_snapshots": [], "stores": []}))
    tokens = {who: portal_services.token_create(user=user, name="matrix", actor=user)[1]
              for who, user in personas.items()}
    ids = {"deployment": deployment.uid, "promotion": promotion.uid, "experiment": experiment.uid, "batch-job": job.uid,
           "alert": alert.uid, "token": victim_token.uid, "schedule": schedule.pk, "webhook": hook.pk,
           "snapshot": snapshot.uid,
           "retraining": retrain.uid, "flag": flag.uid, "mlflow-connection": connection.uid,
           "mlflow-job": sync_job.uid, "edge-package": edge_package.uid, "edge-token": edge_token.uid,
           "subject-report": report.uid,
           "seq": AuditEvent.objects.order_by("seq").values_list("seq", flat=True).last()}
    bodies = {"ROWS": {"dataframe_split": {"columns": list(X.columns), "data": X.head(2).to_numpy().tolist()}},
              "FEEDBACK": [{"prediction_id": "0" * 32, "actual": 1}],
              "SNAPSHOT": {"model": "churn", "environment": "dev", "from": start.isoformat(),
                           "to": timezone.now().isoformat()}}
    return {"ids": ids, "tokens": tokens, "personas": personas, "bodies": bodies}


def fill(pattern: str, name: str | None, ids: dict[str, Any], number: int = 1, env: str = "dev") -> str:
    """The pattern with acme's objects in its placeholders."""
    def value(match: re.Match[str]) -> str:
        converter, key = match.group(1), match.group(2)
        fixed = {"name": "churn", "endpoint_name": "front", "env": env, "number": str(number), "slug": "acme", "subject_id": "subject-1",
                 "alias": "champion",
                 "seq": str(ids["seq"])}
        if key in fixed:
            return fixed[key]
        if key == "pk":
            return str(ids["webhook" if "webhook" in (name or "") else "schedule"])
        assert converter == "uuid", pattern
        for prefix in ("deployment", "promotion", "batch-job", "alert", "token", "experiment"):
            if (name or "").startswith(prefix):
                return str(ids[prefix])
        for names, key in ((("dataset", "snapshot", "download"), "snapshot"), (("mlflow-disable",), "mlflow-connection"),
                           (("mlflow-job-retry",), "mlflow-job"), (("edge-package",), "edge-package"),
                           (("edge-token",), "edge-token"),
                           (("request-close", "retraining-close"), "retraining"), (("erased-data-decide",), "flag"),
                           (("subject-report",), "subject-report")):
            if (name or "").startswith(names):
                return str(ids[key])
        raise AssertionError(f"no object for {pattern}")

    return "/" + re.sub(r"<(?:(\w+):)?(\w+)>", value, pattern)


def routes() -> Iterator[tuple[str, str | None]]:
    def walk(patterns: list[Any], prefix: str) -> Iterator[tuple[str, str | None]]:
        for p in patterns:
            if isinstance(p, URLResolver):
                if str(p.pattern) == "admin/":  # Django's admin: staff only, checked in its own test below
                    continue
                yield from walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                yield prefix + str(p.pattern), p.name
    return walk(get_resolver().url_patterns, "")


class _Rollback(Exception):
    pass


SECURITY_HEADERS = ("Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy", "X-Frame-Options")


def _request(world: dict[str, Any], who: str | None, call: Call, path: str) -> tuple[int, int, list[str]]:
    """(status, audit events written, security headers missing from an HTML page), all rolled back after."""
    if call.api:
        client: Any = APIClient()
        if who:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {world['tokens'][who]}")
    else:
        client = Client()
        if who:
            client.force_login(world["personas"][who])
    body = world["bodies"].get(call.body, call.body) if isinstance(call.body, str) else call.body
    outcome: tuple[int, int, list[str]] = (0, 0, [])
    try:
        with transaction.atomic():
            before = AuditEvent.objects.count()
            kwargs: dict[str, Any] = {"format": "json"} if call.api and call.method != "GET" else {}
            response = getattr(client, call.method.lower())(path, body or {}, **kwargs)
            missing = [h for h in SECURITY_HEADERS if h not in response.headers] \
                if response.headers.get("Content-Type", "").startswith("text/html") else []
            outcome = (response.status_code, AuditEvent.objects.count() - before, missing)
            raise _Rollback
    except _Rollback:
        pass
    return outcome


def test_every_route_has_an_entry() -> None:
    known = {pattern for pattern, _name in routes()}
    missing = sorted(known - set(TABLE))
    assert not missing, f"routes without an entry in the authorisation table: {missing}"
    stale = sorted(set(TABLE) - known)
    assert not stale, f"entries for routes that no longer exist: {stale}"


def test_every_route_for_every_persona(world: dict[str, Any]) -> None:
    """One world, every route and persona: the differences from the table are listed together."""
    wrong: list[str] = []
    for pattern, name in sorted(routes()):
        for call in TABLE.get(pattern, []):
            path = fill(pattern, name, world["ids"], call.number, call.env)
            for who in PERSONAS:
                status, events, missing = _request(world, who, call, path)
                if status != call.expected[who]:
                    wrong.append(f"{call.method} {path} as {who}: {status}, expected {call.expected[who]}")
                if call.method != "GET" and who not in call.allowed and events:
                    wrong.append(f"{call.method} {path} as {who}: refused, yet {events} audit event(s) written")
                if missing:
                    wrong.append(f"{call.method} {path} as {who}: no {', '.join(missing)} header")
    assert not wrong, "\n".join(wrong)


def test_the_admin_site_is_for_staff_only(world: dict[str, Any]) -> None:
    for who in PERSONAS:
        client = Client()
        if who:
            client.force_login(world["personas"][who])
        response = client.get("/admin/")
        assert response.status_code == (200 if who == "admin" else 302), who
        if who != "admin":
            assert response.headers["Location"].startswith("/admin/login/"), who


def test_every_form_and_session_api_call_needs_the_csrf_token(world: dict[str, Any]) -> None:
    """Signed in through the browser, a POST (PUT, PATCH, DELETE) without the CSRF token is refused everywhere."""
    unprotected = []
    for pattern, name in sorted(routes()):
        for call in TABLE.get(pattern, []):
            if call.method == "GET":
                continue
            client: Any = APIClient(enforce_csrf_checks=True) if call.api else Client(enforce_csrf_checks=True)
            client.force_login(world["personas"]["admin"])
            body = world["bodies"].get(call.body, call.body) if isinstance(call.body, str) else call.body
            kwargs: dict[str, Any] = {"format": "json"} if call.api else {}
            path = fill(pattern, name, world["ids"], call.number, call.env)
            response = getattr(client, call.method.lower())(path, body or {}, **kwargs)
            # The serving endpoints take tokens only, MLflow's webhook only its signature and edge uploads only a
            # device token, never the session: 401 there.
            sessionless = "/serve/" in path or path.startswith(("/api/v1/integrations/mlflow/webhook",
                                                                "/api/v1/edge/uploads"))
            if response.status_code not in (403, 401) or (response.status_code == 401 and not sessionless):
                unprotected.append(f"{call.method} {path}: {response.status_code}")
    assert not unprotected, unprotected
