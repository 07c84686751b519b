"""``POST /api/v1/serve/{name}/{env}/explain`` (issue 37): each row's prediction with SHAP attributions and base
value, computed in the model's sandboxed host, for the bodies ``invocations`` takes. Real sandbox, real hosts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import shap

from portal import services as portal_services
from portal.models import AuditEvent
from registry.models import ModelVersion
from registry.serving.views import subject_hash
from tests.conftest import EntryPointClient
from tests.registry import files
from tests.registry.conftest import deploy_now
from tests.registry.versions.test_explanations import upload

pytestmark = [pytest.mark.django_db(transaction=False), pytest.mark.real_sandbox]


def client_for(user: Any) -> EntryPointClient:
    _token, plaintext = portal_services.token_create(user=user, name="explain", actor=user)
    return EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}")


def body(frame: Any, subjects: list[str] | None = None) -> bytes:
    payload: dict[str, Any] = {"dataframe_split": {"columns": list(frame.columns), "data": frame.to_numpy().tolist()}}
    if subjects is not None:
        payload["subject_ids"] = subjects
    return orjson.dumps(payload)


def live(name: str, estimator: Any, tmp_path: Path, personas: dict[str, Any], **kwargs: Any) -> ModelVersion:
    version = upload(name, estimator, tmp_path, personas, name=name, **kwargs)
    assert version.status == "ready", version.status_detail
    deploy_now(version, personas["ds"])
    return version


def explain(client: Any, name: str, frame: Any, **kwargs: Any) -> Any:
    return client.post(f"/api/v1/serve/{name}/dev/explain", body(frame, **kwargs), content_type="application/json")


def direct(estimator: Any, version: ModelVersion, X: Any) -> tuple[Any, Any, Any]:
    """shap run directly on the model, in this process, as the explain endpoint's explainer should: (attributions,
    base values, output explained) for the class the endpoint picks (the positive one of two)."""
    module = type(estimator).__module__
    if module.startswith("sklearn.linear_model"):
        explainer = shap.LinearExplainer(estimator, np.asarray(version.explanation["background"]))
        values = explainer.shap_values(X.to_numpy())
        return values, np.full(len(X), float(np.asarray(explainer.expected_value).reshape(-1)[-1])), \
            estimator.decision_function(X)
    explainer = shap.TreeExplainer(estimator)
    if module.startswith("xgboost"):
        # shap's own double-precision TreeSHAP over its own parse of the booster: the shortcut to XGBoost's float32
        # pred_contribs is turned off. Rows rounded to float32, as XGBoost reads them. (That parse keeps the leaves
        # in float32, which shap's C helper does not average up the trees, so its expected_value is the base score
        # alone: the base value is XGBoost's own bias term, in float32.)
        import xgboost

        explainer.model.model_type = "internal"
        rows = X.to_numpy(dtype=np.float32)
        bias = estimator.get_booster().predict(xgboost.DMatrix(X), pred_contribs=True)[:, -1]
        return (np.asarray(explainer.shap_values(rows, check_additivity=False), dtype=np.float64),
                bias.astype(np.float64), np.asarray(explainer.model.predict(rows), dtype=np.float64))
    values = np.asarray(explainer.shap_values(X, check_additivity=False))
    expected = np.asarray(explainer.expected_value, dtype=np.float64).reshape(-1)
    if values.ndim == 3:
        return values[:, :, 1], np.full(len(X), expected[1]), estimator.predict_proba(X)[:, 1]
    return values, np.full(len(X), expected[-1]), estimator.predict(X, raw_score=True)


def models() -> dict[str, Any]:
    import lightgbm
    import xgboost
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    X, y = files._data()
    return {
        "linear": LogisticRegression(max_iter=5000).fit(X, y),
        "forest": RandomForestClassifier(n_estimators=30, max_depth=6, random_state=0).fit(X, y),
        "xgb": xgboost.XGBClassifier(n_estimators=30, max_depth=3).fit(X, y),
        "lgbm": lightgbm.LGBMClassifier(n_estimators=30, verbose=-1).fit(X, y),
    }


@pytest.mark.parametrize("kind", ["linear", "forest", "xgb", "lgbm"])
def test_attributions_add_up_and_equal_shap_run_directly(kind: str, personas: dict[str, Any],
                                                           tmp_path: Path) -> None:
    estimator = models()[kind]
    version = live(f"explain-{kind}", estimator, tmp_path, personas)
    X, _y = files._data()
    rows = X.iloc[200:210]
    response = explain(client_for(personas["ds"]), f"explain-{kind}", rows)
    assert response.status_code == 200, response.content
    answer = response.json()
    assert answer["model_version"] == version.number and answer["approximate"] is False
    assert answer["method"] == ("shap.LinearExplainer (interventional)" if kind == "linear"
                                else "shap.TreeExplainer (path-dependent)")
    values, base, output = direct(estimator, version, rows)
    predictions = estimator.predict(rows).tolist()
    gaps = []
    for i, row in enumerate(answer["explanations"]):
        # named as the model names its inputs (LightGBM writes `mean_radius` for `mean radius`), in its order
        assert list(row["attributions"]) == [c["name"] for c in version.signature["inputs"]]
        attributions = np.array(list(row["attributions"].values()))
        gaps.append(abs(attributions.sum() + row["base_value"] - row["output"]))
        assert gaps[-1] <= 1e-6
        assert abs(row["output"] - output[i]) <= 1e-9
        assert np.allclose(attributions, values[i], rtol=1e-9, atol=1e-9)
        assert row["base_value"] == pytest.approx(base[i], abs=1e-9 if kind != "xgb" else 1e-6)
        assert row["prediction"] == predictions[i] and row["class"] == 1
    assert answer["additivity_gap"] == pytest.approx(max(gaps), abs=1e-12)
    if kind == "xgb":
        # The margin explained is the one XGBoost's trees give in double precision: XGBoost's own (a float32 sum)
        # is that margin rounded, one float32 step per tree added at most; XGBoost's own float32 contributions
        # agree with the attributions to float32 precision.
        theirs = estimator.predict(rows, output_margin=True).astype(np.float64)
        steps = (estimator.get_booster().num_boosted_rounds() + 1) * np.spacing(np.float32(np.abs(output).max() + 1))
        assert np.all(np.abs(np.array([r["output"] for r in answer["explanations"]]) - theirs) <= steps)
        contribs = shap.TreeExplainer(estimator).shap_values(rows, check_additivity=False)
        got = np.array([list(r["attributions"].values()) for r in answer["explanations"]])
        assert np.allclose(got, contribs, rtol=1e-4, atol=1e-5)


def test_no_explainer_answers_422_naming_why_and_roles_are_enforced(personas: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    X, y = files._data()
    live("explain-none", LogisticRegression(max_iter=5000).fit(X, y), tmp_path, personas, reference=False)
    rows = X.head(2)
    response = explain(client_for(personas["ds"]), "explain-none", rows)
    assert response.status_code == 422, response.content
    message = response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "no_explainer"
    assert "a linear model is explained against reference rows and the version has none" in message
    assert explain(client_for(personas["viewer"]), "explain-none", rows).status_code == 403
    assert EntryPointClient().post("/api/v1/serve/explain-none/dev/explain", body(rows),
                                   content_type="application/json").status_code == 401
    assert explain(client_for(personas["outsider"]), "explain-none", rows).status_code == 404
    bad = client_for(personas["ds"]).post("/api/v1/serve/explain-none/dev/explain", b'{"dataframe_split": 3}',
                                          content_type="application/json")
    assert bad.status_code == 400


def test_explaining_a_row_about_a_subject_is_audited_by_its_hash(personas: dict[str, Any], tmp_path: Path) -> None:
    live("explain-forest", models()["forest"], tmp_path, personas)
    X, _y = files._data()
    before = AuditEvent.objects.filter(action="subject.explanation_read").count()
    response = explain(client_for(personas["ds"]), "explain-forest", X.head(3), subjects=["p-1", "p-2", "p-1"])
    assert response.status_code == 200, response.content
    events = AuditEvent.objects.filter(action="subject.explanation_read").order_by("id")[before:]
    assert sorted(e.target_id for e in events) == sorted([subject_hash("p-1"), subject_hash("p-2")])
    assert all("p-1" not in str(e.metadata) for e in events)
    assert explain(client_for(personas["ds"]), "explain-forest", X.head(3)).status_code == 200
    assert AuditEvent.objects.filter(action="subject.explanation_read").count() == before + 2


def test_model_agnostic_fallback_on_100_features_stays_within_budget_and_says_approximate(
        personas: dict[str, Any], tmp_path: Path, settings: Any) -> None:
    import pandas as pd
    from sklearn.neural_network import MLPRegressor

    settings.PORTAL_EXPLAIN_BUDGET_SECONDS = 3.0
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(400, 100)), columns=[f"x{i}" for i in range(100)])
    target = frame["x0"] * 3 + frame["x1"] ** 2 + rng.normal(0, 0.1, 400)
    estimator = MLPRegressor(hidden_layer_sizes=(32,), max_iter=300, random_state=0).fit(frame, target)
    version = live("explain-mlp", estimator, tmp_path, personas, frame=frame.head(200))
    assert version.explanation["approximate"] is True, version.explanation
    client = client_for(personas["ds"])
    rows = frame.iloc[300:305]
    explain(client, "explain-mlp", rows.head(1))  # the host's cold start (loading the model, importing shap)
    started = time.monotonic()
    response = explain(client, "explain-mlp", rows)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.content
    answer = response.json()
    assert answer["approximate"] is True and answer["method"].startswith("shap.KernelExplainer")
    assert answer["cost"]["seconds"] <= 3.0 and elapsed < 3.0 + 2.0, (answer["cost"], elapsed)
    predicted = estimator.predict(rows)
    for i, row in enumerate(answer["explanations"]):
        total = sum(row["attributions"].values()) + row["base_value"]
        assert abs(total - row["output"]) <= 1e-6 and row["output"] == pytest.approx(predicted[i], abs=1e-9)
    # too many rows for the budget: stopped with a 504 that says so, not a half answer
    many = explain(client, "explain-mlp", frame.iloc[:1000])
    assert many.status_code == 504, many.content
    assert "send fewer rows" in many.json()["error"]["message"]


@pytest.mark.parametrize("action", ["write_var", "write_tmp"])
def test_a_hostile_models_explainer_runs_in_the_sandbox(action: str, personas: dict[str, Any], tmp_path: Path,
                                                        settings: Any) -> None:
    """A custom pyfunc whose every load and every predict writes a canary (into var/ or /tmp): its global
    importance (at scan time) and its explanations (from /explain) call it hundreds of times, all inside the
    sandbox, so no canary ever appears outside it, and the explainer still answers."""
    import os
    import secrets
    import sysconfig

    import pandas as pd

    from registry.models import RegisteredModel
    from registry.versions import services
    from registry.versions.localfiles import LocalUpload
    from tests.registry import hostile

    token = secrets.token_hex(6)
    setting = hostile.Setting(token=token, var_dir=str(settings.VAR_DIR),
                              site_packages=sysconfig.get_paths()["purelib"], sentinel_name="EXPLAIN_SENTINEL",
                              host_pid_namespace=os.readlink("/proc/self/ns/pid"), secret_files=[],
                              env_names=[], pg_databases=[])
    zipped = tmp_path / "model.zip"
    zipped.write_bytes(hostile.model_zip(hostile.config(setting, action), "cloudpickle"))
    reference = tmp_path / "ref.csv"
    pd.DataFrame(np.random.default_rng(0).normal(size=(60, 2)), columns=hostile.COLUMNS).to_csv(reference,
                                                                                              index=False)

    def canaries() -> list[str]:
        found = [str(p) for p in Path(settings.VAR_DIR).rglob(f"*{token}*")]
        return found + [f"/tmp/{n}" for n in os.listdir("/tmp") if token in n]

    from portal.models import Team

    model = RegisteredModel.objects.filter(name="hostile-explain").first() or services.model_register(
        name="hostile-explain", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    version = services.version_upload(model=model, upload=LocalUpload(zipped, zipped.name),
                                      reference=LocalUpload(reference, reference.name),
                                      meta=services.UploadMetadata(), actor=personas["ds"])
    if version.trust_state == "pending":  # code: an approver trusts it, and the sandbox must hold it all the same
        services.version_trust_decide(version=version, trust=True, reason="explanation canary test",
                                      actor=personas["approver1"])
    version = services.version_scan(version_id=version.pk)
    assert version.status == "ready", version.status_detail
    version = services.version_explain(version_id=version.pk)
    assert version.explanation.get("method", "").startswith("shap.KernelExplainer"), version.explanation
    assert version.explanation["cost"]["model_evaluations"] > 100  # the payload ran that often, in the sandbox
    assert canaries() == []
    deploy_now(version, personas["ds"])
    frame = pd.DataFrame([[1.0, 2.0], [3.0, 5.0]], columns=hostile.COLUMNS)
    response = explain(client_for(personas["ds"]), "hostile-explain", frame)
    assert response.status_code == 200, response.content
    answer = response.json()
    assert answer["approximate"] is True
    for row, expected in zip(answer["explanations"], (3.0, 8.0), strict=True):  # the model adds its two inputs
        assert row["prediction"] == expected
        assert abs(sum(row["attributions"].values()) + row["base_value"] - row["output"]) <= 1e-6
    assert canaries() == []


def test_explain_before_the_explainer_is_ready_says_so(personas: dict[str, Any], tmp_path: Path) -> None:
    """Between the scan and its explain task the version serves but has no explainer yet: 503 with Retry-After
    and the reason, never a 422 that would call the model unexplainable."""
    from sklearn.linear_model import LogisticRegression

    X, y = files._data()
    estimator = LogisticRegression(max_iter=5000).fit(X, y)
    version = live("pending-explainer", estimator, tmp_path, personas)
    ModelVersion.objects.filter(pk=version.pk).update(explanation={"pending": True})
    response = client_for(personas["ds"]).post("/api/v1/serve/pending-explainer/dev/explain", body(X.head(2)),
                                               content_type="application/json")
    assert response.status_code == 503 and response["Retry-After"] == "30", response.content
    assert response.json()["error"]["code"] == "explainer_pending"
    assert "still being prepared" in response.json()["message"]


def test_explanations_do_not_starve_scoring(personas: dict[str, Any], tmp_path: Path, settings: Any) -> None:
    """Explain has a bulkhead and a sandboxed host of its own, and a rate per caller: explanations filling their
    slots, or holding their host, leave scoring answering at once; scoring filling its slots leaves explanations
    answering; a caller past the explain rate gets 429 with Retry-After, other callers and scoring do not."""
    from registry.models import RegisteredModel
    from registry.sandbox import hosts
    from registry.serving import runtime

    version = live("explain-bulkhead", models()["forest"], tmp_path, personas)
    X, _y = files._data()
    client = client_for(personas["ds"])

    def score() -> Any:
        return client.post("/api/v1/serve/explain-bulkhead/dev/invocations", body(X.head(2)),
                           content_type="application/json")

    assert explain(client, "explain-bulkhead", X.head(2)).status_code == 200  # both hosts started
    assert score().status_code == 200
    route = runtime.cache.route(RegisteredModel.objects.get(name="explain-bulkhead").pk, "dev")
    assert route is not None and route.champion is not None
    loaded = route.champion[1]

    # Every explain slot taken (explanations in progress): explain refused at once, scoring untouched.
    for _ in range(loaded.explain_in_flight):
        assert loaded.explain_enter()
    try:
        busy = explain(client, "explain-bulkhead", X.head(2))
        assert busy.status_code == 503 and busy["Retry-After"] == "2", busy.content
        assert busy.json()["error"]["code"] == "explainer_busy"
        assert score().status_code == 200
    finally:
        for _ in range(loaded.explain_in_flight):
            loaded.explain_leave()

    # The version's hosted form (what serves every artifact not proven as ONNX; the forest here is served in-process):
    # an explanation holding its host, as a long model-agnostic one does for seconds, does not hold scoring up, for
    # scoring has a host of its own.
    key = f"bulkhead-{version.pk}"
    hosted = runtime.load_serving_model(version=version, kind="native", blob=None, key=key)
    try:
        matrix = X.head(2).to_numpy(dtype="float64")
        assert len(hosted.predict(matrix)) == 2  # both hosts started
        assert len(hosted.explain(matrix, np.asarray(version.explanation["background"]),
                                  version.explanation["columns"], budget=5.0)["rows"]) == 2
        explaining = hosts.pool._hosts[f"{key}-explain"]
        assert explaining.running and hosts.pool._hosts[key].running and explaining is not hosts.pool._hosts[key]
        explaining._lock.acquire()
        try:
            started = time.monotonic()
            assert len(hosted.predict(matrix, timeout=5)) == 2
            assert time.monotonic() - started < 2.0, "scoring waited for the explanation's host"
        finally:
            explaining._lock.release()
    finally:
        hosted.close()

    # Every scoring slot taken by a hung model: scoring refused at once, explanations still answered.
    for _ in range(loaded.in_flight):
        loaded.slots.acquire()
    loaded.last_exit = 0.0
    try:
        refused = score()
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_busy"
        assert explain(client, "explain-bulkhead", X.head(2)).status_code == 200
    finally:
        for _ in range(loaded.in_flight):
            loaded.slots.release()

    # The rate per caller, within one minute.
    settings.PORTAL_EXPLAIN_RATE_LIMIT = 2
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60 + 0.1)
    caller = client_for(personas["ds"])
    assert [explain(caller, "explain-bulkhead", X.head(1)).status_code for _ in range(2)] == [200, 200]
    throttled = explain(caller, "explain-bulkhead", X.head(1))
    assert throttled.status_code == 429, throttled.content
    assert throttled.json()["error"]["code"] == "throttled"
    assert 1 <= int(throttled["Retry-After"]) <= 60
    assert f"retry in {throttled['Retry-After']} s" in throttled.json()["error"]["message"]
    assert explain(client_for(personas["approver1"]), "explain-bulkhead", X.head(1)).status_code == 200
    assert caller.post("/api/v1/serve/explain-bulkhead/dev/invocations", body(X.head(1)),
                       content_type="application/json").status_code == 200
