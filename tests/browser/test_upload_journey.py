"""A data scientist drags an MLflow random forest onto the upload page; it reaches `ready` with MLflow's signature."""

from __future__ import annotations

import base64
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from portal.models import Team
from registry.versions import services
from tests.browser.conftest import screenshot
from tests.conftest import PASSWORD
from tests.registry import files

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _sign_in(page: Any, username: str) -> None:
    page.goto("/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("nav.mainnav")


WIDTHS = (1366, 1920)
# Only a page that never reaches the awaited state (a broken one) waits this long; a slow machine just waits longer
# than a fast one and still passes.
BROKEN_PAGE_MS = 300_000


def shoot(page: Any, name: str) -> list[Path]:
    """Full-page screenshots at the two desktop widths people use most."""
    paths = []
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        paths.append(screenshot(page, f"{name}-{width}"))
    return paths


def _drop(page: Any, selector: str, path: Path) -> None:
    """A real drop event carrying the file, as when a person drags it from their desktop."""
    data = base64.b64encode(path.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "application/zip"}));
            return dt;
        }""", [path.name, data])
    page.dispatch_event(selector, "dragenter", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def test_drag_and_drop_an_mlflow_forest_to_ready(page: Any, personas: dict[str, Any], celery_worker_process: str,
                                                 tmp_path: Path) -> None:
    team = Team.objects.get(slug="acme")
    services.team_trust_type(team=team, type_name="sklearn.tree._tree.Tree", actor=personas["approver1"],
                             reason="Forests trained by our own pipeline.")
    _sign_in(page, "dana")
    page.click("nav.mainnav >> text=Models")
    page.click("text=Register a model")
    page.fill("#id_name", "tumour-forest")
    page.select_option("#id_team", "acme")
    page.click("main button[type=submit]")
    page.wait_for_selector("#dropzone")

    archive = files.mlflow_zip(tmp_path, n_estimators=20)
    _drop(page, "#dropzone", archive)
    assert archive.name in page.inner_text("[data-testid=file-name]")
    page.set_input_files("#reference", str(files.reference_csv(tmp_path / "reference.csv")))
    typed = {"#metrics": '{"accuracy": "high"}', "#sensitive_columns": '{"postcode": "secret"}',
             "#description": "Twenty trees, balanced classes.", "#git_commit": "4f2a9c1", "#source": "nightly run"}
    for selector, value in typed.items():
        page.fill(selector, value)
    # Refused before anything is stored: every problem at once, and every field as it was typed.
    page.click("#upload-button")
    page.wait_for_selector("[data-testid=upload-problems]")
    problems = page.locator("[data-testid=upload-problems] li").all_inner_texts()
    assert [p.split(":")[0] for p in problems] == ["metrics", "sensitive_columns"], problems
    for selector, value in typed.items():
        assert page.input_value(selector) == value, selector
    assert archive.name in page.inner_text("[data-testid=file-name]"), "the chosen file is kept too"
    shoot(page, "upload-refused-metadata")
    page.fill("#metrics", '{"accuracy": 0.96}')
    page.fill("#sensitive_columns", '{"postcode": "personal"}')
    page.click("#upload-button")
    page.locator("[data-testid=final-status]", has_text="postcode is not among the inputs of the model").wait_for()
    page.fill("#sensitive_columns", '{"mean radius": "health"}')
    page.click("#upload-button")
    page.wait_for_selector("[data-testid=final-status]", timeout=120_000)
    page.locator("[data-testid=final-status]", has_text="is ready").wait_for(timeout=120_000)
    assert page.eval_on_selector("[data-testid=progress]", "p => p.value") == 100
    screenshot(page, "upload-ready")
    page.click("[data-testid=final-status] a")
    page.wait_for_selector("[data-testid=signature]")
    assert page.url.endswith("/models/tumour-forest/versions/1/"), "the refused tries took no version number"
    assert page.inner_text("[data-testid=version-status]") == "Ready"
    profile = page.locator("[data-testid=reference-profile] tbody tr")
    assert profile.count() == 31  # 30 inputs and the target column
    assert profile.first.locator("th").inner_text() == "mean radius"

    # Tags: a bad one is refused with what was typed kept; then saved.
    page.click("text=Edit this version's tags")
    page.fill("[data-testid=version-tags-form] input[name=tags]", "candidate, <b>")
    page.click("[data-testid=version-tags-form] button")
    page.wait_for_selector("#version-tags-error")
    assert page.input_value("[data-testid=version-tags-form] input[name=tags]") == "candidate, <b>"
    page.fill("[data-testid=version-tags-form] input[name=tags]", "candidate, trees")
    page.click("[data-testid=version-tags-form] button")
    page.wait_for_selector(".messages >> text=Tags saved.")
    assert page.inner_text("[data-testid=version-tags]") == "Tags: candidate trees"
    shoot(page, "version-detail")
    page.click("nav.mainnav >> text=Models")
    row = page.locator("[data-testid=model-list] tr[data-model=tumour-forest]")
    assert "not live" in row.locator("[data-testid=live]").inner_text()
    shoot(page, "model-list")

    with zipfile.ZipFile(archive) as z:
        mlmodel = yaml.safe_load(z.read("MLmodel"))
    mlflow_inputs = [c["name"] for c in json.loads(mlmodel["signature"]["inputs"])]
    page.goto("/models/tumour-forest/versions/1/")
    shown = page.locator("[data-testid=signature] tbody td:first-child").all_inner_texts()
    assert [name.removesuffix(" health data") for name in shown] == mlflow_inputs
    assert not [e for e in page.console_errors if "status of 400" not in e], page.console_errors


def test_a_refused_upload_explains_itself_in_the_page(page: Any, personas: dict[str, Any], tmp_path: Path,
                                                      transactional_db: None) -> None:
    services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    _sign_in(page, "dana")
    page.goto("/models/churn/upload")
    evil = tmp_path / "model.pkl"
    evil.write_bytes(files.pickle_builtins_eval())
    # By keyboard: the drop zone is no focus stop of its own; its button is, and Enter opens the file dialog.
    assert page.get_attribute("#dropzone", "tabindex") is None
    page.wait_for_selector("#dropzone[data-ready]", state="attached")
    # Waits follow the page's state, not a clock: the file input notes that it was opened (what makes the browser
    # show its file dialog), and the test then answers that dialog by giving the input its file.
    page.evaluate("document.getElementById('file').addEventListener('click', "
                  "() => { document.body.dataset.filePicker = 'opened'; })")
    page.focus("#dropzone button.pick-file")
    page.wait_for_function("document.activeElement && document.activeElement.matches('#dropzone button.pick-file')")
    page.keyboard.press("Enter")
    page.wait_for_selector("body[data-file-picker=opened]", state="attached", timeout=BROKEN_PAGE_MS)
    page.set_input_files("#file", str(evil))
    page.wait_for_function("document.getElementById('upload-button').disabled === false")
    assert "model.pkl" in page.inner_text("[data-testid=file-name]")
    page.click("#upload-button")
    page.wait_for_selector("[data-testid=final-status]")
    text = page.inner_text("[data-testid=upload-result]")
    assert "refused" in text and "builtins.eval" in text
    screenshot(page, "upload-refused")
