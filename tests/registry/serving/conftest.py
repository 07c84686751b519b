"""The MLflow conformance suite's split: a module declaring ``CONFORMANCE_MODELS`` keeps only its models' tests."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The conformance files share their test functions (test_mlflow_conformance.py's ``SPLIT``); each keeps the
    cases of its own models, so that every (test, model, case) is collected once, in one file."""
    kept = []
    for item in items:
        models = getattr(getattr(item, "module", None), "CONFORMANCE_MODELS", None)
        callspec = getattr(item, "callspec", None)
        if models is not None and callspec is not None and callspec.params.get("name") not in models:
            continue
        kept.append(item)
    items[:] = kept
