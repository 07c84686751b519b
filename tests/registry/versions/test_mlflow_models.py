"""MLflow models logged the way MLflow's documentation shows, uploaded, checked, deployed and scored for real.

A model that cannot be served as an in-process ONNX graph (here: a Pipeline over string and numeric columns) is
answered whole by MLflow's own scoring code inside its sandboxed model host, so the answers, the status codes and
the error codes are MLflow's.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from portal import services as portal_services
from portal.models import Team
from registry.versions import services
from registry.versions.localfiles import LocalUpload
from tests.conftest import EntryPointClient, needs_sandbox
from tests.registry.conftest import deploy_now
from tests.registry.files import docs_idiom_pipeline as _docs_idiom_pipeline

pytestmark = [pytest.mark.django_db,
              needs_sandbox()]
URL = "/api/v1/serve/plans/dev/invocations"


@pytest.fixture
def plans(personas: dict[str, Any], tmp_path: Path) -> tuple[EntryPointClient, Any, Any]:
    archive, pipe, X = _docs_idiom_pipeline(tmp_path)
    model = services.model_register(name="plans", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    version = services.version_upload(model=model, upload=LocalUpload(archive, archive.name), reference=None,
                                      meta=services.UploadMetadata(), actor=personas["ds"])
    version = services.version_scan(version_id=version.pk)
    assert version.status == "ready", version.status_detail
    deployment = deploy_now(version, personas["ds"])
    assert deployment.serving_kind == "mlflow"
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="serve", actor=personas["ds"])
    return EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}"), pipe, X


def test_a_pipeline_over_strings_and_numbers_serves_the_models_own_answers(plans: Any) -> None:
    client, pipe, X = plans
    rows = X.head(5)
    expected = pipe.predict(rows).tolist()
    records = json.loads(rows.to_json(orient="records"))
    split = {"columns": list(rows.columns), "data": json.loads(rows.to_json(orient="values", double_precision=15))}
    for body in ({"dataframe_split": split}, {"dataframe_records": records}, {"instances": records},
                 {"dataframe_split": split, "subject_ids": ["a", "b", "c", "d", "e"]}):
        response = client.post(URL, json.dumps(body), content_type="application/json")
        assert response.status_code == 200, response.content
        answer = response.json()
        assert answer["predictions"] == expected and answer["model_version"] == 1
        assert len(answer["prediction_ids"]) == 5
    csv = rows.to_csv(index=False)
    response = client.post(URL, csv, content_type="text/csv")
    assert response.status_code == 200 and response.json()["predictions"] == expected


def test_mlflows_errors_keep_their_status_and_error_code(plans: Any) -> None:
    client, _pipe, _X = plans
    response = client.post(URL, json.dumps({"dataframe_split": {"columns": ["plan"], "data": [["gold"]]}}),
                           content_type="application/json")
    assert response.status_code == 400
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "age" in body["message"]
    assert body["error"]["code"] == "invalid_input" and body["error"]["message"] == body["message"]
    response = client.post(URL, b"<xml/>", content_type="application/xml")
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    response = client.post(URL, json.dumps({"dataframe_split": {"columns": ["plan"], "data": [["gold"]]},
                                            "subject_ids": "nope"}), content_type="application/json")
    assert response.status_code == 400 and "subject_ids" in response.json()["error"]["message"]


def test_what_was_asked_is_logged_in_the_signatures_order(plans: Any) -> None:
    from monitoring.flush import flush_predictions
    from monitoring.models import PredictionLog

    client, pipe, X = plans
    rows = X.head(2)[["spend", "plan", "age"]]  # another order than the signature's
    body = {"dataframe_split": {"columns": list(rows.columns), "data": json.loads(rows.to_json(orient="values", double_precision=15))}}
    response = client.post(URL, json.dumps(body), content_type="application/json")
    assert response.status_code == 200, response.content
    ids = response.json()["prediction_ids"]
    flush_predictions()
    logged = {p.id: p for p in PredictionLog.objects.filter(id__in=ids)}
    first = logged[ids[0]]
    assert first.inputs == [X.iloc[0]["plan"], int(X.iloc[0]["age"]), float(X.iloc[0]["spend"])]
    assert first.output == pipe.predict(X.head(1)).tolist()[0]


MODEL_CODE = '''
import mlflow
from mlflow.pyfunc import PythonModel


class Scaled(PythonModel):
    def predict(self, context, model_input, params=None):
        factor = (params or {}).get("factor", 2)
        if factor == 0:
            raise ZeroDivisionError("factor zero is not allowed here")
        return model_input["x"] * factor


mlflow.models.set_model(Scaled())
'''


def test_a_custom_pyfunc_waits_for_an_approvers_trust_then_serves_with_its_params(
        personas: dict[str, Any], tmp_path: Path) -> None:
    import mlflow.pyfunc
    import pandas as pd
    from django.core.exceptions import PermissionDenied
    from mlflow.models import infer_signature

    code = tmp_path / "scaled_model.py"
    code.write_text(MODEL_CODE)
    X = pd.DataFrame({"x": [1.0, 2.0, 3.0]})
    folder = tmp_path / "model"
    mlflow.pyfunc.save_model(str(folder), python_model=str(code), input_example=(X, {"factor": 2}),
                             signature=infer_signature(X, X["x"] * 2, params={"factor": 2}))
    archive = tmp_path / "scaled.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.rglob("*"):
            zf.write(path, Path("model") / path.relative_to(folder))
    model = services.model_register(name="plans", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    version = services.version_upload(model=model, upload=LocalUpload(archive, archive.name), reference=None,
                                      meta=services.UploadMetadata(), actor=personas["ds"])
    assert version.trust_state == "pending" and version.status == "scanning"
    assert any("runs its model code (scaled_model.py)" in t for t in version.untrusted_types), version.untrusted_types
    assert any(f["code"] == "carries_code" for f in version.scan_findings)
    with pytest.raises(PermissionDenied):  # four eyes: not the uploader
        services.version_trust_decide(version=version, trust=True, reason="I wrote it, trust me", actor=personas["ds"])
    version = services.version_trust_decide(version=version, trust=True, reason="Reviewed scaled_model.py: arithmetic only",
                                            remember_for_team=True, actor=personas["approver1"])
    version = services.version_scan(version_id=version.pk)
    assert version.status == "ready", version.status_detail
    deployment = deploy_now(version, personas["ds"])
    assert deployment.serving_kind == "mlflow"
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="serve", actor=personas["ds"])
    client = EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    body = {"dataframe_split": {"columns": ["x"], "data": [[1.5], [4.0]]}}
    response = client.post(URL, json.dumps(body), content_type="application/json")
    # MLflow answers a column-based output signature as records, and so does the portal.
    assert response.status_code == 200 and response.json()["predictions"] == [{"x": 3.0}, {"x": 8.0}], response.content
    response = client.post(URL, json.dumps({**body, "params": {"factor": 10}}), content_type="application/json")
    assert response.status_code == 200 and response.json()["predictions"] == [{"x": 15.0}, {"x": 40.0}], response.content
    response = client.post(URL, json.dumps({**body, "params": {"factor": "ten"}}), content_type="application/json")
    assert response.status_code == 400 and response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    # The model itself raising: MLflow's 400 BAD_REQUEST, and the prediction log counts the failure.
    from monitoring.flush import flush_predictions
    from monitoring.models import PredictionLog

    response = client.post(URL, json.dumps({**body, "params": {"factor": 0}}), content_type="application/json")
    assert response.status_code == 400 and response.json()["error_code"] == "BAD_REQUEST", response.content
    assert "factor zero" not in response.json()["message"]  # the model's own text stays out of the answer
    flush_predictions()
    failed = PredictionLog.objects.filter(model_name="plans").exclude(error="")
    assert failed.count() == 2 and all("factor zero is not allowed" in p.error for p in failed)
    # A standing team decision never covers code: the next upload of the same code waits again.
    again = services.version_upload(model=model, upload=LocalUpload(archive, archive.name), reference=None,
                                    meta=services.UploadMetadata(), actor=personas["ds"])
    assert again.trust_state == "pending"


def test_a_flavor_whose_library_is_missing_is_refused_naming_it(personas: dict[str, Any], tmp_path: Path) -> None:
    from registry.scanning.findings import UploadRejected

    archive = tmp_path / "torch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("model/MLmodel", "flavors:\n  python_function:\n    loader_module: mlflow.pytorch\n"
                                     "    data: data\n  pytorch:\n    model_data: data\n")
        zf.writestr("model/data/model.pth", b"\x80\x04N.")
    model = services.model_register(name="plans", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    with pytest.raises(UploadRejected) as rejected:
        services.version_upload(model=model, upload=LocalUpload(archive, archive.name), reference=None,
                                meta=services.UploadMetadata(), actor=personas["ds"])
    assert [f.code for f in rejected.value.findings] == ["flavor_not_installed"]
    assert "torch" in rejected.value.findings[0].message
    assert not model.versions.exists()


def test_a_batch_scores_a_string_column_and_parquet_categoricals_as_mlflow_does(
        plans: Any, personas: dict[str, Any], settings: Any) -> None:
    """Batch scoring of a model MLflow's code answers: a CSV with a string column (a value MLflow refuses goes to
    the errors file, the other rows of its chunk are scored) and a Parquet file whose string column is a pandas
    categorical, both with the pipeline's own predictions; the prediction log keeps the strings."""
    import csv
    import io

    from django.test import Client

    from monitoring.models import PredictionLog
    from registry.batch import services as batch
    from registry.models import BatchJob
    from tests.registry.batch.test_batch import run_inline

    _client, pipe, X = plans
    web = Client()
    web.force_login(personas["ds"])
    settings.PORTAL_BATCH_CHUNK_BYTES = 2 * 1024  # a few chunks
    rows = X.head(90).reset_index(drop=True)
    expected = pipe.predict(rows).tolist()
    frame = rows.astype({"age": object})
    frame.insert(0, "customer", [f"c{i:03d}" for i in range(len(frame))])
    frame.loc[7, "age"] = "unknown"  # MLflow cannot read it as the signature's long

    def submit(data: bytes, name: str) -> BatchJob:
        upload = io.BytesIO(data)
        upload.name = name
        response = web.post("/api/v1/batch-jobs/", {"model": "plans", "env": "dev", "file": upload,
                                                     "id_column": "customer", "max_error_share": "0.05"})
        assert response.status_code == 202, response.content
        return run_inline(BatchJob.objects.get(uid=response.json()["id"]))

    def result(job: BatchJob, kind: str = "result") -> list[list[str]]:
        response = web.get(f"/api/v1/batch-jobs/{job.uid}/{kind}")
        assert response.status_code == 200, response.content[:300]
        return list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))

    job = submit(frame.to_csv(index=False).encode(), "plans.csv")
    assert job.status == "done" and job.chunks_total > 1 and job.rows_failed == 1, job.error
    table = result(job)
    at = table[0].index("prediction")
    assert [r[0] for r in table[1:]] == list(frame.customer)
    assert table[8][at] == "" and [int(r[at]) for i, r in enumerate(table[1:]) if i != 7] == \
        [p for i, p in enumerate(expected) if i != 7]
    errors = result(job, "errors")
    assert errors[1][0] == "8" and "MLflow refused the row" in errors[1][2], errors
    for chunk in job.chunks.all():
        batch.batch_log_chunk(chunk_id=chunk.pk)
    logged = PredictionLog.objects.get(id=table[1][at + 1])
    assert logged.inputs == [rows.plan[0], int(rows.age[0]), float(rows.spend[0])] and logged.output == expected[0]

    parquet = rows.assign(plan=rows.plan.astype("category"), customer=[f"p{i:03d}" for i in range(len(rows))])
    buffer = io.BytesIO()
    parquet.to_parquet(buffer, row_group_size=40)
    job = submit(buffer.getvalue(), "plans.parquet")
    assert job.status == "done" and job.rows_failed == 0, job.error
    import pyarrow.parquet as pq

    response = web.get(f"/api/v1/batch-jobs/{job.uid}/result")
    assert response.status_code == 200
    scored = pq.read_table(io.BytesIO(b"".join(response.streaming_content)))
    assert scored.column("prediction").to_pylist() == expected
    assert scored.column("customer").to_pylist() == list(parquet.customer)
