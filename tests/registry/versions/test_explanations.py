"""Issue 37: SHAP explanations computed in the sandbox: a version's global importance at scan time (shown on the
version page, compared on the promotion page), and per-row explanations from ``/explain``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from portal.models import Team
from registry.models import ModelVersion
from registry.versions import services
from registry.versions.localfiles import LocalUpload
from tests.registry import files


def upload(model_name: str, estimator: Any, tmp_path: Path, personas: dict[str, Any], *, reference: bool = True,
           frame: Any = None, name: str = "m") -> ModelVersion:
    team = Team.objects.get(slug="acme")
    from registry.models import RegisteredModel

    model = RegisteredModel.objects.filter(name=model_name).first() or services.model_register(
        name=model_name, team=team, actor=personas["ds"])
    path = files.joblib_file(tmp_path / f"{name}.joblib", estimator)
    ref = None
    if reference:
        ref_path = tmp_path / f"{name}-ref.csv"
        (frame if frame is not None else files._data()[0].head(200)).to_csv(ref_path, index=False)
        ref = LocalUpload(ref_path, ref_path.name)
    version = services.version_upload(model=model, upload=LocalUpload(path, path.name), reference=ref,
                                      meta=services.UploadMetadata(), actor=personas["ds"])
    version = services.version_scan(version_id=version.pk)
    if version.status != "ready":
        return version
    if not reference:
        return version
    assert version.explanation == {"pending": True}, version.explanation
    return services.version_explain(version_id=version.pk)  # the task the scan enqueues, as the worker runs it


def forest(n: int = 20, depth: int | None = 6) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    X, y = files._data()
    return RandomForestClassifier(n_estimators=n, max_depth=depth, random_state=0).fit(X, y)


@pytest.mark.django_db
@pytest.mark.real_sandbox
def test_global_importance_of_a_forest_is_computed_in_the_sandbox(personas: dict[str, Any], tmp_path: Path) -> None:
    version = upload("forest", forest(), tmp_path, personas)
    assert version.status == "ready", version.status_detail
    explanation = version.explanation
    assert explanation.get("method") == "shap.TreeExplainer (path-dependent)", explanation
    assert explanation["approximate"] is False
    assert explanation["cost"]["rows"] == 200 and explanation["cost"]["seconds"] > 0
    features = {f["name"]: f for f in explanation["features"]}
    X, _y = files._data()
    assert set(features) == set(X.columns)
    assert abs(sum(f["share"] for f in features.values()) - 1) < 1e-9
    # the same numbers as shap run directly on the model over the same rows
    import shap

    model = forest()
    values = shap.TreeExplainer(model).shap_values(X.head(200), check_additivity=False)[:, :, 1]
    direct = np.abs(values).mean(axis=0)
    ours = np.array([features[c]["mean_abs"] for c in X.columns])
    assert np.allclose(ours, direct, rtol=1e-9, atol=1e-12)
    assert len(explanation["background"]) == 100 and explanation["columns"] == list(X.columns)


def leaning_forest(column: str) -> Any:
    """A forest that can learn only from ``column``: every other column is shuffled noise in its training data."""
    from sklearn.ensemble import RandomForestClassifier

    X, y = files._data()
    noisy = X.copy()
    rng = np.random.default_rng(0)
    for c in noisy.columns:
        if c != column:
            noisy[c] = rng.permutation(noisy[c].to_numpy())
    return RandomForestClassifier(n_estimators=20, max_depth=6, random_state=0).fit(noisy, y)


@pytest.mark.django_db
def test_version_page_shows_importance_and_promotion_page_compares_champion_and_candidate(
        personas: dict[str, Any], tmp_path: Path) -> None:
    from django.test import Client

    from registry.promotions import services as promotions
    from tests.registry.promotions.test_promotions import promote_live

    champion = upload("lean", forest(), tmp_path, personas, name="v1")
    candidate = upload("lean", leaning_forest("mean radius"), tmp_path, personas, name="v2")
    assert champion.status == candidate.status == "ready"
    client = Client()
    client.force_login(personas["viewer"])
    page = client.get(f"/models/lean/versions/{candidate.number}/").content.decode()
    assert "shap.TreeExplainer (path-dependent)" in page and "exact" in page
    assert 'data-testid="importance-chart"' in page and "vendor/plotly/plotly-basic.min.js" in page
    top = max(candidate.explanation["features"], key=lambda f: f["mean_abs"])
    assert top["name"] == "mean radius" and top["share"] > 0.3
    assert f'<th scope="row">{top["name"]}</th>' in page

    promote_live(champion, "stage", personas)
    promotion = promotions.promotion_request(version=candidate, target="stage", reason="leaner",
                                             actor=personas["ds"])
    assert promotion.champion_version_id == champion.pk
    page = client.get(f"/promotions/{promotion.uid}/").content.decode()
    theirs = {f["name"]: f["share"] for f in champion.explanation["features"]}
    ratio = top["share"] / theirs["mean radius"]
    assert ratio >= 1.5
    assert f"The candidate leans on `mean radius` {ratio:.1f}× as much as the champion" in page.replace("&#x60;", "`")
    assert 'data-testid="importance-diff"' in page
    compare = client.get(f"/models/lean/compare?a={champion.number}&b={candidate.number}").content.decode()
    assert f"v{candidate.number} leans on `mean radius` {ratio:.1f}× as much as v{champion.number}" in \
        compare.replace("&#x60;", "`")


@pytest.mark.django_db
def test_version_without_reference_data_says_why_there_is_no_importance(personas: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    from django.test import Client

    version = upload("noref", forest(), tmp_path, personas, reference=False)
    assert version.status == "ready"
    assert version.explanation == {"error": "the version has no reference data to explain against"}
    client = Client()
    client.force_login(personas["viewer"])
    page = client.get(f"/models/noref/versions/{version.number}/").content.decode()
    assert "No global importance: the version has no reference data to explain against." in page
