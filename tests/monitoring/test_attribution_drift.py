"""Attribution drift (issue 37): each feature's share of SHAP attribution over recent production rows, explained in
the sandbox by the serving version's own explainer, against its share over the reference data; an alert at the
threshold; shown on the monitoring page. Real sandbox, real hosts, real prediction log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.test import Client

from monitoring import attribution
from monitoring.alerts import evaluate_alerts
from monitoring.flush import flush_predictions
from monitoring.models import Alert
from monitoring.rollups import rollup_dirty
from registry.models import EnvironmentState
from tests.registry import files
from tests.registry.serving.test_explain import body, client_for, live

pytestmark = [pytest.mark.django_db, pytest.mark.real_sandbox]


def test_attribution_drift_is_measured_in_the_sandbox_alerts_and_shows(personas: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    X, y = files._data()
    estimator = LogisticRegression(max_iter=5000).fit(X, y)
    version = live("drifting", estimator, tmp_path, personas)
    scorer = client_for(personas["ds"])
    state = EnvironmentState.objects.select_related("model", "champion__version").get(
        model__name="drifting", environment="dev")

    # Production like the reference: the shares agree (the same rows the reference holds).
    same = X.head(200).sample(120, random_state=0)
    assert scorer.post("/api/v1/serve/drifting/dev/invocations", body(same),
                       content_type="application/json").status_code == 200
    flush_predictions()
    calm = attribution.measure(state=state)
    assert calm.error == "" and calm.rows == 120 and calm.method == "shap.LinearExplainer (interventional)"
    # What the measurement should find, computed here from the model's coefficients: a linear model's SHAP value
    # is coef * (x - mean of the background).
    background = np.asarray(version.explanation["background"])
    logged = same.to_numpy()  # the newest 500 at most: all 120
    expected = np.abs(estimator.coef_[0] * (logged - background.mean(axis=0))).mean(axis=0)
    expected = expected / expected.sum()
    assert np.allclose([calm.production[c] for c in X.columns], expected, atol=1e-9)
    assert calm.distance is not None and calm.distance < 0.2

    # Production where one feature moved far from where the reference has it: it takes most of the attribution.
    top = max(calm.reference, key=lambda n: calm.reference[n])
    # the feature with the most leverage (|coefficient| x spread) among those the reference gives a small share
    leverage = dict(zip(X.columns, np.abs(estimator.coef_[0]) * X.std().to_numpy(), strict=True))
    moved = max((c for c in X.columns if calm.reference[c] < 0.1), key=lambda c: leverage[c])
    shifted = same.copy()
    shifted[moved] = X[moved].mean() + 200 * X[moved].std()
    assert scorer.post("/api/v1/serve/drifting/dev/invocations", body(shifted),
                       content_type="application/json").status_code == 200
    flush_predictions()
    drifted = attribution.measure(state=state)
    assert drifted.rows == 240 and drifted.distance is not None and drifted.distance >= 0.2, drifted.distance
    assert drifted.production[moved] > 0.3 > drifted.reference[moved]
    assert drifted.distance == pytest.approx(attribution.distance(drifted.production, drifted.reference))

    rollup_dirty()
    evaluate_alerts()
    alert = Alert.objects.get(model__name="drifting", environment="dev", kind="attr_drift")
    assert alert.value == pytest.approx(drifted.distance) and alert.threshold == 0.2
    assert moved in alert.message and "Attribution drift" in alert.message

    page = Client()
    page.force_login(personas["viewer"])
    html = page.get("/models/drifting/environments/dev/monitoring").content.decode()
    assert f"distance <strong>{drifted.distance:.3f}</strong>" in html and "at or above" in html
    assert f'<th scope="row">{moved}</th>' in html and f'<th scope="row">{top}</th>' in html
