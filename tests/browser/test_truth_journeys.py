"""Pages that tell the truth when it matters, in Chromium: an approver refused on no evidence, monitoring after a
version switch, a subject's access and erasure, and a rollback from the environment page. Every figure a page shows
is checked against the API's; each page is photographed full length at 412 and 1,366 px into docs/screenshots/.
Waits follow the page's state (a selector, a URL, a function), never the clock."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from monitoring.flush import flush_predictions
from monitoring.rollups import rollup_dirty
from portal.models import Team
from registry.models import ModelVersion, PromotionRequest
from registry.versions import services
from tests.browser.test_promotion_journey import _check_evidence_against_the_api
from tests.browser.test_upload_journey import _sign_in
from tests.conftest import ROOT
from tests.monitoring.conftest import live, log_rows, reference_matrix  # noqa: F401 - fixtures
from tests.registry.conftest import deploy_now, fresh_serving_cache, serving, two_versions  # noqa: F401
from tests.registry.promotions.test_promotions import promote_live, upload
from tests.registry.test_gdpr import _predict

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SCREENSHOTS = ROOT / "docs" / "screenshots"
DRAWN = "(el) => !el.classList.contains('chart') || el.querySelector('.main-svg')"


def document(page: Any, name: str, *, widths: tuple[int, ...] = (412, 1366), section: str = "") -> list[Path]:
    """Full-page screenshots for the docs at a phone's and a laptop's width, once the page has laid itself out
    (and any chart in view has drawn) at that width; nothing scrolls sideways at either."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    paths = []
    for width in widths:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_function("(w) => window.innerWidth === w", arg=width)
        for chart in page.locator(".chart").all():  # charts draw near the viewport: bring each there first
            chart.scroll_into_view_if_needed()
            page.wait_for_function(DRAWN, arg=chart.element_handle())
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), (name, width)
        path = SCREENSHOTS / f"{name}-{width}.png"
        if section:  # one part of a long page, as it lays out at that width
            page.locator(section).screenshot(path=str(path))
        else:
            page.screenshot(path=str(path), full_page=True)
        _shrink(path)
        paths.append(path)
    page.set_viewport_size({"width": 1366, "height": 900})
    return paths


def _shrink(path: Path) -> None:
    """A 256-colour palette keeps a UI screenshot legible at about a third of its size (the checked-in copies stay
    small); skipped where Pillow is not installed (it comes with matplotlib, not with the portal)."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def _api(page: Any, path: str) -> Any:
    response = page.request.get(path)
    assert response.ok, (path, response.status, response.text()[:300])
    return response.json()


# --- 1. An approver refused on no evidence ------------------------------------------------------------------------

def test_an_approver_cannot_approve_a_candidate_with_no_evidence_and_a_contradicted_reason(
        page: Any, browser: Any, live_server: Any, personas: dict[str, Any], settings: Any,
        tmp_path: Path) -> None:
    settings.PORTAL_PROMOTION_MIN_PREDICTIONS = 50
    model = services.model_register(name="breast-cancer", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    v1 = upload(model, personas["ds"], tmp_path, metrics={"accuracy": 0.979})
    deploy_now(v1, personas["ds"])
    v2 = upload(model, personas["ds"], tmp_path, metrics={"accuracy": 0.965}, c=0.5)
    for version in (v1, v2):  # the task the scan enqueues: each version's SHAP importance, in the sandbox
        assert "error" not in services.version_explain(version_id=version.pk).explanation

    _sign_in(page, "dana")
    page.goto(f"/models/breast-cancer/versions/{v2.number}/")
    page.wait_for_selector("[data-testid=importance-table]", state="attached")
    v2.refresh_from_db()
    top = max(v2.explanation["features"], key=lambda f: f["mean_abs"])["name"]
    assert page.locator("[data-testid=importance-table] tbody th").first.text_content() == top
    document(page, "version-importance")
    page.fill("[data-testid=promote-form] textarea[name=reason]", "v2 scores higher than v1.")
    page.click("[data-testid=promote-form] button[value=stage]")
    page.wait_for_selector(".messages .warning")
    told = page.inner_text(".messages")
    assert "it is blocked" in told and "Approvers have not been notified" in told
    assert "approvers have been notified" not in told
    uid = page.url.rstrip("/").rsplit("/", 1)[-1]

    context = browser.new_context(base_url=live_server.url)
    approver = context.new_page()
    errors: list[str] = []
    approver.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    _sign_in(approver, "alex")
    approver.goto(f"/promotions/{uid}/")
    approver.wait_for_selector("[data-testid=decision-form]")
    review = _api(approver, f"/api/v1/promotions/{uid}/")["review"]

    approve = approver.locator("button[value=approve]")
    assert approve.is_disabled()
    assert approver.evaluate("() => getComputedStyle(document.querySelector('button[value=approve]')).cursor") \
        == "not-allowed", "and it looks disabled"
    shown = approver.locator("[data-testid=approve-blocked] li").all_inner_texts()
    assert shown == review["blockers"] and len(shown) == 3
    assert any(s.startswith("Enough live traffic in dev: Too little data") for s in shown)
    assert any(s.startswith("Accuracy on ground truth in dev: Too little data") for s in shown)
    assert "Approvers have not been notified; they will be when every gate passes." in approver.inner_text(
        "[data-testid=blocked]")
    contradiction = approver.inner_text("[data-testid=reason-contradiction]")
    assert contradiction == "The figures disagree: " + review["reason_check"]["contradictions"][0]
    assert "accuracy 0.965 vs 0.979" in contradiction
    for row in review["metric_rows"]:
        cells = approver.locator(f"[data-testid=reason-figures] tr[data-recorded-metric={row['name']}] td")
        assert cells.all_inner_texts() == [f"{row['champion']:.4f}", f"{row['candidate']:.4f}",
                                           f"{row['delta']:.4f}"]
    _check_evidence_against_the_api(approver, uid, "24h")
    _check_importance_against_the_api(approver, v1, v2)
    document(approver, "promotion-blocked")
    approver.evaluate("() => { document.querySelector('#importance-comparison details').open = true; }")
    document(approver, "promotion-importance", section="#importance-comparison")

    # Forcing the button back on changes nothing: the server refuses the approval too.
    approver.fill("textarea[name=comment]", "Approving anyway.")
    approver.evaluate("() => document.querySelector('button[value=approve]').removeAttribute('disabled')")
    approver.click("button[value=approve]")
    approver.wait_for_selector(".messages .error")
    assert "Enough live traffic in dev" in approver.inner_text(".messages .error")
    assert PromotionRequest.objects.get(uid=uid).approvals.count() == 0
    assert approver.inner_text("[data-testid=promotion-status]") == "Pending"
    assert errors == [] and page.console_errors == []
    context.close()


def _check_importance_against_the_api(page: Any, champion: ModelVersion, candidate: ModelVersion) -> None:
    """Nothing serves stage: the promotion page compares the candidate's importance with dev's champion, says so,
    and shows each feature's share as the versions' API gives it, drawn as two bar series."""
    assert page.inner_text("[data-testid=importance-baseline]") == (
        f"Nothing serves stage yet: the candidate is compared with v{champion.number}, which serves dev, the "
        "nearest environment before it.")
    theirs, ours = ({f["name"]: f["share"] for f in _api(page, f"/api/v1/models/breast-cancer/versions/{v.number}/")
                     ["importance"]["features"]} for v in (champion, candidate))
    rows = page.locator("[data-testid=importance-diff] tbody tr")
    assert rows.count() == min(15, len(set(theirs) | set(ours)))
    for i in range(rows.count()):
        name = rows.nth(i).locator("th").text_content()
        cells = [c.text_content() for c in rows.nth(i).locator("td").all()]
        assert cells[0] == f"{round(theirs[name] * 100)} %" and cells[1] == f"{round(ours[name] * 100)} %", name
        assert float(cells[2].rstrip("×")) == pytest.approx(ours[name] / theirs[name], abs=0.006), name
    top = max(ours, key=lambda n: ours[n])
    assert page.locator("[data-testid=importance-diff] tbody th").first.text_content() in (
        top, max(theirs, key=lambda n: theirs[n]))
    summary = page.inner_text("#importance-comparison [data-testid=importance-summary]")
    for name in ours:
        ratio = ours[name] / theirs[name] if theirs.get(name) else None
        if ratio is not None and max(ours[name], theirs[name]) >= 0.02 and ratio >= 1.5:
            assert f"The candidate leans on `{name}` {ratio:.1f}× as much as v{champion.number} (serves dev)" in \
                summary or f"the candidate leans on `{name}` {ratio:.1f}×" in summary, (name, summary)
    chart = page.locator("#importance-chart")
    chart.scroll_into_view_if_needed()
    page.wait_for_function(DRAWN, arg=chart.element_handle(), timeout=30_000)
    assert page.locator("#importance-chart .barlayer .trace").count() == 2


# --- 2. Monitoring after a version switch -------------------------------------------------------------------------

def test_monitoring_shows_the_serving_version_and_switches_to_the_one_before(
        page: Any, live: ModelVersion, two_versions: list[ModelVersion],  # noqa: F811
        personas: dict[str, Any], log_rows: Callable[..., list[str]]) -> None:  # noqa: F811
    _columns, X, _y = reference_matrix()
    for minutes_ago in (30, 20, 10):
        log_rows(X[:40], at=timezone.now() - dt.timedelta(minutes=minutes_ago), outputs=[1] * 40, version=1)
    rollup_dirty()
    deploy_now(two_versions[1], personas["ds"])  # v2 replaces v1 in dev: nothing predicted by v2 yet

    _sign_in(page, "alex")
    page.click("nav.mainnav >> text=Monitoring")
    row = page.locator("[data-testid=portfolio-row]", has_text="churn")
    assert row.locator("[data-testid=portfolio-predictions]").inner_text() == "0", "v2's figures, not v1's 120"
    row.locator("a", has_text="churn").click()
    page.wait_for_selector("[data-testid=kpis]")
    api = _api(page, "/api/v1/models/churn/environments/dev/monitoring?range=1h")
    assert page.inner_text("[data-testid=showing-version]").startswith("Tiles, charts and tables below are v2's")
    assert page.inner_text("[data-testid=kpi-predictions]") == str(api["totals"]["predictions"]) == "0"
    assert page.inner_text("[data-testid=kpi-error-rate]") == "—"
    for empty in ("heatmap", "feature", "throughput", "predictions"):  # words, never an axis or a caption
        chart = page.locator(f"#chart-{empty}")
        chart.scroll_into_view_if_needed()
        page.wait_for_function("(el) => el.classList.contains('chart-empty')", arg=chart.element_handle())
        assert chart.locator(".main-svg").count() == 0, empty
    assert page.inner_text("#summary-feature") == "" and "Largest difference" not in page.inner_text("main")
    assert "v2 made no predictions here in this range" in page.inner_text("[data-testid=drift-empty]")
    document(page, "monitoring-serving-version")

    page.click("[data-testid=versions] a[data-version='1']")
    page.wait_for_url("**version=1*")
    before = _api(page, "/api/v1/models/churn/environments/dev/monitoring?range=1h&version=1")
    assert page.inner_text("[data-testid=kpi-predictions]") == str(before["totals"]["predictions"]) == "120"
    assert page.get_attribute("[data-testid=versions] a[aria-current=true]", "data-version") == "1"
    assert "which does not serve here now" in page.inner_text("[data-testid=showing-version]")
    heatmap = page.locator("#chart-heatmap")
    heatmap.scroll_into_view_if_needed()
    page.wait_for_selector("#chart-heatmap .main-svg")
    assert page.eval_on_selector("#chart-heatmap", "el => el.data[0].y.length") == len(before["heatmap"]["features"])
    drift_rows = page.locator("[data-testid=drift-row]").count()
    assert drift_rows == len(before["drift"]["features"]) + (1 if before["drift"]["prediction"] else 0)
    document(page, "monitoring-previous-version")
    assert page.console_errors == []


# --- 3. GDPR access and erasure -----------------------------------------------------------------------------------

def test_a_compliance_officer_answers_access_then_erasure_in_the_browser(
        page: Any, serving: Any, two_versions: list[ModelVersion], personas: dict[str, Any],  # noqa: F811
        tmp_path: Path, worker_factory: Any) -> None:
    services.version_explain(version_id=two_versions[0].pk)  # the task the scan enqueues: the explainer's background
    ids = _predict(serving, ["alice@example.org", "bob", "alice@example.org", "alice@example.org"])
    flush_predictions()
    _sign_in(page, "casey")
    page.click("nav.mainnav >> text=Data subjects")
    page.fill("#subject-id", "alice@example.org")
    page.click("[data-testid=subject-search] button[type=submit]")
    # A worker compiles the report (each decision explained in the sandbox): its page says so until it is ready.
    page.wait_for_selector("[data-testid=subject-report-job]")
    assert page.inner_text("[data-testid=subject-report-status]") in ("Waiting for a worker", "Explaining the decisions")
    worker_factory()
    page.wait_for_selector("[data-testid=subject-report]", timeout=120_000)
    api = _api(page, "/api/v1/gdpr/subjects/alice@example.org/export")
    assert page.inner_text("[data-testid=subject-hash]") == api["subject_hash"]
    assert page.inner_text("[data-testid=subject-predictions]") == str(len(api["predictions"])) == "3"
    assert page.locator("[data-testid=subject-rows] tbody tr").count() == 3
    with page.expect_download() as download:
        page.click("[data-testid=subject-download]")
    assert download.value.suggested_filename.startswith(f"subject-{api['subject_hash'][:12]}-")
    saved = tmp_path / "report.json"
    download.value.save_as(saved)
    report = json.loads(saved.read_text())
    assert sorted(p["id"] for p in report["predictions"]) == sorted(p["id"] for p in api["predictions"])
    # Why each decision came out as it did (issue 37), in the download and on the page: computed in the sandbox by
    # the version's explainer (here Kernel SHAP, a sampled estimate: each showing computes its own).
    columns = {c["name"] for c in two_versions[0].signature["inputs"]}
    for decision in report["predictions"]:
        why = decision["explanation"]
        assert why.get("version") == decision["version"] and len(why.get("top_features") or []) == 3, why
        assert {t["feature"] for t in why["top_features"]} <= columns and why["approximate"] is True, why
        assert why["summary"].startswith(f"Version 1 of churn decided {decision['output']}"), why
    cells = page.locator("[data-testid=subject-why]")
    assert cells.count() == 3
    for i in range(3):
        assert cells.nth(i).locator("li").count() == 3 and "shap.KernelExplainer" in cells.nth(i).inner_text()
    document(page, "gdpr-access")

    page.click("text=Erase this subject's data…")
    page.fill("#subject-id", "alice@example.org")
    page.click("[data-testid=erasure-start] button[type=submit]")
    page.wait_for_selector("[data-testid=erasure-confirm]")
    assert page.inner_text("[data-testid=confirm-predictions]") == "3"
    assert page.inner_text("[data-testid=confirm-subject-hash]") == api["subject_hash"]
    assert "churn in dev: 3" in page.inner_text("[data-testid=erasure-plan]")
    document(page, "gdpr-erasure-confirm")
    page.fill("#erasure-reason", "Request 2026-117")
    page.check("input[name=confirm]")
    page.click("[data-testid=erasure-submit]")
    page.wait_for_selector("[data-testid=erasure-receipt]")
    events = _api(page, "/api/v1/audit/events?action=gdpr.erasure")["results"]
    assert page.inner_text("[data-testid=receipt-hash]") == events[0]["hash"]
    assert page.inner_text("[data-testid=receipt-seq]") == f"#{events[0]['seq']}"
    assert page.inner_text("[data-testid=receipt-predictions]") == "3"
    document(page, "gdpr-erasure-receipt")
    after = _api(page, "/api/v1/gdpr/subjects/alice@example.org/export")
    assert after["predictions"] == [] and _api(page, "/api/v1/gdpr/subjects/bob/export")["predictions"][0]["id"] \
        == ids[1]
    assert page.console_errors == []


# --- 4. Rollback from the environment page ------------------------------------------------------------------------

def test_an_approver_rolls_stage_back_from_the_top_of_its_page(
        page: Any, personas: dict[str, Any], worker_factory: Any, tmp_path: Path) -> None:
    model = services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    v1 = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.9})
    promote_live(v1, "stage", personas)
    v2 = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.91}, c=0.5)
    second = promote_live(v2, "stage", personas)
    worker_factory()

    _sign_in(page, "alex")
    page.goto("/models/churn/environments/stage/")
    rollback_top = page.eval_on_selector("[data-testid=rollback]", "el => el.getBoundingClientRect().top")
    assert rollback_top < page.eval_on_selector("[data-testid=call-example]", "el => el.getBoundingClientRect().top")
    assert rollback_top < 900, "on the first screen"
    document(page, "environment-rollback")
    page.select_option("[data-testid=rollback-form] select[name=to_version]", str(v1.number))
    page.click("[data-testid=rollback-start]")
    page.wait_for_selector("[data-testid=rollback-confirm]")
    assert page.inner_text("[data-testid=rollback-from]") == "v2" and page.inner_text("[data-testid=rollback-to]") \
        == "v1"
    page.fill("#rollback-reason", "v2 answers slower than stage allows.")
    page.click("[data-testid=rollback-confirm-button]")
    page.wait_for_url("**/deployments/*/")
    page.locator("[data-testid=deployment-status]", has_text="Live").wait_for(timeout=120_000)
    assert page.inner_text("[data-testid=deployment-verb]") == "Rolled back"
    page.click("[data-testid=environment-link]")
    page.wait_for_url("**/environments/stage/")
    served = _api(page, "/api/v1/models/churn/")["environments"]["stage"]["champion"]
    assert page.inner_text("[data-testid=serving-now]") == f"v{served}" == "v1"
    assert "v2 answers slower" in page.inner_text("[data-testid=timeline]")

    page.goto("/promotions/?status=live")
    replaced = page.locator("tr", has_text="churn v2 → stage").locator("[data-testid=replaced]")
    assert replaced.inner_text() == "no longer serving: v1 serves now"
    page.goto(f"/promotions/{second.uid}/")
    assert "v1 serves stage now" in page.inner_text("[data-testid=promotion-replaced]")
    assert page.console_errors == []


# --- 5. Attribution drift on the monitoring page ------------------------------------------------------------------

def test_the_monitoring_page_shows_attribution_drift_as_the_api_has_it(
        page: Any, personas: dict[str, Any], tmp_path: Path) -> None:
    """Production rows whose one feature moved far from the reference: the serving version's own explainer (in the
    sandbox) gives that feature a larger share of attribution; the monitoring page's table shows each feature's
    share in the reference and in production, and the distance, as the monitoring API has them."""
    from sklearn.linear_model import LogisticRegression

    from monitoring import attribution
    from registry.models import EnvironmentState
    from tests.registry import files
    from tests.registry.serving.test_explain import body, client_for, live as live_version

    X, y = files._data()
    version = live_version("drifting", LogisticRegression(max_iter=5000).fit(X, y), tmp_path, personas)
    rows = X.head(200).sample(80, random_state=1)
    moved = X.columns[3]
    rows[moved] = X[moved].mean() + 30 * X[moved].std()
    assert client_for(personas["ds"]).post("/api/v1/serve/drifting/dev/invocations", body(rows),
                                           content_type="application/json").status_code == 200
    flush_predictions()
    record = attribution.measure(state=EnvironmentState.objects.select_related("model", "champion__version").get(
        model__name="drifting", environment="dev"))
    assert record.error == "" and record.rows == 80 and record.distance is not None, record.error

    _sign_in(page, "alex")
    page.goto("/models/drifting/environments/dev/monitoring")
    page.wait_for_selector("[data-testid=attribution-table]")
    api = _api(page, "/api/v1/models/drifting/environments/dev/monitoring")["attribution_drift"]
    assert api["version"] == version.number and api["rows"] == 80
    summary = page.inner_text("[data-testid=attribution-summary]")
    assert f"v{api['version']} over 80 production rows" in summary and f"distance {api['distance']:.3f}" in summary
    shown = page.locator("[data-testid=attribution-table] tbody tr")
    assert shown.count() == min(12, len(api["features"]))
    for i in range(shown.count()):
        feature = api["features"][i]
        assert shown.nth(i).locator("th").inner_text() == feature["name"]
        cells = shown.nth(i).locator("td").all_inner_texts()
        assert cells[:2] == [f"{round(feature['reference'] * 100)} %", f"{round(feature['production'] * 100)} %"]
        assert float(cells[2]) == pytest.approx(feature["change"], abs=6e-4)
    assert max(api["features"], key=lambda f: f["change"])["name"] == moved, "the moved feature gained the most"
    page.locator("[data-testid=attribution-drift]").scroll_into_view_if_needed()
    document(page, "monitoring-attribution-drift", section="[data-testid=attribution-drift]")
    assert page.console_errors == []
