"""An MLflow model that leaves the fast path (gradient-boosted trees: no probes prove an ONNX form of them) is served
by MLflow's scoring code in its sandboxed host; numeric ``dataframe_split`` requests and numeric batch chunks go to
that host as one float64 frame instead, answered by the estimator as MLflow's server would
(``child._FrameScorer``). The judge is MLflow's own code in the same host: the same rows sent as
``dataframe_records`` (which the frame path never takes) must get the same answers, and so must batch files.
Everything real: the upload, trust, the sandboxed scan, the deployment, the host, the production entry point."""

from __future__ import annotations

import io
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from django.test import Client

from portal import services as portal_services
from portal.models import Team
from registry.models import BatchJob, ModelVersion
from registry.sandbox import hosts
from registry.versions import services
from registry.versions.localfiles import LocalUpload
from tests.conftest import EntryPointClient, needs_sandbox
from tests.registry import files
from tests.registry.batch.test_batch import run_inline
from tests.registry.conftest import deploy_now

pytestmark = [pytest.mark.django_db, needs_sandbox()]
URL = "/api/v1/serve/boosted/dev/invocations"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One archive for the module: the sandbox's checks of the same bytes answer from their first run
    (``tests/sandbox_cache.py``), so each test pays for its own deployment's host only."""
    import mlflow.sklearn
    from sklearn.ensemble import HistGradientBoostingClassifier

    folder = tmp_path_factory.mktemp("boosted")
    X, y = files._data()
    model = HistGradientBoostingClassifier(max_iter=15, random_state=0).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.sklearn.save_model(model, str(folder / "model"), input_example=X.head(3), skops_trusted_types=[
            "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"])
    return Path(shutil.make_archive(str(folder / "boosted"), "zip", root_dir=folder / "model"))


@pytest.fixture
def boosted(personas: dict[str, Any], archive: Path) -> ModelVersion:
    team = Team.objects.get(slug="acme")
    model = services.model_register(name="boosted", team=team, actor=personas["ds"])
    version = services.version_upload(model=model, upload=LocalUpload(archive, archive.name), reference=None,
                                      meta=services.UploadMetadata(), actor=personas["ds"])
    if version.trust_state == "pending":
        version = services.version_trust_decide(version=version, trust=True, actor=personas["approver1"],
                                                reason="scikit-learn's own boosted tree storage")
    version = services.version_scan(version_id=version.pk)
    assert version.status == "ready", version.status_detail
    deployment = deploy_now(version, personas["ds"])
    assert deployment.serving_kind == "mlflow", deployment.log
    return version


@pytest.fixture
def frames(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The rows of every frame the hosts answered (a spy around the real call; nothing is replaced)."""
    answered: list[int] = []
    real = hosts.ModelHost.predict_frame

    def spy(self: hosts.ModelHost, matrix: np.ndarray, *args: Any, **kwargs: Any) -> list[Any]:
        predictions = real(self, matrix, *args, **kwargs)
        answered.append(len(predictions))
        return predictions

    monkeypatch.setattr(hosts.ModelHost, "predict_frame", spy)
    yield answered


@pytest.fixture
def scorer(boosted: ModelVersion, personas: dict[str, Any]) -> Client:
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="frames", actor=personas["ds"])
    return EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}")


def _post(client: Client, payload: dict[str, Any]) -> Any:
    return client.post(URL, data=orjson.dumps(payload), content_type="application/json")


def test_numeric_rows_go_as_a_frame_and_get_mlflows_own_answers(scorer: Client, frames: list[int]) -> None:
    X, _y = files._data()
    rows = X.iloc[::7].head(60)
    split = _post(scorer, {"dataframe_split": {"columns": list(rows.columns), "data": rows.to_numpy().tolist()}})
    assert split.status_code == 200, split.content
    assert frames == [60]
    records = _post(scorer, {"dataframe_records": rows.to_dict(orient="records")})  # MLflow's own parsing
    assert records.status_code == 200, records.content
    assert frames == [60]
    assert split.json()["predictions"] == records.json()["predictions"]
    assert len(set(split.json()["prediction_ids"])) == 60

    # columns in another order, whole numbers in double columns: still MLflow's reading of them
    shuffled = rows[list(reversed(rows.columns))].round(0)
    answer = _post(scorer, {"dataframe_split": {"columns": list(shuffled.columns),
                                                "data": [[int(v) for v in r] for r in shuffled.to_numpy()]}})
    assert answer.status_code == 200 and frames == [60, 60]
    by_mlflow = _post(scorer, {"dataframe_records": shuffled.to_dict(orient="records")})
    assert answer.json()["predictions"] == by_mlflow.json()["predictions"]


def test_requests_the_frame_cannot_be_certain_of_go_to_mlflow(scorer: Client, frames: list[int]) -> None:
    X, _y = files._data()
    columns = list(X.columns)
    for change in ("text", "boolean", "null", "params", "missing column", "records"):
        data = X.head(3).to_numpy().tolist()
        payload: dict[str, Any] = {"dataframe_split": {"columns": columns, "data": data}}
        if change == "text":
            data[1][2] = str(data[1][2])
        elif change == "boolean":
            data[0][0] = True
        elif change == "null":
            data[2][5] = None
        elif change == "params":
            payload["params"] = {"unused": 1}
        elif change == "missing column":
            payload["dataframe_split"] = {"columns": columns[1:], "data": [r[1:] for r in data]}
        else:
            payload = {"dataframe_records": X.head(3).to_dict(orient="records")}
        answer = _post(scorer, payload)
        assert frames == [], change
        assert answer.status_code in (200, 400), (change, answer.content)
        if answer.status_code == 400:
            assert answer.json()["error_code"], answer.content


def test_batch_chunks_go_as_frames_and_match_mlflows_answers(scorer: Client, personas: dict[str, Any],
                                                             frames: list[int], settings: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    settings.PORTAL_BATCH_CHUNK_BYTES = 64 * 1024
    settings.PORTAL_BATCH_CHUNK_ROWS = 200
    X, _y = files._data()
    by_mlflow = _post(scorer, {"dataframe_records": X.to_dict(orient="records")}).json()["predictions"]
    assert frames == []
    client = Client()
    client.force_login(personas["ds"])
    for name, data in (("rows.csv", X.to_csv(index=False).encode()),
                       ("rows.parquet", _parquet(pa.Table.from_pandas(X, preserve_index=False), pq))):
        frames.clear()
        upload = io.BytesIO(data)
        upload.name = name
        response = client.post("/api/v1/batch-jobs/", {"model": "boosted", "env": "dev", "file": upload})
        assert response.status_code == 202, response.content
        job = run_inline(BatchJob.objects.get(uid=response.json()["id"]))
        assert job.status == "done", job.error
        assert sum(frames) == len(X) and len(frames) == job.chunks_total > 1, (frames, job.chunks_total)
        result = client.get(f"/api/v1/batch-jobs/{job.uid}/result")
        body = b"".join(result.streaming_content)
        if name.endswith(".csv"):
            import pandas as pd

            predictions = pd.read_csv(io.BytesIO(body))["prediction"].tolist()
        else:
            predictions = pq.read_table(pa.BufferReader(body)).column("prediction").to_pylist()
        assert predictions == by_mlflow
        stages = [c["stage_seconds"] for c in client.get(f"/api/v1/batch-jobs/{job.uid}/").json()["chunks"]]
        assert all(set(s) == {"read", "parse", "model", "format", "write"} for s in stages), stages


def _parquet(table: Any, pq: Any) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
