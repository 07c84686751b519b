"""Monitoring fixtures: a model serving in dev with reference data, and prediction-log rows written the way the
flusher writes them, at chosen times."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from monitoring.flush import write_batches
from registry.models import ModelVersion
from tests.registry import files
from tests.registry.conftest import deploy_now, fresh_serving_cache, two_versions  # noqa: F401 - fixtures

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def live(two_versions: list[ModelVersion], personas: dict[str, Any]) -> ModelVersion:  # noqa: F811
    deploy_now(two_versions[0], personas["ds"])
    return two_versions[0]


def reference_matrix() -> tuple[list[str], np.ndarray, np.ndarray]:
    X, y = files._data()
    return list(X.columns), X.to_numpy(), y.to_numpy()


@pytest.fixture
def log_rows() -> Callable[..., list[str]]:
    """``log_rows(matrix, at=time, outputs=…, latencies=…, errors=…, role=…)`` → the prediction ids written."""

    def write(matrix: np.ndarray, *, at: dt.datetime, outputs: list[Any] | None = None,
              latencies: list[float] | None = None, errors: int = 0, role: str = "champion", version: int = 1,
              model: str = "churn", environment: str = "dev") -> list[str]:
        n = len(matrix)
        ids = [os.urandom(16).hex() for _ in range(n)]
        outputs = outputs if outputs is not None else [0] * n
        latencies = latencies if latencies is not None else [2.0] * n
        batches = []
        for i in range(n):  # one batch per row: each row keeps its own latency and error
            batches.append({"model": model, "environment": environment, "version": version, "role": role,
                            "ts": at.timestamp() + i * 0.001, "latency_ms": latencies[i], "request_id": "",
                            "error": "ValueError: bad row" if i < errors else "", "ids": [ids[i]],
                            "inputs": [matrix[i].tolist()], "outputs": [None if i < errors else outputs[i]],
                            "subjects": None})
        write_batches(batches)
        return ids

    return write
