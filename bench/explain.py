"""Explanation latency: the portal's explain path beside ``shap.TreeExplainer`` called directly, in one process.

    .venv/bin/python bench/explain.py [--trees 200] [--depth 8] [--requests 300] [--batch 1000]

One model: a scikit-learn random forest of ``--trees`` trees (depth ``--depth``) on 30 numeric features (scikit-learn's
breast-cancer table), saved with joblib as an upload would be.

- **the serving path**: what ``POST /explain`` does once it has parsed the body: ``LoadedModel.explain`` through a
  bubblewrap-sandboxed model host (``registry.sandbox.hosts``: the joblib file bound read-only, the rows and the
  background as one float64 frame over the Unix socket, TreeExplainer run inside, the answer checked for shape on
  the way back). The host is started and warmed first (its cold start, loading the model and importing shap, is
  reported apart);
- **shap directly**: ``shap.TreeExplainer(model).shap_values(rows)`` in this process on the same model object
  loaded from the same file, plus the model's ``predict`` (the endpoint answers the prediction too).

For each: ``--requests`` one-row calls (p50 and p99 of the per-call time: a row's latency), then calls of
``--batch`` rows (rows per second). Prints the machine's load average before and after: the figures are only as
quiet as the machine was. The sandbox's limits (address space, CPU watchdog) are those of ``config.settings``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("PORTAL_DEBUG", "1")  # as the other benches: no secret key needed, nothing served over HTTP


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(name: str, one_row: list[float], batch_seconds: list[float], batch: int) -> str:
    rows_per_second = batch / statistics.median(batch_seconds)
    return (f"{name:<34} p50 {percentile(one_row, 50) * 1000:8.2f} ms  p99 {percentile(one_row, 99) * 1000:8.2f} ms"
            f"  per row; {batch}-row calls: {rows_per_second:10,.0f} rows/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()

    import django

    django.setup()
    import joblib
    import numpy as np
    import shap
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier

    from registry.sandbox import hosts

    print(f"load average before: {os.getloadavg()}")
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    model = RandomForestClassifier(n_estimators=args.trees, max_depth=args.depth, random_state=0, n_jobs=1).fit(X, y)
    work = Path(tempfile.mkdtemp(prefix="bench-explain-"))
    joblib.dump(model, work / "forest.joblib")
    columns = list(X.columns)
    rng = np.random.default_rng(0)
    rows = X.to_numpy()[rng.integers(len(X), size=max(args.requests, args.batch))]
    batch_rows = np.resize(rows, (args.batch, rows.shape[1]))

    def materialise(folder: Path) -> tuple[str, Path, dict[str, Any]]:
        local = folder / "model.joblib"
        os.link(work / "forest.joblib", local)
        return "joblib", local, {"trusted_types": []}

    host = hosts.ModelHost("bench-explain", materialise, label="bench explain host")
    started = time.perf_counter()
    host.explain(rows[:1], None, columns, budget=5.0, timeout=120.0)
    cold = time.perf_counter() - started
    for i in range(20):  # warm
        host.explain(rows[i:i + 1], None, columns, budget=5.0, timeout=30.0)
    served: list[float] = []
    for i in range(args.requests):
        t = time.perf_counter()
        answer = host.explain(rows[i:i + 1], None, columns, budget=5.0, timeout=30.0)
        served.append(time.perf_counter() - t)
    served_batch = []
    for _ in range(args.batches):
        t = time.perf_counter()
        answer = host.explain(batch_rows, None, columns, budget=5.0, timeout=120.0)
        served_batch.append(time.perf_counter() - t)
    assert answer["approximate"] is False and len(answer["rows"]) == args.batch
    host.stop()

    loaded = joblib.load(work / "forest.joblib")
    explainer = shap.TreeExplainer(loaded)
    frame_rows = X.iloc[:0]._constructor(rows, columns=columns)
    frame_batch = X.iloc[:0]._constructor(batch_rows, columns=columns)
    for i in range(20):
        explainer.shap_values(frame_rows.iloc[i:i + 1], check_additivity=False)
    direct: list[float] = []
    for i in range(args.requests):
        t = time.perf_counter()
        explainer.shap_values(frame_rows.iloc[i:i + 1], check_additivity=False)
        loaded.predict(frame_rows.iloc[i:i + 1])
        direct.append(time.perf_counter() - t)
    direct_batch = []
    for _ in range(args.batches):
        t = time.perf_counter()
        explainer.shap_values(frame_batch, check_additivity=False)
        loaded.predict(frame_batch)
        direct_batch.append(time.perf_counter() - t)

    print(f"forest: {args.trees} trees, depth {args.depth}, {len(columns)} features; "
          f"{args.requests} one-row calls, {args.batches} calls of {args.batch} rows each")
    print(f"sandboxed host cold start (load + import shap + first explanation): {cold:.2f} s")
    print(summary("serving path (sandboxed host)", served, served_batch, args.batch))
    print(summary("shap.TreeExplainer in-process", direct, direct_batch, args.batch))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
