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
    page.wait_for_selector("[data-testid=activity-chart] .main-svg")
    screenshot(page, "audit-trail")
    page.click("table.events a >> nth=0")
    page.wait_for_selector("text=Before and after")
    assert "token.create" in page.inner_text("h1")
    page.go_back()
    with page.expect_download() as download:
        page.click("text=Download JSON Lines")
    export = tmp_path / "export.zip"
    download.value.save_as(export)
    page.click("summary >> text=Public key that signs exports")
    key = tmp_path / "key.pem"
    key.write_text(page.inner_text("[data-testid=public-key]").strip() + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "verify_export.py"), str(export),
                             "--public-key", str(key)], env=clean_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 5 events" in result.stdout
    assert page.console_errors == []
