"""A compliance officer filters the audit trail, sees the activity chart, opens an event, downloads an export and
the public key, and the standalone verifier accepts the export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from portal import services
from tests.browser.conftest import screenshot
from tests.browser.test_upload_journey import _sign_in
from tests.conftest import ROOT, clean_env

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_a_compliance_officer_exports_and_verifies_the_trail(page: Any, personas: dict[str, Any],
                                                             tmp_path: Path) -> None:
    for i in range(5):
        services.token_create(user=personas["ds"], name=f"pipeline {i}", actor=personas["ds"])
    _sign_in(page, "casey")
    page.click("nav.mainnav >> text=Audit trail")
    page.fill("#id_action", "token")
    page.click("form.filters button[type=submit]")
    page.locator("[data-testid=activity-chart]").scroll_into_view_if_needed()  # charts draw near the viewport
    page.wait_for_selector("[data-testid=activity-chart] .main-svg")
    colours = page.eval_on_selector("#activity-chart", "el => el.data.map((t) => t.marker.color)")
    assert len(set(colours)) == len(colours)  # a colour per kind
    assert page.locator(".modebar").count() == 0
    assert "events from" in page.inner_text("[data-testid=activity-summary]")
    screenshot(page, "audit-trail")
    page.click("table.events a >> nth=0")
    page.wait_for_selector("text=Before and after")
    assert "token.create" in page.inner_text("h1")
    page.go_back()
    with page.expect_download() as download:
        page.click("text=Download JSON Lines")
    export = tmp_path / "export.zip"
    download.value.save_as(export)
    with page.expect_download() as csv_download:  # the same second, the other format: another file name
        page.click("text=Download CSV")
    names = [download.value.suggested_filename, csv_download.value.suggested_filename]
    assert names[0].endswith("-jsonl.zip") and names[1].endswith("-csv.zip") and names[0] != names[1], names
    page.click("summary >> text=Public key that signs exports")
    key = tmp_path / "key.pem"
    key.write_text(page.inner_text("[data-testid=public-key]").strip() + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "verify_export.py"), str(export),
                             "--public-key", str(key)], env=clean_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 5 events" in result.stdout
    assert page.console_errors == []
