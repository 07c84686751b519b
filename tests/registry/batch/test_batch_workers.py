"""Batch jobs carried out by real Celery worker processes on PostgreSQL and Redis: chunks spread over the workers,
a worker killed mid-chunk, cancel, and a schedule's run."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
from typing import Any

import numpy as np
import pytest
from django.test import Client

from monitoring.models import PredictionLog
from portal.models import AuditEvent
from registry.models import BatchChunk, BatchJob, ModelVersion
from tests.conftest import wait_for
from tests.registry import files

pytestmark = pytest.mark.slow

WORKER_ENV = {"PORTAL_BATCH_CHUNK_MB": "1", "PORTAL_CELERY_VISIBILITY_TIMEOUT": "5"}


def _big_csv(copies: int) -> tuple[bytes, Any]:
    """The breast-cancer rows repeated with a little noise and an id column: about 0.13 MB per copy."""
    X, _y = files._data()
    rng = np.random.default_rng(7)
    frames = [X * (1 + rng.normal(0, 0.01, size=X.shape)) for _ in range(copies)]
    import pandas as pd

    frame = pd.concat(frames, ignore_index=True)
    frame.insert(0, "customer", [f"c{i:06d}" for i in range(len(frame))])
    return frame.to_csv(index=False).encode(), frame


def _submit(client: Client, data: bytes) -> BatchJob:
    upload = io.BytesIO(data)
    upload.name = "customers.csv"
    response = client.post("/api/v1/batch-jobs/", {"model": "churn", "env": "dev", "file": upload,
                                                   "id_column": "customer"})
    assert response.status_code == 202, response.content
    return BatchJob.objects.get(uid=response.json()["id"])


def _finished(job: BatchJob, timeout: float = 180) -> BatchJob:
    return wait_for(lambda: (j := BatchJob.objects.get(pk=job.pk)).status in ("done", "failed", "cancelled") and j,
                    timeout=timeout, what=f"batch job {job.uid} to finish")


def _result(client: Client, job: BatchJob) -> list[dict[str, str]]:
    response = client.get(f"/api/v1/batch-jobs/{job.uid}/result")
    assert response.status_code == 200
    return list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))


def _ping(names: list[str]) -> bool:
    from config.celery import app

    replies = app.control.ping(destination=names, timeout=1.0) or []
    return len(replies) == len(names)


def test_two_workers_share_the_chunks_and_the_result_is_whole_and_in_order(
        worker_factory: Any, ds_client: Client, two_versions: list[ModelVersion]) -> None:
    import socket

    queue = worker_factory.queue
    workers = [worker_factory(**WORKER_ENV) for _ in range(2)]
    wait_for(lambda: _ping([f"w{i}-{queue}@{socket.gethostname()}" for i in range(2)]), timeout=60,
             what="both workers to answer")
    data, frame = _big_csv(60)
    job = _finished(_submit(ds_client, data))
    assert job.status == "done", job.error
    assert job.chunks_total >= 6 and job.rows_total == len(frame)
    rows = _result(ds_client, job)
    assert [r["customer"] for r in rows] == frame["customer"].tolist()
    expected = files.logistic_regression().predict(frame.drop(columns=["customer"]))
    assert [int(r["prediction"]) for r in rows] == expected.tolist()
    chunk_workers = set(BatchChunk.objects.filter(job=job).values_list("worker", flat=True))
    assert {w.rsplit(":", 1)[1] for w in chunk_workers} == {str(w.pid) for w in workers}, "both workers scored"
    # The predictions join the log after the result is ready, once each.
    wait_for(lambda: BatchJob.objects.get(pk=job.pk).rows_logged == len(frame), timeout=180,
             what="the prediction log to take every row")
    assert PredictionLog.objects.filter(role="batch").count() == len(frame)


def test_a_worker_killed_mid_chunk_loses_only_that_chunk_which_runs_once_more(
        worker_factory: Any, ds_client: Client) -> None:
    doomed = worker_factory(**WORKER_ENV)
    data, frame = _big_csv(80)
    job = _submit(ds_client, data)
    running = wait_for(lambda: BatchChunk.objects.filter(job=job, status="running", index__gte=2,
                                                         worker__endswith=f":{doomed.pid}").first(),
                       timeout=120, interval=0.005, what="the doomed worker to be inside a chunk")
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=30)
    assert BatchJob.objects.get(pk=job.pk).status == "scoring"
    worker_factory(**WORKER_ENV)
    job = _finished(job)
    assert job.status == "done", job.error
    killed = BatchChunk.objects.get(pk=running.pk)
    assert killed.attempts == 2 and killed.status == "done"
    assert set(BatchChunk.objects.filter(job=job).exclude(pk=running.pk).values_list("attempts", flat=True)) == {1}
    rows = _result(ds_client, job)
    assert len(rows) == len(frame) and [r["customer"] for r in rows] == frame["customer"].tolist()
    assert len({r["prediction_id"] for r in rows}) == len(frame), "no row twice"
    assert AuditEvent.objects.filter(action="batch.done", target_id=str(job.uid)).count() == 1


def test_cancel_stops_the_workers_taking_more_chunks(worker_factory: Any, ds_client: Client) -> None:
    worker_factory(**WORKER_ENV)
    data, _frame = _big_csv(80)
    job = _submit(ds_client, data)
    wait_for(lambda: BatchJob.objects.get(pk=job.pk).chunks_done >= 1, timeout=120, interval=0.01,
             what="a first chunk")
    response = ds_client.post(f"/api/v1/batch-jobs/{job.uid}/cancel")
    assert response.status_code == 200
    done_at_cancel = BatchChunk.objects.filter(job=job).exclude(status="pending").count()
    # The queue drains: every remaining message is taken and refused without scoring.
    import time

    time.sleep(3)
    job.refresh_from_db()
    assert job.status == "cancelled" and job.result_blob is None
    still_pending = BatchChunk.objects.filter(job=job, status="pending").count()
    assert still_pending >= job.chunks_total - done_at_cancel - 1 > 0
    assert BatchChunk.objects.filter(job=job, status="done").count() <= done_at_cancel + 1


def test_a_schedule_run_becomes_a_job(worker_factory: Any, ds_client: Client, personas: dict[str, Any],
                                      api_as: Any) -> None:
    from django.core.files.base import ContentFile
    from django_celery_beat.models import PeriodicTask

    from config.celery import app
    from registry import storage

    worker_factory(**WORKER_ENV)
    response = api_as(personas["ds"]).post("/api/v1/models/churn/batch-schedules/", {
        "name": "hourly", "env": "dev", "location": "hourly/", "cron": "0 * * * *", "id_column": "customer"},
        format="json")
    assert response.status_code == 201, response.content
    data, frame = _big_csv(2)
    name = storage.artifact_storage().save("batch-inbox/acme/hourly/today.csv", ContentFile(data))
    try:
        task = PeriodicTask.objects.get(name=f"batch-schedule-{response.json()['id']}")
        # What beat sends when the crontab is due: the task by name with its stored arguments.
        app.send_task(task.task, args=json.loads(task.args), queue=worker_factory.queue)
        job = wait_for(lambda: BatchJob.objects.filter(schedule_id=response.json()["id"]).first(), timeout=60,
                       what="the scheduled run's job")
        job = _finished(job)
        assert job.status == "done" and job.rows_total == len(frame) and job.requested_by == personas["ds"]
    finally:
        storage.artifact_storage().delete(name)
