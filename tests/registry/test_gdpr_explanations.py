"""Issue 37 for the person a decision was about: the subject access report says, for each logged decision, the
prediction, the model version and the features that weighed most, in plain words, recomputed by the version's
explainer in a sandboxed host from the logged inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shap
from django.test import Client

from monitoring import gdpr
from monitoring.flush import flush_predictions
from monitoring.models import SubjectAccessReport
from tests.registry import files
from tests.registry.serving.test_explain import body, client_for, live, models

pytestmark = [pytest.mark.django_db, pytest.mark.real_sandbox]


def test_subject_access_report_explains_each_logged_decision(personas: dict[str, Any], api_as: Any,
                                                            tmp_path: Path) -> None:
    estimator = models()["forest"]
    version = live("credit", estimator, tmp_path, personas)
    X, _y = files._data()
    rows = X.iloc[[3, 40, 77]]
    scored = client_for(personas["ds"]).post("/api/v1/serve/credit/dev/invocations",
                                             body(rows, subjects=["carol", "dave", "carol"]),
                                             content_type="application/json")
    assert scored.status_code == 200, scored.content
    ids = scored.json()["prediction_ids"]
    flush_predictions()

    export = api_as(personas["compliance"]).get("/api/v1/gdpr/subjects/carol/export").json()
    by_id = {p["id"]: p for p in export["predictions"]}
    assert sorted(by_id) == sorted([ids[0], ids[2]])
    values = np.asarray(shap.TreeExplainer(estimator).shap_values(rows, check_additivity=False))[:, :, 1]
    predicted = estimator.predict(rows)
    for position, pid in ((0, ids[0]), (2, ids[2])):
        why = by_id[pid]["explanation"]
        assert why["version"] == version.number and why["model"] == "credit"
        assert why["prediction"] == predicted[position] and why["method"] == "shap.TreeExplainer (path-dependent)"
        expected = [rows.columns[i] for i in np.argsort(-np.abs(values[position]))[:3]]
        assert [t["feature"] for t in why["top_features"]] == expected
        for t in why["top_features"]:
            assert t["attribution"] == pytest.approx(values[position][list(rows.columns).index(t["feature"])],
                                                     abs=1e-9)
            direction = "raised" if t["attribution"] > 0 else "lowered"
            assert t["words"].startswith(f"{t['feature']} = ") and f"{direction} the probability of class 1" in t["words"]
        assert why["summary"].startswith(f"Version {version.number} of credit decided {predicted[position]}")

    # the page a compliance officer uses shows the same, and its download carries it
    page = Client()
    page.force_login(personas["compliance"])
    asked = page.post("/compliance/subjects/", {"subject_id": "carol"})
    assert asked.status_code == 302
    gdpr.subject_report_compile(report_id=SubjectAccessReport.objects.get().pk)  # as the worker runs it
    html = page.get(asked["Location"]).content.decode()
    first = by_id[ids[0]]["explanation"]["top_features"][0]["words"]
    assert first in html.replace("&#x27;", "'")
    download = page.get(f"{asked['Location']}download")
    report = json.loads(download.content)
    assert all(p["explanation"]["top_features"] for p in report["predictions"])
    assert {p["id"]: p["explanation"] for p in report["predictions"]} == \
        {p["id"]: p["explanation"] for p in export["predictions"]}, "the worker's report explains as the API does"
