"""Batch scoring in one process: submission checks, chunking, bad rows, assembly in order, Parquet, cancel,
schedules, downloads and permissions. The same steps with real workers are in ``test_batch_workers.py``."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.test import Client

from monitoring.models import PredictionLog
from portal.models import AuditEvent
from registry.batch import services as batch
from registry.models import BatchChunk, BatchJob, BatchSchedule, ModelVersion
from tests.conftest import assert_error_shape
from tests.registry import files


def _frame(n: int | None = None) -> Any:
    X, _y = files._data()
    return X if n is None else X.head(n)


def _csv_bytes(frame: Any, *, id_column: bool = True) -> bytes:
    out = frame.copy()
    if id_column:
        out.insert(0, "customer", [f"c{i:04d}" for i in range(len(out))])
    return out.to_csv(index=False).encode()


def run_inline(job: BatchJob) -> BatchJob:
    """Plan, score every chunk and assemble in this process (what the workers do), returning the job."""
    batch.batch_plan(job_id=job.pk)
    for chunk in BatchChunk.objects.filter(job=job).order_by("-index"):  # any order: assembly restores it
        batch.batch_chunk_run(chunk_id=chunk.pk)
    job.refresh_from_db()
    if job.status == "scoring":
        batch.batch_assemble(job_id=job.pk)
    job.refresh_from_db()
    return job


def _submit(client: Client, data: bytes, name: str = "scores.csv", **fields: Any) -> Any:
    upload = io.BytesIO(data)
    upload.name = name
    return client.post("/api/v1/batch-jobs/", {"model": "churn", "env": "dev", "file": upload, **fields})


@pytest.fixture
def ds_client(serving: Client, personas: dict[str, Any]) -> Client:
    client = Client()
    client.force_login(personas["ds"])
    return client


def _result_rows(client: Client, job: BatchJob) -> list[dict[str, str]]:
    response = client.get(f"/api/v1/batch-jobs/{job.uid}/result")
    assert response.status_code == 200, response.content[:300]
    return list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))


def test_a_multi_chunk_csv_comes_back_whole_in_order_with_the_models_predictions(
        ds_client: Client, settings: Any, two_versions: list[ModelVersion]) -> None:
    settings.PORTAL_BATCH_CHUNK_BYTES = 16 * 1024
    frame = _frame()
    response = _submit(ds_client, _csv_bytes(frame), id_column="customer", subject_column="customer")
    assert response.status_code == 202, response.content
    job = BatchJob.objects.get(uid=response.json()["id"])
    # Cut into chunks while it arrived: scoring can start without a worker reading the file again.
    assert job.version == two_versions[0] and job.status == "scoring" and job.chunks.count() == job.chunks_total > 1
    job = run_inline(job)
    assert job.status == "done", job.error
    assert job.chunks_total >= 5 and job.rows_total == len(frame) == job.rows_done
    rows = _result_rows(ds_client, job)
    expected = files.logistic_regression().predict(frame)
    assert [r["customer"] for r in rows] == [f"c{i:04d}" for i in range(len(frame))]
    assert [int(r["prediction"]) for r in rows] == expected.tolist()
    assert len({r["prediction_id"] for r in rows}) == len(frame)
    # The input's values come back byte for byte.
    first_line = _csv_bytes(frame).split(b"\n")[1].decode()
    assert ",".join(list(rows[0].values())[:-2]) == first_line
    # Every row joins the prediction log (in bulk, after the result), under the ids in the file.
    for chunk in job.chunks.all():
        batch.batch_log_chunk(chunk_id=chunk.pk)
    job.refresh_from_db()
    assert job.rows_logged == len(frame)
    logged = PredictionLog.objects.filter(model_name="churn", role="batch")
    assert logged.count() == len(frame)
    assert set(logged.values_list("id", flat=True)) == {r["prediction_id"] for r in rows}
    from registry.serving.views import subject_hash

    first = logged.get(id=rows[0]["prediction_id"])
    assert first.subject_hash == subject_hash("c0000") and first.output == expected[0] and first.error == ""
    assert first.inputs == pytest.approx(frame.iloc[0].tolist())
    # A repeated log task writes nothing twice.
    assert sum(batch.batch_log_chunk(chunk_id=chunk.pk) for chunk in job.chunks.all()) == 0
    assert PredictionLog.objects.filter(role="batch").count() == len(frame)
    actions = list(AuditEvent.objects.filter(target_id=str(job.uid)).order_by("seq").values_list("action", flat=True))
    assert actions[:2] == ["batch.submit", "batch.done"] and "batch.download" in actions


def test_quoted_fields_with_line_breaks_and_crlf_survive_chunking(ds_client: Client, settings: Any) -> None:
    settings.PORTAL_BATCH_CHUNK_BYTES = 2 * 1024
    frame = _frame(60).copy()
    frame.insert(0, "note", [f'line one\nline "two", {i}' for i in range(len(frame))])
    data = frame.to_csv(index=False, lineterminator="\r\n").encode()
    job = BatchJob.objects.get(uid=_submit(ds_client, data).json()["id"])
    job = run_inline(job)
    assert job.status == "done", job.error
    rows = _result_rows(ds_client, job)
    assert [r["note"] for r in rows] == frame["note"].tolist()
    assert [int(r["prediction"]) for r in rows] == files.logistic_regression().predict(_frame(60)).tolist()


def test_bad_rows_go_to_the_errors_file_and_the_share_decides(ds_client: Client, settings: Any) -> None:
    settings.PORTAL_BATCH_CHUNK_BYTES = 8 * 1024
    frame = _frame(200).astype(object)
    frame.iloc[5, 0] = "n/a"
    frame.iloc[150, 3] = ""
    data = frame.to_csv(index=False).encode()
    job = run_inline(BatchJob.objects.get(uid=_submit(ds_client, data, max_error_share="0.05").json()["id"]))
    assert job.status == "done" and job.rows_failed == 2
    rows = _result_rows(ds_client, job)
    assert len(rows) == 200 and rows[5]["prediction"] == "" and rows[150]["prediction"] == ""
    errors = ds_client.get(f"/api/v1/batch-jobs/{job.uid}/errors")
    table = list(csv.reader(io.StringIO(b"".join(errors.streaming_content).decode())))
    assert table[0] == ["row", "column", "reason"]
    assert table[1] == ["6", frame.columns[0], "'n/a' is not a number"]
    assert table[2] == ["151", frame.columns[3], "missing value"]
    # The same file with a stricter share fails, and says why, with the errors file to look at.
    strict = run_inline(BatchJob.objects.get(uid=_submit(ds_client, data, max_error_share="0.001").json()["id"]))
    assert strict.status == "failed" and "2 of 200 rows" in strict.error and strict.errors_blob is not None
    assert strict.result_blob is None


REFUSED = [
    (b"", "empty.csv", "file is empty"),
    (b"mean radius,mean texture\n", "header.csv", "header but no rows"),
    (b"customer,age\nc1,3\n", "x.csv", "lacks the model's input column 'mean radius' and 29 more"),
    (b"PAR1garbage", "x.parquet", "not a complete Parquet file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "x.csv", "neither CSV (text) nor Parquet"),
    (b"\xef\xbb\xbfa,b\n1,2\n", "bom.csv", "byte-order mark"),
]


def test_files_that_cannot_be_scored_are_refused_at_submission(ds_client: Client) -> None:
    for data, name, message in REFUSED:
        response = _submit(ds_client, data, name)
        body = assert_error_shape(response, 400, "invalid")
        assert message in body["error"]["message"], (name, body)
    assert not BatchJob.objects.exists()


def test_submission_checks_the_environment_columns_and_share(ds_client: Client) -> None:
    data = _csv_bytes(_frame(5))
    assert "Nothing serves churn in stage" in _submit(ds_client, data, env="stage").json()["error"]["message"]
    assert "'nope' is not in the file" in _submit(ds_client, data, id_column="nope").json()["error"]["message"]
    assert _submit(ds_client, data, max_error_share="2").status_code == 400
    assert ds_client.post("/api/v1/batch-jobs/", {"model": "churn", "env": "dev"}).status_code == 400


def test_parquet_with_many_row_groups_and_one_big_one(ds_client: Client, settings: Any, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    settings.PORTAL_BATCH_CHUNK_ROWS = 100
    frame = _frame()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    expected = files.logistic_regression().predict(frame).tolist()
    for row_group_size in (50, 10_000):  # many small groups; one group re-cut by the planner
        path = tmp_path / f"in-{row_group_size}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        job = run_inline(BatchJob.objects.get(uid=_submit(ds_client, path.read_bytes(), "in.parquet").json()["id"]))
        assert job.status == "done", job.error
        assert job.chunks_total == 6
        response = ds_client.get(f"/api/v1/batch-jobs/{job.uid}/result")
        result = pq.read_table(io.BytesIO(b"".join(response.streaming_content)))
        assert result.column("prediction").to_pylist() == expected
        assert result.column("mean radius").to_pylist() == frame["mean radius"].tolist()
        assert response["Content-Disposition"].endswith('in-scored.parquet"')


def test_a_chunk_run_twice_counts_once_and_a_cancelled_job_stops(ds_client: Client, settings: Any) -> None:
    settings.PORTAL_BATCH_CHUNK_BYTES = 16 * 1024
    job = BatchJob.objects.get(uid=_submit(ds_client, _csv_bytes(_frame())).json()["id"])
    batch.batch_plan(job_id=job.pk)
    first, second, *_rest = BatchChunk.objects.filter(job=job).order_by("index")
    assert batch.batch_chunk_run(chunk_id=first.pk) == "done"
    assert batch.batch_chunk_run(chunk_id=first.pk) == "done"  # a redelivered message finds it done
    job.refresh_from_db()
    assert job.chunks_done == 1 and job.rows_done == first.rows_planned
    # A chunk whose worker died twice fails the job with the reason; it is never left running.
    BatchChunk.objects.filter(pk=second.pk).update(status="running", attempts=2)
    batch.batch_chunk_run(chunk_id=second.pk)
    job.refresh_from_db()
    assert job.status == "failed" and "started 2 times" in job.error

    job2 = BatchJob.objects.get(uid=_submit(ds_client, _csv_bytes(_frame())).json()["id"])
    batch.batch_plan(job_id=job2.pk)
    response = ds_client.post(f"/api/v1/batch-jobs/{job2.uid}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    for chunk in BatchChunk.objects.filter(job=job2):
        assert batch.batch_chunk_run(chunk_id=chunk.pk) == "pending"  # nothing is scored after a cancel
    assert ds_client.post(f"/api/v1/batch-jobs/{job2.uid}/cancel").status_code == 400
    assert AuditEvent.objects.filter(action="batch.cancel", target_id=str(job2.uid)).count() == 1


def test_roles_and_teams(serving: Client, personas: dict[str, Any], api_as: Any) -> None:
    data = _csv_bytes(_frame(20))
    ds = api_as(personas["ds"])
    upload = io.BytesIO(data)
    upload.name = "in.csv"
    response = ds.post("/api/v1/batch-jobs/", {"model": "churn", "env": "dev", "file": upload}, format="multipart")
    assert response.status_code == 202
    uid = response.json()["id"]
    for role in ("viewer", "approver1", "compliance"):
        client = api_as(personas[role])
        upload = io.BytesIO(data)
        upload.name = "in.csv"
        assert client.post("/api/v1/batch-jobs/", {"model": "churn", "env": "dev", "file": upload},
                           format="multipart").status_code == 403
        assert client.get(f"/api/v1/batch-jobs/{uid}/").status_code == 200  # they see their team's jobs
        assert client.post(f"/api/v1/batch-jobs/{uid}/cancel").status_code == 403
        assert client.get(f"/api/v1/batch-jobs/{uid}/result").status_code == 403
        assert client.get(f"/api/v1/batch-jobs/{uid}/errors").status_code == 403
    outsider = api_as(personas["outsider"])
    assert outsider.get(f"/api/v1/batch-jobs/{uid}/").status_code == 404
    assert outsider.post(f"/api/v1/batch-jobs/{uid}/cancel").status_code == 404
    assert outsider.get(f"/api/v1/batch-jobs/{uid}/result").status_code == 404
    assert outsider.get(f"/api/v1/batch-jobs/{uid}/errors").status_code == 404
    assert uid not in str(outsider.get("/api/v1/batch-jobs/").json())
    upload = io.BytesIO(data)
    upload.name = "in.csv"
    assert outsider.post("/api/v1/batch-jobs/", {"model": "churn", "env": "dev", "file": upload},
                         format="multipart").status_code == 404
    anonymous = api_as(None)
    assert anonymous.get(f"/api/v1/batch-jobs/{uid}/").status_code == 401
    assert anonymous.get("/api/v1/batch-jobs/").status_code == 401
    assert anonymous.get(f"/api/v1/batch-jobs/{uid}/result").status_code == 401
    # The result is there only once the job is done.
    assert assert_error_shape(ds.get(f"/api/v1/batch-jobs/{uid}/result"), 400)


def test_schedules_are_audited_beat_rows_and_a_run_scores_the_newest_file(
        serving: Client, personas: dict[str, Any], api_as: Any, settings: Any) -> None:
    from django.core.files.base import ContentFile
    from django_celery_beat.models import PeriodicTask

    from registry import storage

    ds = api_as(personas["ds"])
    bad = ds.post("/api/v1/models/churn/batch-schedules/", {"name": "n", "env": "dev", "location": "../x/",
                                                             "cron": "0 2 * * *"}, format="json")
    assert "inside the team's batch inbox" in assert_error_shape(bad, 400)["error"]["message"]
    bad = ds.post("/api/v1/models/churn/batch-schedules/", {"name": "n", "env": "dev", "location": "nightly/",
                                                             "cron": "0 25 * * *"}, format="json")
    assert "not a valid schedule" in assert_error_shape(bad, 400)["error"]["message"]
    assert api_as(personas["viewer"]).post("/api/v1/models/churn/batch-schedules/", {
        "name": "n", "env": "dev", "location": "nightly/", "cron": "0 2 * * *"}, format="json").status_code == 403
    response = ds.post("/api/v1/models/churn/batch-schedules/", {"name": "nightly", "env": "dev",
                                                                  "location": "nightly/", "cron": "0 2 * * *"},
                       format="json")
    assert response.status_code == 201, response.content
    schedule = BatchSchedule.objects.get(pk=response.json()["id"])
    task = PeriodicTask.objects.get(pk=schedule.periodic_task_id)
    # Who may see and change it: the team (viewers read only), nobody outside it.
    path = f"/api/v1/batch-schedules/{schedule.pk}/"
    viewer, outsider = api_as(personas["viewer"]), api_as(personas["outsider"])
    assert viewer.get(path).status_code == 200
    assert viewer.patch(path, {"enabled": False}, format="json").status_code == 403
    assert viewer.delete(path).status_code == 403
    for call in (outsider.get(path), outsider.patch(path, {"enabled": False}, format="json"), outsider.delete(path),
                 outsider.get("/api/v1/models/churn/batch-schedules/")):
        assert call.status_code == 404
    assert api_as(None).get(path).status_code == 401
    assert ds.patch(path, {"name": "renamed"}, format="json").status_code == 400
    assert ds.patch(path, {"cron": "nonsense"}, format="json").status_code == 400
    assert task.task == "registry.tasks.batch_schedule_fire" and task.args == f"[{schedule.pk}]"
    assert (task.crontab.minute, task.crontab.hour) == ("0", "2") and task.enabled
    # Nothing in the folder yet: the run says so and makes no job.
    assert batch.batch_schedule_fire(schedule_id=schedule.pk) is None
    schedule.refresh_from_db()
    assert "no CSV or Parquet file" in schedule.last_error
    store = storage.artifact_storage()
    store.save("batch-inbox/acme/nightly/old.csv", ContentFile(_csv_bytes(_frame(3))))
    newest = store.save("batch-inbox/acme/nightly/new.csv", ContentFile(_csv_bytes(_frame(7))))
    import os
    import time

    os.utime(store.path(newest), (time.time() + 5, time.time() + 5))
    job = batch.batch_schedule_fire(schedule_id=schedule.pk)
    assert job is not None and job.schedule == schedule and job.input_filename == "new.csv"
    assert run_inline(job).rows_total == 7
    changed = ds.patch(f"/api/v1/batch-schedules/{schedule.pk}/", {"enabled": False, "cron": "30 3 * * 1"},
                       format="json")
    assert changed.status_code == 200 and changed.json()["enabled"] is False
    task.refresh_from_db()
    assert not task.enabled and task.crontab.minute == "30"
    assert batch.batch_schedule_fire(schedule_id=schedule.pk) is None  # disabled: no run
    assert ds.delete(f"/api/v1/batch-schedules/{schedule.pk}/").status_code == 204
    assert not PeriodicTask.objects.filter(pk=task.pk).exists()
    actions = list(AuditEvent.objects.filter(target_type="batchschedule").order_by("seq").values_list("action",
                                                                                                     flat=True))
    assert actions == ["batch_schedule.create", "batch_schedule.change", "batch_schedule.delete"]
    store.delete("batch-inbox/acme/nightly/old.csv")
    store.delete(newest)


def test_the_csv_planner_cuts_on_row_boundaries_only() -> None:
    from registry import tabular as batch_io

    rows = [f'{i},"a\nb ""{i}""",{i * 2}' for i in range(500)]
    data = ("id,text,value\n" + "\n".join(rows) + "\n").encode()
    plan = batch_io.plan_csv(io.BytesIO(data), 300)
    assert plan.rows == 500 and len(plan.chunks) > 10
    pieces = [data[c.start:c.end] for c in plan.chunks]
    assert b"".join(pieces) == data[plan.header_end:]
    for piece in pieces:
        assert next(iter(csv.reader(io.StringIO(piece.decode()))))[0].isdigit()
    with pytest.raises(batch_io.BatchInputError, match="never closed"):
        batch_io.plan_csv(io.BytesIO(b'a,b\n1,"open\n'), 300)
    no_newline = batch_io.plan_csv(io.BytesIO(b"a,b\n1,2\n3,4"), 1 << 20)
    assert no_newline.rows == 2
    assert np.isclose(sum(c.rows for c in plan.chunks), 500)


def test_the_csv_planner_counts_every_row_whatever_blocks_it_is_fed_in() -> None:
    """The unquoted fast path counts rows with numpy: each chunk's count is its lines (a last line without its
    newline counted too), for blocks cut anywhere, chunk sizes from one byte up, and blank lines."""
    from registry import tabular as batch_io

    rng = np.random.default_rng(7)
    for trial in range(60):
        lines = [",".join(f"{v:.{rng.integers(1, 17)}g}" for v in rng.normal(size=3)) if rng.random() > 0.05 else ""
                 for _ in range(int(rng.integers(1, 400)))]
        data = ("a,b,c\n" + "\n".join(lines) + ("\n" if trial % 2 else "")).encode()
        if not data[6:].strip():
            continue
        planner = batch_io.CsvPlanner(int(rng.integers(1, 2000)))
        at = 0
        while at < len(data):
            step = int(rng.integers(1, 700))
            planner.feed(data[at:at + step])
            at += step
        plan = planner.finish()
        pieces = [data[c.start:c.end] for c in plan.chunks]
        assert b"".join(pieces) == data[plan.header_end:]
        assert all(p.endswith(b"\n") for p in pieces[:-1])
        assert [c.rows for c in plan.chunks] == [p.count(b"\n") + (0 if p.endswith(b"\n") else 1) for p in pieces]


def test_pages_per_role(ds_client: Client, personas: dict[str, Any], settings: Any) -> None:
    settings.PORTAL_BATCH_CHUNK_BYTES = 16 * 1024
    job = run_inline(BatchJob.objects.get(uid=_submit(ds_client, _csv_bytes(_frame())).json()["id"]))
    page = ds_client.get("/models/churn/batch/")
    assert page.status_code == 200
    assert b'id="batch-form"' in page.content and str(job.uid).encode() in page.content
    detail = ds_client.get(f"/batch/{job.uid}/")
    assert detail.status_code == 200 and b"Download the scored file" in detail.content
    viewer = Client()
    viewer.force_login(personas["viewer"])
    assert b'id="batch-form"' not in viewer.get("/models/churn/batch/").content
    assert viewer.get(f"/batch/{job.uid}/").status_code == 200
    assert viewer.post(f"/batch/{job.uid}/cancel").status_code == 403
    assert viewer.post("/models/churn/batch/schedules", {"name": "x"}).status_code == 403
    outsider = Client()
    outsider.force_login(personas["outsider"])
    assert outsider.get(f"/batch/{job.uid}/").status_code == 404
    assert outsider.get("/models/churn/batch/").status_code == 404
    assert Client().get(f"/batch/{job.uid}/").status_code == 302  # to the sign-in page
    # Schedules from the page: a bad cron is a message, not a 500; a good one shows up and can be paused.
    response = ds_client.post("/models/churn/batch/schedules", {"name": "n", "environment": "dev",
                                                                "location": "in/", "cron": "61 * * * *"}, follow=True)
    assert b"not a valid schedule" in response.content
    ds_client.post("/models/churn/batch/schedules", {"name": "n", "environment": "dev", "location": "in/",
                                                     "cron": "5 * * * *"})
    schedule = BatchSchedule.objects.get(name="n")
    assert viewer.post(f"/batch-schedules/{schedule.pk}/toggle").status_code == 403
    assert outsider.post(f"/batch-schedules/{schedule.pk}/delete").status_code == 404
    ds_client.post(f"/batch-schedules/{schedule.pk}/toggle")
    schedule.refresh_from_db()
    assert not schedule.enabled
    # Cancelling a finished job from its page says why not.
    response = ds_client.post(f"/batch/{job.uid}/cancel", follow=True)
    assert b"already done" in response.content


def test_the_errors_file_neutralises_cells_a_spreadsheet_would_run() -> None:
    """OWASP's CSV injection rule for the errors file: its reasons quote the uploaded cells."""
    from registry.tabular import errors_csv

    rows = [(1, "=HYPERLINK(\"http://evil.example\")", "@SUM(1+1)"), (2, "age", "+1 is odd"), (3, "x", "-1"),
            (4, "y", "\tTAB"), (5, "z", "\rCR"), (6, "w", "'n/a' is not a number")]
    table = list(csv.reader(io.StringIO(errors_csv(rows).decode(), newline="")))
    assert table == [["1", "'=HYPERLINK(\"http://evil.example\")", "'@SUM(1+1)"], ["2", "age", "'+1 is odd"],
                     ["3", "x", "'-1"], ["4", "y", "'\tTAB"], ["5", "z", "'\rCR"], ["6", "w", "'n/a' is not a number"]]
