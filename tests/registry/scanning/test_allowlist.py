"""The committed list of allowed model classes matches the installed libraries."""

from __future__ import annotations

import subprocess
import sys

from registry.scanning.allowlist import LIST_FILE, allowed_classes
from tests.conftest import ROOT


def test_the_committed_allowlist_matches_the_installed_libraries() -> None:
    code = "from registry.scanning.allowlist import generate; print('\\n'.join(generate()))"
    fresh = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           timeout=300).stdout.split()
    committed = sorted(allowed_classes())
    assert fresh == committed, (
        f"{LIST_FILE.name} is stale: run `.venv/bin/python -m registry.scanning.allowlist` and commit it "
        f"(new: {sorted(set(fresh) - set(committed))[:5]}, gone: {sorted(set(committed) - set(fresh))[:5]})")


def test_the_allowlist_holds_model_classes_and_no_functions() -> None:
    allowed = allowed_classes()
    assert "sklearn.linear_model._logistic:LogisticRegression" in allowed
    assert "sklearn.tree._tree:Tree" in allowed
    assert not any(name.endswith(":fetch_openml") or name.endswith(":load_breast_cancer") for name in allowed)
