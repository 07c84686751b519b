"""Edge packages: size and latency per row of the fp32 and int8 forms beside the portal's served path, in one run.

    .venv/bin/python bench/edge.py [--features 32] [--trees 100] [--requests 2000] [--batch 1000]

Two models, each saved with joblib as an upload would be, converted to ONNX in the bubblewrap sandbox as a deployment
and an edge build do it (``registry.sandbox.prepare_serving``) and proven here on the reference rows and probes
(``registry.deployments.services._prove``):

- a scikit-learn logistic regression on ``--features`` standardised features (its float64 MatMul quantizes to int8);
- an XGBoost classifier of ``--trees`` trees (a tree ensemble: onnxruntime's dynamic quantization leaves it float,
  and the package says so).

For each model and form, in this one process and on the same rows:

- **served**: the portal's in-process predictor (``registry.serving.runtime.load_onnx_predictor``: the graph review,
  one onnxruntime thread, the arena cap, a deadline per run), the path web workers answer ``/invocations`` with once
  the request is parsed;
- **edge fp32** and **edge int8**: the package's own runner (``portal_edge.Runner.predict``, what a device runs),
  after the package is written, signed and verified.

Prints each form's file size and the zipped package's size, p50 and p99 of ``--requests`` one-row calls, and rows
per second in calls of ``--batch`` rows; then each edge form's ratio to the served path. Also the machine's load
average before and after: the figures are only as quiet as the machine was.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("PORTAL_DEBUG", "1")  # as the other benches: generated keys, nothing served over HTTP


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def timed(predict: Any, rows: Any, batch: Any, requests: int, batches: int) -> dict[str, float]:
    for i in range(50):
        predict(rows[i % len(rows):i % len(rows) + 1])
    one = []
    for i in range(requests):
        t = time.perf_counter()
        predict(rows[i % len(rows):i % len(rows) + 1])
        one.append(time.perf_counter() - t)
    many = []
    for _ in range(batches):
        t = time.perf_counter()
        predict(batch)
        many.append(time.perf_counter() - t)
    return {"p50": percentile(one, 50) * 1000, "p99": percentile(one, 99) * 1000,
            "rows_per_s": len(batch) / statistics.median(many)}


def convert(name: str, estimator: Any, X: Any, work: Path) -> tuple[Path, Any]:
    """The sandbox's ONNX form, proven here as a deployment proves it."""
    import joblib
    import numpy as np

    from registry import sandbox
    from registry.deployments.services import _prove

    bundle = work / name / "bundle"
    bundle.mkdir(parents=True)
    joblib.dump(estimator, bundle / "model.joblib")
    reference = X.to_numpy(dtype=np.float64)[:500]
    np.save(bundle / "portal-reference.npy", reference, allow_pickle=False)
    out = work / name / "out"
    out.mkdir()
    example = reference[:5].tolist()
    result = sandbox.prepare_serving("joblib", bundle, {"columns": list(X.columns), "rows": example,
                                                        "trusted_types": [], "reference": "portal-reference.npy"},
                                     out=out)
    assert result.ok and result.data.get("kind") == "onnx", (result.error, result.data.get("reason"))
    proof = _prove(out / "serving.onnx", out, result.data, reference=reference, example=example)
    assert proof.passed, proof.summary()
    return out / "serving.onnx", reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()

    import django

    django.setup()
    import numpy as np
    import pandas as pd
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from xgboost import XGBClassifier

    from registry.edge import package as edge_package
    from registry.edge.portal_edge import Runner
    from registry.serving.runtime import load_onnx_predictor

    print(f"load average before: {os.getloadavg()}")
    X, y = make_classification(n_samples=4000, n_features=args.features, n_informative=args.features // 2,
                               random_state=0)
    X = pd.DataFrame(X, columns=[f"x{i}" for i in range(args.features)])
    models = {"logistic regression": LogisticRegression(max_iter=1000).fit(X, y),
              f"xgboost ({args.trees} trees)": XGBClassifier(n_estimators=args.trees, max_depth=6, n_jobs=1).fit(X, y)}
    work = Path(tempfile.mkdtemp(prefix="bench-edge-"))
    rng = np.random.default_rng(0)
    rows = X.to_numpy()[rng.integers(len(X), size=args.requests)]
    batch = np.resize(rows, (args.batch, rows.shape[1]))
    for index, (name, estimator) in enumerate(models.items()):
        folder = work / f"m{index}"
        fp32_path, reference = convert(f"m{index}", estimator, X, work)
        truth = np.asarray(y[:len(reference)], dtype=object)
        fp32_answers, fp32 = edge_package.measure(fp32_path, reference, truth, quantized=False)
        forms = [fp32]
        int8_path = folder / "model.int8.onnx"
        note = edge_package.quantized_graph(fp32_path, int8_path)
        if not note:
            _answers, int8 = edge_package.measure(int8_path, reference, truth, quantized=True)
            forms.append(int8)
        version = types.SimpleNamespace(model=types.SimpleNamespace(name=f"bench-{index}"), number=1,
                                        artifact_sha256="-", signature={})
        example = {"dataframe_split": {"columns": list(X.columns), "data": reference[:2].tolist()}}
        built = edge_package.write_package(version=version, package_uid="bench", work=folder, forms=forms,
                                           columns=list(X.columns), example=example, proof="bench", int8_note=note,
                                           missing_values=False, task="classification")
        package_root = next((folder / "package").iterdir())
        served = timed(load_onnx_predictor(fp32_path), rows, batch, args.requests, args.batches)
        print(f"\n{name}, {args.features} features; package {built.zip_path.stat().st_size / 1024:,.1f} KiB zipped")
        print(f"  {'form':<22}{'file':>12}{'accuracy':>10}{'p50 ms':>10}{'p99 ms':>10}{'rows/s':>14}{'p50 ratio':>11}")
        print(f"  {'served (in-process)':<22}{fp32_path.stat().st_size / 1024:>10,.1f}Ki"
              f"{fp32.metrics.get('accuracy', float('nan')):>10.4f}{served['p50']:>10.4f}{served['p99']:>10.4f}"
              f"{served['rows_per_s']:>14,.0f}{1.0:>11.2f}")
        for form in forms:
            runner = Runner(package_root, form=form.name, trusted_key=None)
            figures = timed(lambda m, r=runner: r.predict(m.tolist()), rows, batch, args.requests, args.batches)
            print(f"  {'edge ' + form.name:<22}{(package_root / form.file).stat().st_size / 1024:>10,.1f}Ki"
                  f"{form.metrics.get('accuracy', float('nan')):>10.4f}{figures['p50']:>10.4f}{figures['p99']:>10.4f}"
                  f"{figures['rows_per_s']:>14,.0f}{figures['p50'] / served['p50']:>11.2f}")
        if note:
            print(f"  int8: {note}")
        del fp32_answers
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
