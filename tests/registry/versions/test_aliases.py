"""Aliases as MLflow users know them (``@champion``): set, moved and removed in the portal and the API, audited,
shown on the models list and the model page; one version per alias, refused names explained."""

from __future__ import annotations

from typing import Any

from django.test import Client

from portal.models import AuditEvent
from registry.models import ModelVersion
from tests.conftest import assert_error_shape
from tests.registry.conftest import fresh_serving_cache, two_versions  # noqa: F401 - fixtures


def test_aliases_are_set_moved_shown_and_audited(two_versions: list[ModelVersion],  # noqa: F811
                                                 personas: dict[str, Any], api_as: Any) -> None:
    ds = api_as(personas["ds"])
    set_ = ds.put("/api/v1/models/churn/aliases/champion", {"version": 1}, format="json")
    assert set_.status_code == 200 and set_.json() == {"model": "churn", "aliases": {"champion": 1}}
    assert ds.put("/api/v1/models/churn/aliases/champion", {"version": 2}, format="json").json()["aliases"] == \
        {"champion": 2}, "an alias moves; it never names two versions"
    ds.put("/api/v1/models/churn/aliases/challenger", {"version": 2}, format="json")
    events = list(AuditEvent.objects.filter(action="model.alias_set").order_by("seq").values_list("before", "after"))
    assert events[:2] == [({"alias": "champion", "version": None}, {"alias": "champion", "version": 1}),
                          ({"alias": "champion", "version": 1}, {"alias": "champion", "version": 2})]
    assert api_as(personas["viewer"]).get("/api/v1/models/churn/").json()["aliases"] == {"challenger": 2,
                                                                                         "champion": 2}
    for bad in ("latest", "v3", "Champion", "9lives"):
        body = assert_error_shape(ds.put(f"/api/v1/models/churn/aliases/{bad}", {"version": 1}, format="json"), 400)
        assert "lowercase" in str(body["error"]), bad
    assert_error_shape(api_as(personas["viewer"]).put("/api/v1/models/churn/aliases/x", {"version": 1},
                                                      format="json"), 403)
    assert api_as(personas["outsider"]).get("/api/v1/models/churn/aliases").status_code == 404

    page = Client()
    page.force_login(personas["ds"])
    listing = page.get("/models/").content.decode()
    assert 'data-alias="champion">@champion v2</a>' in listing
    page.post("/models/churn/aliases", {"alias": "@stable", "version": "1"})
    detail = page.get("/models/churn/").content.decode()
    assert '<li data-alias="stable"><strong>@stable</strong>' in detail and 'data-testid="alias-form"' in detail
    page.post("/models/churn/aliases/challenger/delete")
    assert ds.get("/api/v1/models/churn/aliases").json()["aliases"] == {"champion": 2, "stable": 1}
    assert AuditEvent.objects.filter(action="model.alias_delete").count() == 1
    viewer = Client()
    viewer.force_login(personas["viewer"])
    assert 'data-testid="alias-form"' not in viewer.get("/models/churn/").content.decode()


def test_compare_shows_run_parameters_side_by_side(two_versions: list[ModelVersion],  # noqa: F811
                                                   personas: dict[str, Any]) -> None:
    ModelVersion.objects.filter(pk=two_versions[0].pk).update(params={"C": "1.0", "max_iter": "500"})
    ModelVersion.objects.filter(pk=two_versions[1].pk).update(params={"C": "0.5", "max_iter": "500",
                                                                      "penalty": "l2"})
    page = Client()
    page.force_login(personas["viewer"])
    content = page.get("/models/churn/compare?a=1&b=2").content.decode()
    assert "2 of 3 parameters differ." in content
    assert '<tr data-param="C" class="changed">' in content and '<tr data-param="max_iter">' in content
    assert '<code class="wrap">0.5</code>' in content and "uploaded, no MLflow run" not in content
