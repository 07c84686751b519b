"""The sandboxed host's per-request overhead over the model's own predict, without HTTP or a database.

    PORTAL_VAR_DIR=/tmp/hop-var .venv/bin/python bench/host_overhead.py [CALLS]

An MLflow logistic regression and a 200-tree forest (20 features), each in a real bubblewrap model host, called
with one row, interleaved in blocks of 100: ``predict_frame`` (a numeric request as one float64 frame, answered as
MLflow's server would), ``predict`` (the matrix op), ``invoke`` (MLflow's own scoring code on a one-row
``dataframe_split`` body: what such a request cost before frames), an empty ping frame, the estimator's own
``predict`` on the bare array in this process, and the shortcut the host proves and then runs for finite rows
(``child.fast_predictor``: a forest's trees summed without joblib, a linear classifier's scores without its input
validation) in this process. The host's overhead is the frame's median minus the shortcut's (what the host itself
computes); the frame's median minus the estimator's own ``predict`` is what a caller gains or loses against
calling the estimator in-process.
"""
# ruff: noqa: B023 - each closure is called only within its own iteration of the models loop
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
import django

django.setup()
import mlflow.sklearn  # noqa: E402
import orjson  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.datasets import make_classification  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from registry.sandbox import hosts  # noqa: E402
from registry.sandbox.child import FRAME_HEADER, fast_predictor  # noqa: E402

warnings.simplefilter("ignore")
X, y = make_classification(n_samples=2000, n_features=20, random_state=0)
columns = [f"x{i}" for i in range(20)]
frame = pd.DataFrame(X, columns=columns)
row = X[:1].copy()
body = orjson.dumps({"dataframe_split": {"columns": columns, "data": row.tolist()}})
work = Path(tempfile.mkdtemp())
for kind in ("lr", "forest"):
    model = (LogisticRegression(max_iter=1000).fit(frame, y) if kind == "lr" else
             RandomForestClassifier(n_estimators=200, random_state=0, n_jobs=1).fit(frame, y))
    extra = {} if kind == "lr" else {"skops_trusted_types": ["sklearn.tree._tree.Tree"]}
    mlflow.sklearn.save_model(model, str(work / kind), input_example=frame.head(3), **extra)
    def mat(dest, kind=kind):
        shutil.copytree(work / kind, dest / "model")
        return "mlflow", dest / "model", {"trusted_types": ["sklearn.tree._tree.Tree"]}
    host = hosts.ModelHost(f"hop-{kind}", mat, label=kind)
    kinds = ["double"] * 20
    host.predict_frame(row, columns, kinds, timeout=120)
    ping_header = orjson.dumps({"op": "ping"})
    def ping():
        with host._lock:
            host._sock.sendall(FRAME_HEADER.pack(len(ping_header)) + ping_header)
            host._receive(5)
    subjects = {
        "host frame (predict_frame)": lambda: host.predict_frame(row, columns, kinds, timeout=5),
        "host matrix (predict)": lambda: host.predict(row, columns, timeout=5),
        "host MLflow invoke (JSON body)": lambda: host.invoke(body, "application/json", timeout=5),
        "host empty ping": ping,
        "in-process estimator.predict(ndarray)": lambda: model.predict(row),
    }
    shortcut, why = fast_predictor(model, row)
    if shortcut is not None:
        subjects["in-process proven shortcut (fast_predictor)"] = lambda: shortcut(row)
    else:
        print(f"{kind}: no shortcut ({why})")
    samples: dict[str, list[int]] = {k: [] for k in subjects}
    for fn in subjects.values():
        for _ in range(50):
            fn()
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    for _ in range(max(1, calls // 100)):
        for k, fn in subjects.items():
            for _ in range(100):
                t0 = time.perf_counter_ns()
                fn()
                samples[k].append(time.perf_counter_ns() - t0)
    med = {k: statistics.median(v) / 1000 for k, v in samples.items()}
    print(f"\n{kind}: median microseconds per 1-row call ({calls} calls each, interleaved in blocks of 100)")
    for k, v in med.items():
        print(f"  {k:<40}{v:>9.0f}")
    own = med["in-process estimator.predict(ndarray)"]
    host_own = med.get("in-process proven shortcut (fast_predictor)", own)
    print(f"  {'overhead: frame - what the host computes':<40}{med['host frame (predict_frame)'] - host_own:>9.0f}"
          "   (target < 150)")
    print(f"  {'frame - estimator.predict':<40}{med['host frame (predict_frame)'] - own:>9.0f}")
    print(f"  {'overhead: invoke - estimator.predict':<40}{med['host MLflow invoke (JSON body)'] - own:>9.0f}")
    host.stop()
print(os.popen("uptime").read().strip())  # noqa: S605 - the load average beside the figures
