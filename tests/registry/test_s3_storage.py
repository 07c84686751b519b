"""Artifacts, reference data, batch inputs, chunks and results on an S3-compatible store: moto's server, started by
these tests as its own process on a free port and spoken to over HTTP by django-storages and boto3, in the test
process and in real Celery worker processes alike."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client

from registry import storage
from registry.models import Blob, ModelVersion
from tests.conftest import assert_error_shape, free_port, wait_for
from tests.registry.conftest import deploy_now
from tests.registry.batch.test_batch_workers import WORKER_ENV, _big_csv, _finished, _result, _submit

pytestmark = pytest.mark.django_db
BUCKET = "portal-artifacts"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "portal-test", "AWS_SECRET_ACCESS_KEY": "portal-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def listening() -> bool:
        if proc.poll() is not None:
            pytest.fail("moto's S3 server did not start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    try:
        wait_for(listening, timeout=10, interval=0.05, what="moto's S3 server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def bucket(s3_endpoint: str) -> Any:
    import boto3

    s3 = boto3.resource("s3", endpoint_url=s3_endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    found = s3.Bucket(BUCKET)
    if found.creation_date is None:
        found.create()
    found.objects.all().delete()
    return found


def s3_env(endpoint: str) -> dict[str, str]:
    """What a worker process needs to use the same bucket (the settings read these at start-up)."""
    return {"PORTAL_ARTIFACT_STORAGE": "s3", "PORTAL_S3_BUCKET": BUCKET, "PORTAL_S3_ENDPOINT_URL": endpoint,
            "PORTAL_S3_REGION": "us-east-1", "PORTAL_S3_ACCESS_KEY_ID": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "PORTAL_S3_SECRET_ACCESS_KEY": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}


@pytest.fixture(autouse=True)
def artifacts_on_s3(settings: Any, bucket: Any, s3_endpoint: str) -> None:
    """This process stores artifacts in the bucket, through the same settings the environment variables make."""
    settings.STORAGES = {**settings.STORAGES, "artifacts": {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {"bucket_name": BUCKET, "endpoint_url": s3_endpoint, "region_name": "us-east-1",
                    "access_key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                    "file_overwrite": False, "default_acl": None, "querystring_auth": True}}}


def _keys(bucket: Any) -> set[str]:
    return {o.key for o in bucket.objects.all()}


def test_the_settings_build_the_same_s3_storage_from_the_environment(tmp_path: Any, s3_endpoint: str) -> None:
    from tests.conftest import clean_env

    script = ("import django; django.setup()\nfrom registry.storage import artifact_storage\n"
              "s = artifact_storage()\nprint(type(s).__name__, s.bucket_name, s.endpoint_url, s.file_overwrite)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=clean_env(DJANGO_SETTINGS_MODULE="tests.settings", PORTAL_VAR_DIR=str(tmp_path),
                                          **s3_env(s3_endpoint)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["S3Storage", BUCKET, s3_endpoint, "False"]


def test_uploaded_versions_live_in_the_bucket_and_are_verified_on_the_way_out(
        two_versions: list[ModelVersion], bucket: Any, api_as: Any, personas: dict[str, Any]) -> None:
    version = two_versions[0]
    keys = _keys(bucket)
    for blob in (version.artifact, version.reference.blob):
        assert storage.storage_name(blob.sha256) in keys
    # (The bucket is emptied before each test, so these keys were written now; the local artifact folder may hold the
    # same bytes from other tests, which store the same model content-addressed on disk.)
    assert type(storage.artifact_storage()).__name__ == "S3Storage"

    # A download streams the stored bytes, which hash to the version's SHA-256.
    response = api_as(personas["ds"]).get("/api/v1/models/churn/versions/1/artifact")
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    assert hashlib.sha256(body).hexdigest() == version.artifact_sha256

    # The sandbox check and a deployment read it back from the bucket and check the hash on the way.
    deployment = deploy_now(version, personas["ds"])
    assert deployment.status == "live"

    # Bytes changed behind the portal's back are caught before anyone uses them.
    bucket.put_object(Key=storage.storage_name(version.artifact.sha256), Body=body + b"tampered")
    with pytest.raises(storage.IntegrityError), storage.verified_local_path(version.artifact):
        pass
    refused = api_as(personas["ds"]).get("/api/v1/models/churn/versions/1/artifact")
    assert_error_shape(refused, 500)
    assert refused.json()["error"]["code"] == "integrity_error"


def test_range_reads_and_work_files_on_the_bucket(bucket: Any) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    sha = hashlib.sha256(data).hexdigest()
    import io

    blob = storage.blob_put(io.BytesIO(data), sha256=sha, size=len(data))
    assert Blob.objects.filter(sha256=sha).exists() and storage.storage_name(sha) in _keys(bucket)
    start, end = 1024 * 1024 - 5, 2 * 1024 * 1024 + 9
    assert storage.read_range(blob.storage_name, start, end) == data[start:end]
    assert storage.blob_put(io.BytesIO(data), sha256=sha, size=len(data)).pk == blob.pk, "stored once"
    name = storage.put_work_file("work/job-1/part-0", b"first")
    assert storage.put_work_file("work/job-1/part-0", b"second") == name, "replaced, not renamed"
    assert storage.read_work_file(name) == b"second"
    storage.put_work_file("work/job-1/part-1", b"x")
    assert storage.delete_work_files("work/job-1/", keep={name}) == 1
    assert {k for k in _keys(bucket) if k.startswith("work/")} == {name}


@pytest.mark.slow
def test_a_batch_job_on_s3_with_a_real_worker(worker_factory: Any, ds_client: Client, bucket: Any,
                                              s3_endpoint: str) -> None:
    worker_factory(**WORKER_ENV, **s3_env(s3_endpoint))
    data, frame = _big_csv(25)
    job = _finished(_submit(ds_client, data))
    assert job.status == "done", job.error
    assert job.chunks_total >= 3 and job.rows_total == len(frame)
    keys = _keys(bucket)
    assert storage.storage_name(job.input_blob.sha256) in keys and storage.storage_name(job.result_blob.sha256) in keys
    rows = _result(ds_client, job)
    assert [r["customer"] for r in rows] == frame["customer"].tolist()
    # Scored parts stay until the prediction log has read them, then leave the bucket.
    from registry.batch.services import work_prefix
    from registry.models import BatchJob

    wait_for(lambda: BatchJob.objects.get(pk=job.pk).rows_logged == len(frame), timeout=180,
             what="the prediction log to take every row")
    wait_for(lambda: not [k for k in _keys(bucket) if k.startswith(work_prefix(job))], timeout=60,
             what="the job's work files to leave the bucket")
