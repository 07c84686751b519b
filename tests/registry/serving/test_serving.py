"""Deploying versions and scoring them over MLflow's protocol: formats, errors, canary, shadow, logging, feedback."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from monitoring.flush import flush_predictions
from monitoring.models import Feedback, PredictionLog
from portal import services as portal_services
from portal.audit.verify import verify_chain
from portal.models import AuditEvent, Team
from registry.deployments import services as deployments
from registry.models import Deployment, EnvironmentState, ModelVersion, ServingInterval
from registry.serving import buffer, runtime
from registry.versions import services
from tests.conftest import EntryPointClient, assert_error_shape, free_port
from tests.registry import files
from tests.registry.conftest import deploy_now as _deploy
from tests.registry.conftest import rows as _rows

pytestmark = pytest.mark.django_db
URL = "/api/v1/serve/churn/dev/invocations"


def test_every_mlflow_input_format_gives_the_models_own_predictions(serving: Client) -> None:
    columns, rows = _rows(5)
    expected = files.logistic_regression().predict(files._data()[0].head(5)).tolist()
    bodies = [
        ("application/json", {"dataframe_split": {"columns": columns, "data": rows}}),
        ("application/json", {"dataframe_records": [dict(zip(columns, r, strict=True)) for r in rows]}),
        ("application/json", {"instances": rows}),
        ("application/json", {"inputs": rows}),
        ("application/json", {"instances": [dict(zip(columns, r, strict=True)) for r in rows]}),
        ("application/json", {"dataframe_split": {"columns": columns[::-1], "data": [r[::-1] for r in rows]}}),
    ]
    for content_type, body in bodies:
        response = serving.post(URL, json.dumps(body), content_type=content_type)
        assert response.status_code == 200, response.content
        answer = response.json()
        assert answer["predictions"] == expected and answer["model_version"] == 1
        assert len(set(answer["prediction_ids"])) == 5
    csv = ",".join(f'"{c}"' for c in columns) + "\n" + "\n".join(",".join(map(str, r)) for r in rows)
    response = serving.post(URL, csv, content_type="text/csv")
    assert response.status_code == 200 and response.json()["predictions"] == expected


@pytest.mark.parametrize("body,content_type,status,words", [
    (b"{", "application/json", 400, "not valid JSON"),
    (b"[1, 2]", "application/json", 400, "JSON object"),
    (b'{"instances": [[1, 2]]}', "application/json", 400, "30 values"),
    (b'{"dataframe_split": {"columns": ["a"], "data": [[1]]}}', "application/json", 400, "is missing"),
    (b'{"dataframe_records": [{"x": 1}]}', "application/json", 400, "lacks the input"),
    (b'{"instances": []}', "application/json", 400, "no rows"),
    (b'{"instances": [[1]], "inputs": [[1]]}', "application/json", 400, "exactly one"),
    (b"<xml/>", "application/xml", 415, "Send JSON"),
    (b"a,b\n", "text/csv", 400, "no rows"),
    # No Content-Type: MLflow 3.17's server crashes (500); its rule for a type it does not know is 415.
    (b'{"instances": [[1, 2]]}', "", 415, "Content-Type header"),
])
def test_bad_payloads_get_4xx_json_without_the_schema(serving: Client, body: bytes, content_type: str, status: int,
                                                      words: str) -> None:
    response = serving.post(URL, body, content_type=content_type)
    error = assert_error_shape(response, status)
    assert words in error["error"]["message"]
    assert "mean fractal dimension" not in error["error"]["message"], "the schema is not echoed back"
    # MLflow's error_code and message beside the contract's error object, as MLflow's scoring server answers
    assert error["error_code"] in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE") and error["message"]


def test_the_fast_path_enforces_signatures_and_params_as_mlflow_does() -> None:
    """Rows without column names for a column signature, params against the signature's ParamSchema, and the
    request forms MLflow's server refuses for a tensor signature: the same answers and error codes as MLflow's."""
    from registry.serving import protocol

    unnamed = protocol.parse("application/json", b'{"inputs": [[1, 2]]}')
    with pytest.raises(protocol.InputError) as refused:
        protocol.to_matrix(unnamed, ["a", "b"], named=True)
    assert refused.value.mlflow_code == "INVALID_PARAMETER_VALUE" and "column names" in str(refused.value)
    assert protocol.to_matrix(unnamed, ["f0", "f1"]).tolist() == [[1.0, 2.0]]  # a tensor takes rows as they come
    split = protocol.parse("application/json", b'{"dataframe_split": {"columns": [0, 1], "data": [[1, 2]]}, '
                                               b'"params": {"threshold": 1}}')
    assert protocol.to_matrix(split, ["f0", "f1"], tensor=True).tolist() == [[1.0, 2.0]]
    schema = [{"name": "threshold", "type": "double", "default": 0.5, "shape": None}]
    protocol.check_params(split.params, schema)  # a whole number is a valid double
    protocol.check_params({"no_such_param": "x"}, schema)  # MLflow ignores what the schema does not declare
    for bad in ("0.5", True, [0.5]):
        with pytest.raises(protocol.InputError) as refused:
            protocol.check_params({"threshold": bad}, schema)
        assert refused.value.mlflow_code == "INVALID_PARAMETER_VALUE"
    for body, content_type in ((b"a,b\n1,2\n", "text/csv"), (b'{"inputs": {"a": [1], "b": [2]}}', "application/json"),
                               (b'{"inputs": [{"a": 1, "b": 2}]}', "application/json")):
        with pytest.raises(protocol.InputError):  # MLflow's server refuses these for a tensor signature
            protocol.to_matrix(protocol.parse(content_type, body), ["f0", "f1"], tensor=True)
    text = protocol.parse("application/json", b'{"dataframe_split": {"columns": ["a"], "data": [["abc"]]}}')
    with pytest.raises(protocol.InputError) as refused:
        protocol.to_matrix(text, ["a"], named=True)
    assert refused.value.mlflow_code == "BAD_REQUEST"  # as MLflow: a value it cannot convert


def test_a_non_numeric_value_is_named(serving: Client) -> None:
    columns, rows = _rows(2)
    record = dict(zip(columns, rows[1], strict=True))
    record["mean radius"] = "abc"
    body = {"dataframe_records": [dict(zip(columns, rows[0], strict=True)), record]}
    error = assert_error_shape(serving.post(URL, json.dumps(body), content_type="application/json"), 400)
    assert "Row 1, input 'mean radius'" in error["error"]["message"]
    body = {"dataframe_split": {"columns": columns, "data": [[None] * 30]}}
    assert "not a finite number" in assert_error_shape(serving.post(URL, json.dumps(body),
                                                                    content_type="application/json"), 400)["error"]["message"]


def test_tokens_teams_and_environments_are_checked(serving: Client, personas: dict[str, Any]) -> None:
    body = json.dumps({"instances": _rows(1)[1]})
    assert_error_shape(Client().post(URL, body, content_type="application/json"), 401)
    assert_error_shape(Client(HTTP_AUTHORIZATION="Bearer mlp_wrong").post(URL, body, content_type="application/json"),
                       401)
    _t, outsider = portal_services.token_create(user=personas["outsider"], name="x", actor=personas["outsider"])
    assert_error_shape(Client(HTTP_AUTHORIZATION=f"Bearer {outsider}").post(URL, body,
                                                                           content_type="application/json"), 404)
    assert_error_shape(serving.post("/api/v1/serve/churn/prod/invocations", body, content_type="application/json"),
                       404, "not_deployed")
    assert_error_shape(serving.post("/api/v1/serve/churn/qa/invocations", body, content_type="application/json"), 404)
    assert_error_shape(serving.get(URL), 405)


def test_the_rate_limit_answers_429(serving: Client, settings: Any) -> None:
    settings.PORTAL_SERVE_RATE_LIMIT = 3
    body = json.dumps({"instances": _rows(1)[1]})
    statuses = [serving.post(URL, body, content_type="application/json").status_code for _ in range(8)]
    assert 429 in statuses and statuses[0] == 200


def test_the_scoring_connection_comes_back_after_redis_drops_it(serving: Client) -> None:
    """The scoring path keeps one Redis connection per process: a connection Redis closed (a restart, a timeout,
    CLIENT KILL) is opened again by the next request, whose record still goes to Redis and not to the outbox."""
    from registry.models import PredictionOutbox

    body = json.dumps({"instances": _rows(1)[1]})
    first = serving.post(URL, body, content_type="application/json")
    assert first.status_code == 200
    assert buffer.redis_client().client_kill_filter(_type="normal", skipme=True) >= 1
    second = serving.post(URL, body, content_type="application/json")
    assert second.status_code == 200 and PredictionOutbox.objects.count() == 0
    assert flush_predictions() == 2
    ids = first.json()["prediction_ids"] + second.json()["prediction_ids"]
    assert PredictionLog.objects.filter(pk__in=ids).count() == 2


def test_an_error_reply_leaves_the_scoring_connection_in_step(settings: Any) -> None:
    """Every reply of a pipelined write is read, even after an error reply: the next write reads its own."""
    import redis

    client = buffer.redis_client()
    client.delete("portal:test:list", "portal:test:pushed")
    client.rpush("portal:test:list", "not a counter")
    connection = buffer.ScoringConnection(settings.PORTAL_PREDICTION_BUFFER_URL)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        connection.run(("RPUSH", "portal:test:pushed", "a"), ("INCR", "portal:test:list"),
                       ("EXPIRE", "portal:test:list", 2, "NX"))
    assert connection.run(("RPUSH", "portal:test:pushed", "b"), ("LLEN", "portal:test:pushed")) == [2, 2]
    client.delete("portal:test:list", "portal:test:pushed")


def test_a_record_redis_refuses_goes_to_the_outbox(serving: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error reply (here the buffer's key holds the wrong type; in life an out-of-memory Redis or a read-only
    replica) is handled like an unreachable Redis: the record goes to the database outbox and the answer is given."""
    from registry.models import PredictionOutbox

    monkeypatch.setattr(buffer, "_redis_paused_until", 0.0)
    client = buffer.redis_client()
    for key in buffer.stream_keys():
        client.set(key, "not a stream")
    try:
        response = serving.post(URL, json.dumps({"instances": _rows(1)[1]}), content_type="application/json")
    finally:
        client.delete(*buffer.stream_keys())
    assert response.status_code == 200
    assert [r.payload["ids"] for r in PredictionOutbox.objects.all()] == [response.json()["prediction_ids"]]


def test_every_answered_prediction_is_logged_once_and_feedback_attaches(serving: Client, personas: dict[str, Any],
                                                                        api_as: Any) -> None:
    columns, rows = _rows(4)
    ids = []
    for _ in range(3):
        body = {"dataframe_split": {"columns": columns, "data": rows}, "subject_ids": ["a", "b", "c", "d"]}
        ids += serving.post(URL, json.dumps(body), content_type="application/json").json()["prediction_ids"]
    assert flush_predictions() == 12
    assert flush_predictions() == 0
    logged = PredictionLog.objects.filter(pk__in=ids)
    assert logged.count() == 12 and {p.role for p in logged} == {"champion"}
    assert all(len(p.subject_hash) == 64 and p.subject_hash != "a" for p in logged)
    response = api_as(personas["ds"]).post("/api/v1/serve/churn/dev/feedback",
                                           [{"prediction_id": i, "actual": 1} for i in ids[:5]], format="json")
    assert response.status_code == 202 and Feedback.objects.count() == 5
    assert_error_shape(api_as(personas["ds"]).post("/api/v1/serve/churn/dev/feedback", [{"prediction_id": "x"}],
                                                   format="json"), 400)
    assert_error_shape(api_as(personas["outsider"]).post("/api/v1/serve/churn/dev/feedback", [], format="json"), 404)


def test_a_canary_takes_its_share_within_three_points_sticky_by_key(serving: Client, two_versions: list[ModelVersion],
                                                                    personas: dict[str, Any]) -> None:
    _deploy(two_versions[1], personas["ds"], strategy="canary", traffic_percent=30)
    state = EnvironmentState.objects.get()
    assert (state.mode, state.challenger_percent) == ("canary", 30)
    body = json.dumps({"instances": _rows(1)[1]})
    versions = Counter()
    for i in range(2000):
        versions[serving.post(URL, body, content_type="application/json", HTTP_X_ROUTING_KEY=f"customer-{i}")
                 .json()["model_version"]] += 1
    assert abs(versions[2] / 2000 - 0.30) <= 0.03, versions
    sticky = {serving.post(URL, body, content_type="application/json", HTTP_X_ROUTING_KEY="customer-7")
              .json()["model_version"] for _ in range(20)}
    assert len(sticky) == 1
    roles = {i.role: i.traffic_percent for i in ServingInterval.objects.filter(ended_at__isnull=True)}
    assert roles == {"champion": 70, "canary": 30}


def test_shadow_logs_both_answers_and_returns_only_the_champions(serving: Client, two_versions: list[ModelVersion],
                                                                 personas: dict[str, Any]) -> None:
    _deploy(two_versions[1], personas["ds"], strategy="shadow")
    body = json.dumps({"instances": _rows(3)[1]})
    answer = serving.post(URL, body, content_type="application/json").json()
    assert answer["model_version"] == 1
    from registry.serving.views import _shadow_pool

    _shadow_pool.submit(lambda: None).result(timeout=10)
    flush_predictions()
    champion_rows = PredictionLog.objects.filter(pk__in=answer["prediction_ids"])
    assert sorted((p.role, p.version) for p in champion_rows) == [("champion", 1)] * 3
    shadow_rows = PredictionLog.objects.filter(role="shadow")
    assert shadow_rows.count() == 3 and {p.version for p in shadow_rows} == {2}
    assert {p.shadow_of for p in shadow_rows} == set(answer["prediction_ids"])


def test_replace_switches_versions_and_audits_with_the_request_id(serving: Client, two_versions: list[ModelVersion],
                                                                  personas: dict[str, Any]) -> None:
    body = json.dumps({"instances": _rows(1)[1]})
    assert serving.post(URL, body, content_type="application/json").json()["model_version"] == 1
    first = Deployment.objects.get(version__number=1)
    _deploy(two_versions[1], personas["ds"])
    runtime.cache.clear()
    assert serving.post(URL, body, content_type="application/json").json()["model_version"] == 2
    first.refresh_from_db()
    assert first.status == "retired"
    actions = list(AuditEvent.objects.filter(action__startswith="deployment.").values_list("action", flat=True))
    assert actions.count("deployment.create") == 2 and actions.count("deployment.live") == 2
    assert AuditEvent.objects.filter(action="traffic.switch").count() == 2 and verify_chain().ok
    intervals = list(ServingInterval.objects.order_by("started_at").values_list("version__number", "ended_at"))
    assert intervals[0][0] == 1 and intervals[0][1] is not None and intervals[-1] == (2, None)


def test_a_failed_deployment_changes_nothing_that_serves(serving: Client, two_versions: list[ModelVersion],
                                                         personas: dict[str, Any]) -> None:
    from registry.storage import artifact_storage

    version = two_versions[1]
    stored = Path(artifact_storage().path(version.artifact.storage_name))
    stored.write_bytes(stored.read_bytes() + b"corrupted")
    deployment = deployments.deployment_start(version=version, environment="dev", actor=personas["ds"])
    result = deployments.deployment_run(deployment_id=deployment.pk)
    assert result is not None and result.status == "failed" and "no longer matches" in result.error
    assert EnvironmentState.objects.get().champion.version.number == 1
    body = json.dumps({"instances": _rows(1)[1]})
    assert serving.post(URL, body, content_type="application/json").json()["model_version"] == 1
    assert AuditEvent.objects.filter(action="deployment.fail", outcome="failure").exists()


def test_deploy_rules(two_versions: list[ModelVersion], personas: dict[str, Any], api_as: Any) -> None:
    client = api_as(personas["ds"])
    assert_error_shape(client.post("/api/v1/models/churn/versions/1/deploy", {"environment": "prod"}, format="json"),
                       403)
    assert_error_shape(client.post("/api/v1/models/churn/versions/1/deploy",
                                   {"environment": "dev", "strategy": "canary", "traffic_percent": 10},
                                   format="json"), 400)
    assert_error_shape(client.post("/api/v1/models/churn/versions/1/deploy", {"environment": "moon"},
                                   format="json"), 400)
    assert_error_shape(api_as(personas["viewer"]).post("/api/v1/models/churn/versions/1/deploy",
                                                       {"environment": "dev"}, format="json"), 403)
    assert_error_shape(api_as(personas["outsider"]).post("/api/v1/models/churn/versions/1/deploy",
                                                         {"environment": "dev"}, format="json"), 404)
    accepted = client.post("/api/v1/models/churn/versions/1/deploy", {"environment": "dev"}, format="json")
    assert accepted.status_code == 202 and accepted.json()["status"] == "pending"
    detail = client.get(f"/api/v1/deployments/{accepted.json()['id']}/")
    assert detail.status_code == 200 and detail.json()["log"][0]["message"] == "Deployment requested."
    assert_error_shape(api_as(personas["outsider"]).get(f"/api/v1/deployments/{accepted.json()['id']}/"), 404)


def test_a_version_that_is_not_ready_does_not_deploy(personas: dict[str, Any], api_as: Any, tmp_path: Path) -> None:
    team = Team.objects.get(slug="acme")
    services.model_register(name="churn", team=team, actor=personas["ds"])
    api_as(personas["ds"]).post("/api/v1/models/churn/versions/", {
        "file": SimpleUploadedFile("f.skops", files.forest_skops_file(tmp_path / "f.skops").read_bytes())},
        format="multipart")
    body = assert_error_shape(api_as(personas["ds"]).post("/api/v1/models/churn/versions/1/deploy",
                                                          {"environment": "dev"}, format="json"), 400)
    assert "only ready versions deploy" in body["error"]["message"]


def test_with_redis_unreachable_predictions_go_to_the_outbox_and_are_flushed(serving: Client, settings: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from registry.models import PredictionOutbox
    from registry.serving import buffer

    real = buffer.redis_client()
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    dead = redis.Redis.from_url(dead_url, socket_connect_timeout=1, socket_timeout=1)
    settings.PORTAL_PREDICTION_BUFFER_URL = dead_url  # the scoring path's own connection
    monkeypatch.setattr(buffer, "redis_client", lambda: dead)  # the flusher's
    monkeypatch.setattr(buffer, "_redis_paused_until", 0.0)
    body = json.dumps({"instances": _rows(2)[1]})
    answers = [serving.post(URL, body, content_type="application/json") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert PredictionOutbox.objects.count() == 3
    ids = [i for a in answers for i in a.json()["prediction_ids"]]
    # The flusher drains the outbox even while Redis is away, and again (nothing left) once it is back.
    with pytest.raises(redis.ConnectionError):
        flush_predictions()
    assert PredictionOutbox.objects.count() == 0 and PredictionLog.objects.filter(pk__in=ids).count() == 6
    monkeypatch.setattr(buffer, "redis_client", lambda: real)
    assert flush_predictions() == 0


def test_when_neither_redis_nor_the_database_take_the_record_the_answer_is_withheld(
        serving: Client, settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import OperationalError

    from registry.models import PredictionOutbox
    from registry.serving import buffer

    settings.PORTAL_PREDICTION_BUFFER_URL = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setattr(buffer, "_redis_paused_until", 0.0)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("connection refused")

    monkeypatch.setattr(PredictionOutbox.objects, "create", refuse)
    response = serving.post(URL, json.dumps({"instances": _rows(1)[1]}), content_type="application/json")
    assert_error_shape(response, 503)
    assert response["Retry-After"] == "1" and "prediction_ids" not in response.content.decode()


@pytest.mark.django_db(transaction=True)
def test_a_database_outage_keeps_serving_what_was_live_and_refuses_strangers(serving: Client,
                                                                            personas: dict[str, Any]) -> None:
    from django.db import connection

    body = json.dumps({"instances": _rows(1)[1]})
    assert serving.post(URL, body, content_type="application/json").status_code == 200
    _token, stranger = portal_services.token_create(user=personas["ds"], name="new", actor=personas["ds"])
    port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = str(free_port())  # the database goes away, for real: connections refused
    try:
        from registry.serving import views

        for key in list(views._auth_cache):  # past the 2 s freshness window: every lookup now tries the database
            views._auth_cache[key] = (views._auth_cache[key][0] - 10, views._auth_cache[key][1])
        for key in list(views._model_cache):
            views._model_cache[key] = (views._model_cache[key][0] - 10, views._model_cache[key][1])
        for route in runtime.cache._routes.values():
            route.checked_at -= 10
        answer = serving.post(URL, body, content_type="application/json")
        assert answer.status_code == 200 and answer.json()["model_version"] == 1
        refused = Client(HTTP_AUTHORIZATION=f"Bearer {stranger}").post(URL, body, content_type="application/json")
        assert_error_shape(refused, 503)
        assert "database" in refused.json()["error"]["message"]
    finally:
        connection.close()
        connection.settings_dict["PORT"] = port
    flush_predictions()
    assert PredictionLog.objects.filter(pk__in=answer.json()["prediction_ids"]).count() == 1


def test_one_flush_drains_the_whole_buffer_and_leaves_what_another_flusher_reads(serving: Client) -> None:
    from monitoring import flush
    from registry.serving import buffer

    client = buffer.redis_client()
    if client is None:
        pytest.skip("the Redis buffer is not configured (embedded mode drains the outbox)")
    body = json.dumps({"instances": _rows(1)[1]})
    for _ in range(5):
        assert serving.post(URL, body, content_type="application/json").status_code == 200
    for i in range(2 * flush.MOVE_BATCHES):  # more than one move at a time: the same run goes on
        buffer.emit({"model": "churn", "environment": "dev", "version": 1, "role": "champion", "ts": 1.7e9,
                     "latency_ms": 1.0, "request_id": "", "error": "", "ids": [f"bulk{i:028d}"],
                     "inputs": [_rows(1)[1][0]], "outputs": [0], "subjects": None})
    flush.ensure_groups(client)
    key = buffer.stream_keys()[0]
    taken = client.xreadgroup(buffer.STREAM_GROUP, "another-flusher", {key: ">"}, count=1)[0][1]
    # Flushers share the buffer: what another one has read (and not yet acknowledged) is left to it.
    assert flush.flush_predictions() == 5 + 2 * flush.MOVE_BATCHES - 1
    assert sum(client.xlen(k) for k in buffer.stream_keys()) == 1
    client.xack(key, buffer.STREAM_GROUP, taken[0][0])
    client.xdel(key, taken[0][0])
    assert flush.flush_predictions() == 0


def test_drain_waits_for_a_flusher_at_work_and_leaves_nothing_behind(serving: Client, settings: Any) -> None:
    """GDPR exports and erasures drain first: records another flusher has read but not yet written must be waited
    for, not skipped (a plain flush leaves them to that flusher until they have been pending for the claim time)."""
    from monitoring import flush
    from registry.serving import buffer

    client = buffer.redis_client()
    if client is None:
        pytest.skip("the Redis buffer is not configured (embedded mode drains the outbox)")
    body = json.dumps({"instances": _rows(1)[1]})
    ids = [serving.post(URL, body, content_type="application/json").json()["prediction_ids"][0] for _ in range(3)]
    flush.ensure_groups(client)
    for key in buffer.stream_keys():  # read by another flusher, which dies without writing them
        client.xreadgroup(buffer.STREAM_GROUP, "dead-flusher", {key: ">"})
    settings.PORTAL_PREDICTION_CLAIM_SECONDS = 0.5  # taken over once pending this long
    assert flush.flush_predictions() == 0  # too early: the other flusher may still be at work
    assert flush.drain(timeout=10) == 3
    assert sum(client.xlen(k) for k in buffer.stream_keys()) == 0
    assert PredictionLog.objects.filter(pk__in=ids).count() == 3


# --- Ground truth belongs to its own model and environment; viewers neither score nor send it ----------------------

def _other_teams_model(outsider: Any, tmp_path: Path) -> ModelVersion:
    """Team ``other``'s own model ``fraud``, live in dev: the second team of the cross-team feedback tests."""
    from registry.versions.localfiles import LocalUpload

    model = services.model_register(name="fraud", team=Team.objects.get(slug="other"), actor=outsider)
    path = files.joblib_file(tmp_path / "fraud.joblib")
    version = services.version_upload(model=model, upload=LocalUpload(path, path.name), reference=None,
                                      meta=services.UploadMetadata(), actor=outsider)
    version = services.version_scan(version_id=version.pk)
    assert version.status == "ready", version.status_detail
    _deploy(version, outsider)
    return version


def test_feedback_is_taken_only_for_predictions_of_that_model_and_environment(
        serving: Client, personas: dict[str, Any], api_as: Any, tmp_path: Path) -> None:
    """Team other's data scientist tries to write ground truth onto team acme's predictions through their own model's
    feedback URL: each such item is refused, counted and audited, and acme's accuracy never sees it."""
    _other_teams_model(personas["outsider"], tmp_path)
    body = json.dumps({"instances": _rows(2)[1]})
    acme_ids = serving.post(URL, body, content_type="application/json").json()["prediction_ids"]
    _t, outsider_token = portal_services.token_create(user=personas["outsider"], name="o", actor=personas["outsider"])
    outsider_scoring = EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {outsider_token}")
    fraud_ids = outsider_scoring.post("/api/v1/serve/fraud/dev/invocations", body,
                                      content_type="application/json").json()["prediction_ids"]
    assert flush_predictions() == 4
    outsider = api_as(personas["outsider"])

    response = outsider.post("/api/v1/serve/fraud/dev/feedback",
                             [{"prediction_id": acme_ids[0], "actual": 1234}, {"prediction_id": fraud_ids[0],
                                                                               "actual": 1}], format="json")
    assert response.status_code == 202, response.content
    answer = response.json()
    assert (answer["accepted"], answer["refused"]) == (1, 1)
    assert answer["refusals"] == [{"index": 0, "prediction_id": acme_ids[0],
                                   "reason": "not a logged prediction of fraud in dev"}]
    assert not Feedback.objects.filter(prediction_id=acme_ids[0]).exists(), "acme's prediction is untouched"
    assert Feedback.objects.get(prediction_id=fraud_ids[0]).actual == 1
    refused = AuditEvent.objects.get(action="feedback.refuse")
    assert (refused.outcome, refused.actor_username, refused.team_slug) == ("denied", "olly", "other")
    assert refused.metadata["belong_to"] == ["churn/dev"] and refused.metadata["prediction_ids"] == [acme_ids[0]]
    assert AuditEvent.objects.get(action="feedback.receive").metadata == {"count": 1, "refused": 1}

    # acme's own URL is not theirs to use at all; a prediction sent to the wrong environment or never made is refused.
    assert_error_shape(outsider.post("/api/v1/serve/churn/dev/feedback",
                                     [{"prediction_id": acme_ids[0], "actual": 1234}], format="json"), 404)
    ds = api_as(personas["ds"])
    answer = ds.post("/api/v1/serve/churn/stage/feedback", [{"prediction_id": acme_ids[1], "actual": 0},
                                                           {"prediction_id": "f" * 32, "actual": 0}],
                     format="json").json()
    assert (answer["accepted"], answer["refused"]) == (0, 2)
    assert AuditEvent.objects.filter(action="feedback.refuse").first().metadata["unknown"] == 1
    assert not Feedback.objects.filter(prediction_id__in=acme_ids).exists()
    assert verify_chain().ok


def test_feedback_for_a_prediction_still_in_the_buffer_is_taken_and_the_last_value_wins(
        serving: Client, personas: dict[str, Any], api_as: Any) -> None:
    """Ground truth sent right after the answer, before any flush: the buffer is drained first, so it is accepted."""
    [pid] = serving.post(URL, json.dumps({"instances": _rows(1)[1]}),
                         content_type="application/json").json()["prediction_ids"]
    assert not PredictionLog.objects.filter(pk=pid).exists()
    response = api_as(personas["ds"]).post("/api/v1/serve/churn/dev/feedback",
                                           [{"prediction_id": pid, "actual": 0}, {"prediction_id": pid, "actual": 1}],
                                           format="json")
    assert response.status_code == 202 and response.json() == {"accepted": 1, "refused": 0, "refusals": []}
    assert Feedback.objects.get(prediction_id=pid).actual == 1


@pytest.mark.parametrize("who", ["viewer", "compliance"])
def test_roles_without_score_neither_score_nor_send_ground_truth(serving: Client, personas: dict[str, Any],
                                                                  api_as: Any, who: str) -> None:
    [pid] = serving.post(URL, json.dumps({"instances": _rows(1)[1]}),
                         content_type="application/json").json()["prediction_ids"]
    flush_predictions()
    _t, token = portal_services.token_create(user=personas[who], name="reader", actor=personas[who])
    reader = EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {token}")
    refused = assert_error_shape(reader.post(URL, json.dumps({"instances": _rows(1)[1]}),
                                             content_type="application/json"), 403, "permission_denied")
    assert "score" in refused["error"]["message"]
    assert_error_shape(api_as(personas[who]).post("/api/v1/serve/churn/dev/feedback",
                                                  [{"prediction_id": pid, "actual": 1}], format="json"), 403)
    assert not Feedback.objects.exists()
    assert PredictionLog.objects.count() == 1, "the refused scoring logged nothing"
    assert api_as(personas[who]).get("/api/v1/models/churn/").status_code == 200, "they still read"
    for scorer in ("ds", "approver1", "admin"):
        _t, token = portal_services.token_create(user=personas[scorer], name="s", actor=personas[scorer])
        answer = EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {token}").post(
            URL, json.dumps({"instances": _rows(1)[1]}), content_type="application/json")
        assert answer.status_code == 200, (scorer, answer.content)


def test_the_score_check_costs_no_query_on_a_warm_scoring_path(serving: Client, personas: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The capability is cached with the token and the model lookup: once warm, neither an answered request nor a
    viewer's refusal reads the database (the caches' windows stretched so a slow machine cannot refresh them)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from registry.serving import views

    monkeypatch.setattr(views, "AUTH_CACHE_SECONDS", 600.0)
    monkeypatch.setattr(runtime, "REFRESH_SECONDS", 600.0)
    _t, token = portal_services.token_create(user=personas["viewer"], name="reader", actor=personas["viewer"])
    viewer = EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {token}")
    body = json.dumps({"instances": _rows(1)[1]})
    assert serving.post(URL, body, content_type="application/json").status_code == 200
    assert viewer.post(URL, body, content_type="application/json").status_code == 403
    with CaptureQueriesContext(connection) as queries:
        for _ in range(20):
            assert serving.post(URL, body, content_type="application/json").status_code == 200
            assert viewer.post(URL, body, content_type="application/json").status_code == 403
    assert len(queries) == 0, [q["sql"][:120] for q in queries]
