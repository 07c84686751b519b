"""A data scientist drops a CSV on the batch page, watches it score with a real worker and downloads the result."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import screenshot
from tests.browser.test_upload_journey import _drop, _sign_in
from tests.registry import files
from tests.registry.conftest import fresh_serving_cache, serving, two_versions  # noqa: F401 - fixtures

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_drop_a_csv_watch_it_score_and_download_it(page: Any, serving: Any, worker_factory: Any,  # noqa: F811
                                                   tmp_path: Path, settings: Any) -> None:
    settings.PORTAL_BATCH_CHUNK_BYTES = 256 * 1024  # the upload is cut into chunks as it arrives, in this process
    worker_factory()
    import pandas as pd

    X, _y = files._data()
    frame = pd.concat([X] * 8, ignore_index=True)  # 4,552 rows, about 1 MB: several chunks
    frame.insert(0, "customer", [f"c{i:05d}" for i in range(len(frame))])
    frame.iloc[7, 3] = None  # one bad row: reported, not fatal
    source = tmp_path / "customers.csv"
    frame.to_csv(source, index=False)

    _sign_in(page, "dana")
    page.goto("/models/churn/")
    page.click("[data-testid=batch-link]")
    # The page's script marks the zone once its handlers are bound: a file set before that fires a change event
    # nobody hears, and the button stays disabled.
    page.wait_for_selector("#batch-dropzone[data-ready]", state="attached")
    # A file without the model's columns is refused in the page, with the reason.
    bad = tmp_path / "wrong.csv"
    bad.write_text("customer,age\nc1,40\n")
    page.set_input_files("#batch-file", str(bad))
    page.click("#batch-button")
    page.locator("[data-testid=batch-submit-result]", has_text="lacks the model's input column").wait_for()
    page.console_errors.clear()  # the browser logs that refusal's 400; nothing else may fail from here on

    _drop(page, "#batch-dropzone", source)
    assert "customers.csv" in page.inner_text("[data-testid=batch-file-name]")
    page.click("#batch-button")
    page.wait_for_url("**/batch/*/", timeout=60_000)
    page.locator("[data-testid=batch-status]", has_text="Done").wait_for(timeout=120_000)
    assert page.eval_on_selector("[data-testid=batch-progress]", "p => p.value") == 100
    assert page.inner_text("[data-testid=batch-rows]").startswith(f"{len(frame):,} of {len(frame):,}")
    assert page.inner_text("[data-testid=batch-bad-rows]") == "1"
    assert page.locator("[data-testid=batch-chunk-table] tbody tr").count() >= 2
    # The worker logs the predictions after scoring; the counters follow without a reload, to a clear end.
    logged = len(frame) - 1
    page.locator("[data-testid=batch-state][data-final=true]").wait_for(timeout=120_000)
    assert page.inner_text("[data-testid=batch-state]") == (
        f"Done: {len(frame):,} rows scored, 1 bad row; all {logged:,} predictions logged for monitoring.")
    assert page.inner_text("[data-testid=batch-logged]") == f"{logged:,}"
    screenshot(page, "batch-done")
    with page.expect_download() as download:
        page.click("[data-testid=batch-result-link]")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [r["customer"] for r in rows] == frame["customer"].tolist()
    assert rows[7]["prediction"] == "" and rows[8]["prediction"] in ("0", "1")
    with page.expect_download() as download:
        page.click("[data-testid=batch-errors-link]")
    errors = Path(download.value.path()).read_text().splitlines()
    assert errors[1] == f"8,{frame.columns[3]},missing value"
    assert not page.console_errors, page.console_errors
