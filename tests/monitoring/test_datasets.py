"""Dataset snapshots: the rows equal the prediction log joined with its ground truth, chunk by chunk and resumable;
sensitive columns are treated as the versions mark them; bad requests get clear 400s; a snapshot's read-only token
reads that snapshot only; lineage is checked and shown both ways; an erasure reaches the snapshot and the versions
trained on it."""

from __future__ import annotations

import datetime as dt
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from django.utils import timezone

from monitoring.datasets import retraining, services
from monitoring.datasets.cut import snapshot_cut
from monitoring.flush import write_batches
from monitoring.models import (
    DatasetSnapshot,
    ErasedDataFlag,
    Feedback,
    PredictionLog,
    RetrainingRequest,
    TrainingLink,
)
from monitoring.sensitive import decrypt_value, sensitive_positions
from portal.models import AuditEvent, Team, TeamWebhook, WebhookDelivery
from portal.webhooks import webhook_deliver
from registry import storage
from registry.models import Blob, ModelVersion
from registry.serving.views import subject_hash
from registry.versions import services as version_services
from registry.versions.localfiles import LocalUpload
from tests.conftest import assert_error_shape
from tests.monitoring.conftest import reference_matrix
from tests.registry import files

pytestmark = pytest.mark.django_db

SUBJECTS = [f"person-{i}@example.org" for i in range(7)]


def log_traffic(n: int, *, at: dt.datetime, version: int = 1, labelled_every: int = 1,
                model: str = "churn") -> list[str]:
    """``n`` predictions with subject ids (as serving logs them: keyed hashes) and ground truth for every
    ``labelled_every``-th one; returns their ids."""
    _cols, X, y = reference_matrix()
    ids = [os.urandom(16).hex() for _ in range(n)]
    write_batches([{"model": model, "environment": "dev", "version": version, "role": "champion",
                    "ts": at.timestamp() + i * 0.001, "latency_ms": 2.0, "request_id": "", "error": "",
                    "ids": [ids[i]], "inputs": [X[i % len(X)].tolist()], "outputs": [int(y[i % len(y)])],
                    "subjects": [subject_hash(SUBJECTS[i % len(SUBJECTS)])]} for i in range(n)])
    Feedback.objects.bulk_create([Feedback(prediction_id=pid, actual=int(y[i % len(y)]))
                                  for i, pid in enumerate(ids) if i % labelled_every == 0])
    return ids


def expected_rows(ids: list[str]) -> pd.DataFrame:
    """The log joined with its ground truth, straight from the tables, as the snapshot should hold it."""
    rows = []
    truth = dict(Feedback.objects.filter(prediction_id__in=ids).values_list("prediction_id", "actual"))
    for p in PredictionLog.objects.filter(id__in=ids).order_by("created_at", "id"):
        rows.append({"prediction_id": p.id, "subject_hash": p.subject_hash, "prediction": float(p.output),
                     "actual": float(truth[p.id]) if p.id in truth else None, "inputs": list(p.inputs)})
    return pd.DataFrame(rows)


def read(snapshot: DatasetSnapshot) -> pd.DataFrame:
    assert snapshot.blob is not None
    with storage.verified_local_path(snapshot.blob) as path:
        return pq.read_table(path).to_pandas()


@pytest.fixture
def traffic(live: ModelVersion) -> dict[str, Any]:
    start = timezone.now() - dt.timedelta(hours=1)
    ids = log_traffic(250, at=start + dt.timedelta(minutes=1), labelled_every=2)
    return {"version": live, "start": start, "end": timezone.now(), "ids": ids}


def _create(api: Any, traffic: dict[str, Any], **extra: Any) -> Any:
    return api.post("/api/v1/datasets/", {"model": "churn", "environment": "dev", "from": traffic["start"].isoformat(),
                                          "to": traffic["end"].isoformat(), **extra}, format="json")


def test_snapshot_rows_equal_the_log_joined_with_ground_truth(traffic: dict[str, Any], personas: dict[str, Any],
                                                              api_as: Callable[[Any], Any], settings: Any) -> None:
    settings.PORTAL_SNAPSHOT_CHUNK_ROWS = 40
    ds = api_as(personas["ds"])
    response = _create(ds, traffic, labelled_only=False)
    assert response.status_code == 202, response.content
    uid = response.json()["id"]
    assert response.json()["status"] == "pending" and response.json()["rows_expected"] == 250
    snapshot = snapshot_cut(snapshot_id=DatasetSnapshot.objects.get(uid=uid).pk)
    assert snapshot is not None and snapshot.status == "ready", snapshot.error if snapshot else None
    assert snapshot.chunks_done == 7  # 250 rows in chunks of 40

    table = read(snapshot)
    want = expected_rows(traffic["ids"])
    assert list(table["prediction_id"]) == list(want["prediction_id"])
    assert list(table["subject_hash"]) == list(want["subject_hash"])
    assert all(len(h) == 64 for h in table["subject_hash"]) and "person-" not in table.to_csv()
    assert table["prediction"].tolist() == want["prediction"].tolist()
    assert table["actual"].isna().tolist() == want["actual"].isna().tolist()
    assert table["actual"].dropna().tolist() == want["actual"].dropna().tolist()
    columns = [c["name"] for c in (traffic["version"].signature or {})["inputs"]]
    assert table[columns].to_numpy().tolist() == want["inputs"].tolist()

    manifest = ds.get(f"/api/v1/datasets/{uid}/").json()["manifest"]
    assert manifest["rows"] == 250 and manifest["labelled_rows"] == 125 and manifest["label_coverage"] == 0.5
    assert manifest["source_versions"] == [1] and manifest["sha256"] == snapshot.sha256
    assert manifest["window"]["from"] == traffic["start"].isoformat()
    assert [c["name"] for c in manifest["columns"]][:5] == ["prediction_id", "created_at", "version", "role",
                                                          "subject_hash"]

    download = ds.get(f"/api/v1/datasets/{uid}/download")
    assert download.status_code == 200 and download["X-Content-SHA256"] == snapshot.sha256
    body = b"".join(download.streaming_content)
    assert pq.read_table(io.BytesIO(body)).num_rows == 250
    event = AuditEvent.objects.filter(action="dataset.download").get()
    assert event.actor_username == "dana" and event.metadata["sha256"] == snapshot.sha256
    assert AuditEvent.objects.filter(action__in=("dataset.create", "dataset.ready")).count() == 2
    page = api_as(None)
    assert page.get(f"/api/v1/datasets/{uid}/download").status_code == 401


def test_a_cut_resumes_after_a_crash_at_chunk_granularity(traffic: dict[str, Any], personas: dict[str, Any],
                                                          settings: Any) -> None:
    settings.PORTAL_SNAPSHOT_CHUNK_ROWS = 50
    model = traffic["version"].model
    whole = services.snapshot_create(model=model, environment="dev", start=traffic["start"], end=traffic["end"],
                                     actor=personas["ds"], labelled_only=False)
    snapshot_cut(snapshot_id=whole.pk)
    crashed = services.snapshot_create(model=model, environment="dev", start=traffic["start"], end=traffic["end"],
                                       actor=personas["ds"], labelled_only=False)
    assert snapshot_cut(snapshot_id=crashed.pk, max_chunks=2) is not None  # the worker dies after two chunks
    crashed.refresh_from_db()
    assert (crashed.status, crashed.chunks_done, crashed.rows_done) == ("running", 2, 100)
    assert snapshot_cut(snapshot_id=crashed.pk) is None, "a live worker's snapshot is not taken over"
    DatasetSnapshot.objects.filter(pk=crashed.pk).update(heartbeat_at=timezone.now() - dt.timedelta(hours=1))
    seen: list[int] = []
    done = snapshot_cut(snapshot_id=crashed.pk, after_chunk=seen.append)
    whole.refresh_from_db()
    assert done is not None and done.status == "ready"
    assert seen == [3, 4, 5], "the replacement wrote only the chunks that were missing"
    assert done.sha256 == whole.sha256, "the resumed file is byte for byte the uninterrupted one"


def test_sensitive_columns_are_dropped_masked_or_kept_encrypted(live: ModelVersion, personas: dict[str, Any]) -> None:
    names = [c["name"] for c in live.signature["inputs"]]
    ModelVersion.objects.filter(pk=live.pk).update(sensitive_columns={names[0]: "personal", names[1]: "health",
                                                                      names[2]: "personal"})
    sensitive_positions.cache_clear()
    start = timezone.now() - dt.timedelta(hours=1)
    ids = log_traffic(30, at=start)
    stored = PredictionLog.objects.get(pk=ids[0]).inputs
    assert str(stored[0]).startswith("enc:"), "the log holds the personal value encrypted"
    snapshot = services.snapshot_create(model=live.model, environment="dev", start=start, end=timezone.now(),
                                        actor=personas["ds"], sensitive={names[2]: "masked"})
    snapshot = snapshot_cut(snapshot_id=snapshot.pk)
    assert snapshot is not None and snapshot.status == "ready", snapshot.error if snapshot else None
    table = read(snapshot)
    assert names[1] not in table.columns, "health data is dropped by default"
    assert set(table[names[2]]) == {"•••"}
    first = table.set_index("prediction_id").loc[ids[0]]
    assert first[names[0]].startswith("enc:") and decrypt_value(first[names[0]]) == decrypt_value(stored[0])
    assert snapshot.manifest["sensitive_columns"] == {
        names[0]: {"kind": "personal", "treatment": "encrypted"}, names[1]: {"kind": "health", "treatment": "dropped"},
        names[2]: {"kind": "personal", "treatment": "masked"}}


def test_bad_requests_get_clear_messages_and_write_nothing(live: ModelVersion, personas: dict[str, Any],
                                                          api_as: Callable[[Any], Any]) -> None:
    ds = api_as(personas["ds"])
    now = timezone.now()
    window = {"start": (now - dt.timedelta(hours=1)).isoformat(), "end": now.isoformat()}
    body = {"model": "churn", "environment": "dev", "from": window["start"], "to": window["end"]}
    empty = assert_error_shape(ds.post("/api/v1/datasets/", body, format="json"), 400)
    assert "No predictions of churn in dev were logged" in empty["error"]["message"]
    ids = log_traffic(20, at=now - dt.timedelta(minutes=30), labelled_every=10_000)
    Feedback.objects.filter(prediction_id__in=ids).delete()
    unlabelled = assert_error_shape(ds.post("/api/v1/datasets/", body, format="json"), 400)
    assert "has ground truth yet" in unlabelled["error"]["message"]
    backwards = assert_error_shape(ds.post("/api/v1/datasets/", {**body, "from": window["end"], "to": window["start"]},
                                           format="json"), 400)
    assert "window is empty" in backwards["error"]["message"]
    assert_error_shape(ds.post("/api/v1/datasets/", {**body, "sensitive": {"x": "shown"}}, format="json"), 400)
    assert not DatasetSnapshot.objects.exists() and not AuditEvent.objects.filter(action="dataset.create").exists()
    assert ds.post("/api/v1/datasets/", {**body, "labelled_only": False}, format="json").status_code == 202
    assert api_as(personas["viewer"]).post("/api/v1/datasets/", body, format="json").status_code == 403
    assert api_as(personas["outsider"]).post("/api/v1/datasets/", body, format="json").status_code == 404


def _ready(live: ModelVersion, personas: dict[str, Any], model: str = "churn") -> DatasetSnapshot:
    start = timezone.now() - dt.timedelta(hours=1)
    log_traffic(20, at=start, model=model)
    registered = live.model if model == "churn" else ModelVersion.objects.filter(model__name=model).get().model
    snapshot = services.snapshot_create(model=registered, environment="dev", start=start, end=timezone.now(),
                                        actor=personas["ds"] if model == "churn" else personas["outsider"])
    done = snapshot_cut(snapshot_id=snapshot.pk)
    assert done is not None and done.status == "ready"
    return done


def test_a_dataset_token_reads_its_snapshot_and_nothing_else(live: ModelVersion, personas: dict[str, Any],
                                                              api_as: Callable[[Any], Any]) -> None:
    from rest_framework.test import APIClient

    mine, other = _ready(live, personas), _ready(live, personas)
    token, plaintext = services.token_issue(snapshot=mine)
    client = APIClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    response = client.get(f"/api/v1/datasets/{mine.uid}/download")
    assert response.status_code == 200 and response["X-Content-SHA256"] == mine.sha256
    assert client.get(f"/api/v1/datasets/{other.uid}/download").status_code == 404
    assert AuditEvent.objects.filter(action="dataset.download_refused", outcome="denied").count() == 1
    for path in ("/api/v1/models/", f"/api/v1/datasets/{mine.uid}/", "/api/v1/datasets/", "/api/v1/me"):
        assert client.get(path).status_code == 401, path
    assert client.post("/api/v1/datasets/", {}, format="json").status_code == 401
    DatasetAccessToken = type(token)
    DatasetAccessToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    assert client.get(f"/api/v1/datasets/{mine.uid}/download").status_code == 401, "expired"
    event = AuditEvent.objects.filter(action="dataset.download").get()
    assert event.actor is None and event.actor_username.startswith("dataset token mld_")


def _upload(api: Any, tmp_path: Path, trained_on: str) -> Any:
    path = files.joblib_file(tmp_path / "next.joblib", files.logistic_regression())
    with open(path, "rb") as fh:
        return api.post("/api/v1/models/churn/versions/", {"file": fh, "trained_on": trained_on}, format="multipart")


def test_lineage_is_checked_and_shown_both_ways_and_erasure_reaches_it(
        live: ModelVersion, personas: dict[str, Any], api_as: Callable[[Any], Any], tmp_path: Path,
        make_user: Any) -> None:
    snapshot = _ready(live, personas)
    ds = api_as(personas["ds"])
    # Another team's snapshot is refused, naming it, and nothing is written.
    other_model = version_services.model_register(name="rival", team=Team.objects.get(slug="other"),
                                                  actor=personas["outsider"])
    upload = LocalUpload(files.joblib_file(tmp_path / "r.joblib", files.logistic_regression()), "r.joblib")
    version_services.version_upload(model=other_model, upload=upload, meta=version_services.UploadMetadata(),
                                    actor=personas["outsider"])
    theirs = _ready(live, personas, model="rival")
    versions_before = ModelVersion.objects.count()
    refused = assert_error_shape(_upload(ds, tmp_path, str(theirs.uid)), 400)
    assert "no snapshot of yours" in refused["error"]["message"]
    refused = assert_error_shape(_upload(api_as(personas["admin"]), tmp_path, str(theirs.uid)), 400)
    assert "another team's model" in refused["error"]["message"]
    assert ModelVersion.objects.count() == versions_before and not TrainingLink.objects.exists()

    response = _upload(ds, tmp_path, f"{snapshot.sha256}")
    assert response.status_code == 201, response.content
    number = response.json()["number"]
    lineage = ds.get(f"/api/v1/models/churn/versions/{number}/lineage").json()
    assert [t["snapshot"] for t in lineage["trained_on"]] == [str(snapshot.uid)]
    assert lineage["trained_on_erased_data"] is False
    assert [v["version"] for v in ds.get(f"/api/v1/datasets/{snapshot.uid}/").json()["trained_versions"]] == [number]
    assert AuditEvent.objects.filter(action="version.trained_on").count() == 1

    # Erasing one subject rewrites the snapshot without their rows and flags the version.
    compliance = api_as(personas["compliance"])
    before_sha, before_blob = snapshot.sha256, snapshot.blob_id
    victim = subject_hash(SUBJECTS[3])
    held = int((read(snapshot)["subject_hash"] == victim).sum())
    assert held == 3
    receipt = compliance.post("/api/v1/gdpr/erasure", {"subject_id": SUBJECTS[3], "reason": "Art. 17"},
                              format="json").json()
    snapshot.refresh_from_db()
    assert snapshot.sha256 != before_sha and not Blob.objects.filter(pk=before_blob).exists()
    table = read(snapshot)
    assert len(table) == 20 - held and victim not in set(table["subject_hash"])
    rewritten = {s["snapshot"]: s for s in receipt["training_data"]["snapshots"]}
    assert set(rewritten) == {str(snapshot.uid), str(theirs.uid)}, "every team's snapshot holding the subject"
    assert rewritten[str(snapshot.uid)] == {"snapshot": str(snapshot.uid), "model": "churn", "old_sha256": before_sha,
                                            "new_sha256": snapshot.sha256, "rows_removed": held}
    assert [(v["model"], v["version"]) for v in receipt["training_data"]["versions_flagged"]] == [("churn", number)]
    [link] = snapshot.manifest["chain"]
    assert link["sha256"] == before_sha and link["receipt"] == receipt["receipt"]
    event = AuditEvent.objects.get(seq=receipt["receipt"]["audit_event_seq"])
    assert before_sha in {s["old_sha256"] for s in event.after["training_data"]["snapshots"]}
    assert [v["version"] for v in event.after["training_data"]["versions_trained_on_them"]] == [number]
    assert ds.get(f"/api/v1/models/churn/versions/{number}/lineage").json()["trained_on_erased_data"] is True
    assert AuditEvent.objects.filter(action="dataset.erase_rows").count() == 2
    assert AuditEvent.objects.filter(action="version.erased_data_flag").count() == 1

    flag = ErasedDataFlag.objects.get()
    url = f"/api/v1/erased-data-flags/{flag.uid}/decide"
    assert ds.post(url, {"decision": "keep", "reason": "not my call"}, format="json").status_code == 403
    short = assert_error_shape(compliance.post(url, {"decision": "keep", "reason": "ok"}, format="json"), 400)
    assert "needs a reason" in short["error"]["message"]
    decided = compliance.post(url, {"decision": "keep", "reason": "one row of 20; the effect is negligible"},
                              format="json")
    assert decided.status_code == 200 and decided.json()["decision"] == "keep"
    assert ds.get(f"/api/v1/models/churn/versions/{number}/lineage").json()["trained_on_erased_data"] is False
    assert AuditEvent.objects.filter(action="version.erased_data_decision").count() == 1


@pytest.fixture
def ci_hook(live: ModelVersion) -> TeamWebhook:
    return TeamWebhook.objects.create(team=Team.objects.get(slug="acme"), url="https://ci.example.com/retrain",
                                      secret="s" * 32)


def test_a_failing_ci_is_retried_shown_and_the_request_deduplicated(
        live: ModelVersion, personas: dict[str, Any], api_as: Callable[[Any], Any], ci_hook: TeamWebhook,
        monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any) -> None:
    from portal import webhooks

    log_traffic(30, at=timezone.now() - dt.timedelta(hours=2))
    put = api_as(personas["ds"]).put("/api/v1/models/churn/environments/dev/retraining-policy",
                                     {"schedule_hours": 24, "on_drift": False, "webhook": ci_hook.pk}, format="json")
    assert put.status_code == 200, put.content
    calls: list[int] = []

    def refusing_ci(url: str, secret: str, event: str, delivery_id: str, payload: dict[str, Any]) -> int:
        calls.append(1)
        return 503

    monkeypatch.setattr(webhooks, "post_signed", refusing_ci)
    with django_capture_on_commit_callbacks(execute=False):
        assert retraining.retraining_evaluate()["opened"] == 1
        assert retraining.retraining_evaluate()["opened"] == 0, "one open request at a time"
    request = RetrainingRequest.objects.get()
    assert request.trigger == "schedule" and request.status == "cutting"
    with django_capture_on_commit_callbacks(execute=False):
        snapshot_cut(snapshot_id=request.snapshot.pk)
    request.refresh_from_db()
    assert request.status == "calling" and request.delivery is not None
    for _ in range(6):
        webhook_deliver(delivery_id=request.delivery.pk)
    assert len(calls) == 6 and WebhookDelivery.objects.get().status == "failed"
    retraining.retraining_sync()
    request.refresh_from_db()
    assert request.status == "failed" and "HTTP 503" in request.error
    listed = api_as(personas["viewer"]).get("/api/v1/models/churn/retraining-requests").json()["results"]
    assert listed[0]["status"] == "failed" and listed[0]["ci_call"]["attempts"] == 6
    from django.test import Client

    browser = Client()
    browser.force_login(personas["viewer"])
    assert "HTTP 503" in browser.get("/models/churn/").content.decode()
    with django_capture_on_commit_callbacks(execute=False):
        assert retraining.retraining_evaluate()["opened"] == 0, "a failed request is not asked again at once"
