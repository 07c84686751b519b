"""Batch scoring benchmark: the portal's job against the in-process limit and `mlflow models predict`, same file.

    .venv/bin/python bench/batch.py [--rows 1000000] [--repeat 3] [--workers 2]

Writes 1,000,000 rows x 20 numeric features as CSV (about 390 MB) and Parquet, trains a LogisticRegression saved as
an MLflow model, and for each format runs, REPEAT times in turn:
- the in-process limit: pyarrow read + the model's predict + pyarrow write of inputs plus predictions, one process;
- `mlflow models predict --env-manager local` (predictions only; CSV in, JSON out, as MLflow writes them);
- the portal: gunicorn (2 sync workers) and WORKERS Celery worker processes (prefork, concurrency 1 each) on
  PostgreSQL and Redis; the file is posted to `POST /api/v1/batch-jobs/` and the clock stops when the job reads
  `done` (its scored file, inputs plus prediction and prediction id, is then downloadable).
Prints medians, ratios and peak RSS (from /proc VmHWM, or wait4 for the one-shot commands). The prediction log is
filled after each job; the time it takes is reported separately (the next run waits for it).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = str(ROOT / ".venv" / "bin" / "python")
DB_URL = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/bench_batch")
BROKER = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/5")

from bench.serving import BENCH_USER  # noqa: E402
from bench.upload import free_port, peak_rss_mb, worker_pids  # noqa: E402
from portal.cli import MultipartStream  # noqa: E402

LIMIT = '''
import sys, time, joblib, pyarrow as pa, pyarrow.csv as pacsv, pyarrow.parquet as pq
src, dst, model_path = sys.argv[1:4]
model = joblib.load(model_path)
t0 = time.perf_counter()
table = pacsv.read_csv(src) if src.endswith(".csv") else pq.read_table(src)
predictions = model.predict(table.to_pandas())
table = table.append_column("prediction", pa.array(predictions))
pacsv.write_csv(table, dst) if dst.endswith(".csv") else pq.write_table(table, dst)
print("SECONDS", time.perf_counter() - t0)
'''

SETUP = BENCH_USER + '''
import shutil
archive = shutil.make_archive(str(work / "model"), "zip", root_dir=work / "mlflow-model")
model = services.model_register(name="bench-batch", team=team, actor=user)
version = services.version_upload(model=model, upload=LocalUpload(Path(archive), "model.zip"), reference=None,
                                  meta=services.UploadMetadata(), actor=user)
version = services.version_scan(version_id=version.pk)
assert version.status == "ready", version.status_detail
d = deployments.deployment_run(deployment_id=deployments.deployment_start(version=version, environment="dev",
                                                                           actor=user).pk)
assert d.status == "live", d.error
print("SERVING", d.serving_kind)
print("TOKEN", portal_services.token_create(user=user, name="bench", actor=user)[1])
'''


def build(work: Path, rows: int) -> tuple[Path, Path, Path, Path]:
    import joblib
    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    X, y = make_classification(n_samples=5000, n_features=20, random_state=0)
    columns = [f"x{i}" for i in range(20)]
    model = LogisticRegression(max_iter=1000).fit(pd.DataFrame(X, columns=columns), y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.sklearn.save_model(model, str(work / "mlflow-model"),
                                  input_example=pd.DataFrame(X[:3], columns=columns))
    joblib.dump(model, work / "model.joblib")
    data = np.random.default_rng(1).normal(size=(rows, 20))
    table = pa.table({c: data[:, i] for i, c in enumerate(columns)})
    pacsv.write_csv(table, work / "input.csv", pacsv.WriteOptions(quoting_style="none"))
    pq.write_table(table, work / "input.parquet", row_group_size=100_000)
    return work / "input.csv", work / "input.parquet", work / "model.joblib", work / "mlflow-model"


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of a one-shot command. The peak comes from /usr/bin/time, whose own
    child is forked small: Linux counts a child's resident size before exec, so wait4 here would report this
    (large) benchmark process instead."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr[-500:]}")
    peak = re.search(r"MAXRSS (\d+)", proc.stderr)
    return seconds, int(peak.group(1)) / 1024 if peak else float("nan"), proc.stdout


def portal_job(url: str, token: str, path: Path) -> tuple[float, dict[str, Any]]:
    body = MultipartStream({"model": "bench-batch", "env": "dev"}, {"file": path})
    headers = {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    response = requests.post(f"{url}/api/v1/batch-jobs/", data=body, headers={**headers,
                                                                              "Content-Type": body.content_type},
                             timeout=600)
    assert response.status_code == 202, response.text
    uid = response.json()["id"]
    while True:
        job = requests.get(f"{url}/api/v1/batch-jobs/{uid}/", headers=headers, timeout=30).json()
        if job["status"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if job["status"] != "done":
        raise SystemExit(f"the portal's job ended {job['status']}: {job['error']}")
    job["phases"] = phases(job, time.time() - seconds)
    return seconds, job


def phases(job: dict[str, Any], posted_at: float) -> str:
    """Where the time went: upload (request until the row exists), planning, scoring, assembly."""
    import datetime as dt

    def ts(value: str | None) -> float:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() if value else float("nan")

    first_chunk = min(ts(c["started_at"]) for c in job["chunks"])
    marks = [posted_at, ts(job["created_at"]), ts(job["started_at"]), first_chunk, ts(job["scored_at"]),
             ts(job["finished_at"])]
    names = ["upload", "queue", "plan", "score", "assemble"]
    return ", ".join(f"{n} {b - a:.2f}" for n, a, b in zip(names, marks, marks[1:]))


def wait_logged(url: str, token: str, job: dict[str, Any]) -> float:
    started = time.perf_counter()
    while True:
        current = requests.get(f"{url}/api/v1/batch-jobs/{job['id']}/", headers={"Authorization": f"Bearer {token}"},
                               timeout=30).json()
        if current["rows_logged"] >= current["rows_total"] - current["rows_failed"]:
            return time.perf_counter() - started
        time.sleep(0.5)


def check_result(url: str, token: str, job: dict[str, Any], fmt: str, model_path: Path, source: Path) -> float:
    """Share of rows whose portal prediction equals the model's own predict (the serving form may be ONNX)."""
    import io

    import joblib
    import numpy as np
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    response = requests.get(f"{url}/api/v1/batch-jobs/{job['id']}/result", headers={"Authorization": f"Bearer {token}"},
                            timeout=600)
    data = response.content
    table = pacsv.read_csv(io.BytesIO(data)) if fmt == "csv" else pq.read_table(io.BytesIO(data))
    inputs = pacsv.read_csv(source) if fmt == "csv" else pq.read_table(source)
    assert table.num_rows == inputs.num_rows, (table.num_rows, inputs.num_rows)
    expected = joblib.load(model_path).predict(inputs.to_pandas())
    return float(np.mean(table.column("prediction").to_numpy() == expected))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    base, name = DB_URL.rsplit("/", 1)
    for sql in (f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}"):
        subprocess.run(["psql", base + "/postgres", "-qc", sql], check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        csv_path, parquet_path, model_path, mlflow_dir = build(work, args.rows)
        sizes = {"csv": csv_path.stat().st_size, "parquet": parquet_path.stat().st_size}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTAL_", "DJANGO_"))}
        env.update(DATABASE_URL=DB_URL, CELERY_BROKER_URL=BROKER, PORTAL_DEBUG="1",
                   PORTAL_VAR_DIR=str(work / "var"), PORTAL_LOG_LEVEL="WARNING", MLFLOW_DISABLE_TELEMETRY="1",
                   PATH=f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}")
        subprocess.run(["redis-cli", "-u", BROKER, "flushdb"], check=True, capture_output=True)
        subprocess.run([PY, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        out = subprocess.run([PY, "manage.py", "shell", "-c", SETUP.replace("sys.argv[1]", repr(str(work)))],
                             cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
        token = re.search(r"TOKEN (\S+)", out).group(1)  # type: ignore[union-attr]
        serving = re.search(r"SERVING (\S+)", out).group(1)  # type: ignore[union-attr]

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        web = subprocess.Popen([PY, "-m", "gunicorn", "config.wsgi:application", "-w", "2", "-b", f"127.0.0.1:{port}",
                                "--timeout", "600", "--log-level", "warning"], cwd=ROOT, env=env,
                               start_new_session=True)
        workers = [subprocess.Popen([PY, "-m", "celery", "-A", "config", "worker", "--pool", "prefork",
                                     "--concurrency", "1", "--loglevel", "WARNING", "-n", f"bench{i}@%h",
                                     "--without-gossip", "--without-mingle"], cwd=ROOT, env=env,
                                    start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for i in range(args.workers)]
        results: dict[tuple[str, str], list[float]] = {}
        rss: dict[tuple[str, str], float] = {}
        extra: dict[str, Any] = {}
        try:
            for _ in range(300):
                try:
                    if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.2)
            time.sleep(5)  # the workers' imports
            for fmt, source in (("csv", csv_path), ("parquet", parquet_path)):
                for i in range(args.repeat):
                    seconds, peak, out = run_measured([PY, "-c", LIMIT, str(source), str(work / f"limit.{fmt}"),
                                                       str(model_path)], env)
                    results.setdefault(("limit", fmt), []).append(float(out.split()[-1]))
                    rss[("limit", fmt)] = max(rss.get(("limit", fmt), 0), peak)
                    seconds, peak, _out = run_measured(
                        [PY, "-m", "mlflow", "models", "predict", "-m", str(mlflow_dir), "-i", str(source), "-t",
                         "csv" if fmt == "csv" else "parquet", "-o", str(work / "mlflow-out.json"),
                         "--env-manager", "local"], env) if fmt == "csv" else (float("nan"), float("nan"), "")
                    results.setdefault(("mlflow", fmt), []).append(seconds)
                    rss[("mlflow", fmt)] = max(rss.get(("mlflow", fmt), 0), peak)
                    seconds, job = portal_job(url, token, source)
                    results.setdefault(("portal", fmt), []).append(seconds)
                    extra.setdefault(f"chunks-{fmt}", job["chunks_total"])
                    extra.setdefault(f"phases-{fmt}", []).append(job["phases"])
                    extra.setdefault(f"log-{fmt}", []).append(wait_logged(url, token, job))
                    if i == 0:
                        extra[f"agree-{fmt}"] = check_result(url, token, job, fmt, model_path, source)
            worker_rss = max(peak_rss_mb(p) for w in workers for p in [w.pid, *worker_pids(w.pid)])
            web_rss = max(peak_rss_mb(p) for p in worker_pids(web.pid))
        finally:
            for proc in (web, *workers):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)

    print(f"\n{args.rows:,} rows x 20 features; CSV {sizes['csv'] / 1e6:.0f} MB, Parquet {sizes['parquet'] / 1e6:.0f} MB;"
          f" LogisticRegression; portal serving form: {serving}; {args.workers} workers; median of {args.repeat}\n")
    print(f"{'':<40}{'CSV s':>9}{'peak MB':>9}{'Parquet s':>11}{'peak MB':>9}")
    labels = {"limit": "in-process limit (pyarrow+predict+write)", "mlflow": "mlflow models predict (local)",
              "portal": "portal job, submit to done"}
    med = {k: statistics.median(v) for k, v in results.items()}
    for key, label in labels.items():
        peak_csv = rss.get((key, "csv"), worker_rss if key == "portal" else 0)
        peak_pq = rss.get((key, "parquet"), worker_rss if key == "portal" else 0)
        print(f"{label:<40}{med[(key, 'csv')]:>9.2f}{peak_csv:>9.0f}{med[(key, 'parquet')]:>11.2f}{peak_pq:>9.0f}")
    print(f"\nportal / limit: CSV {med[('portal', 'csv')] / med[('limit', 'csv')]:.2f}x, Parquet "
          f"{med[('portal', 'parquet')] / med[('limit', 'parquet')]:.2f}x (target <= 1.5x)")
    print(f"mlflow / portal (CSV): {med[('mlflow', 'csv')] / med[('portal', 'csv')]:.2f}x faster (target > 1x, aim 2x)")
    print(f"portal worker peak RSS {worker_rss:.0f} MB (target < 500 MB); web worker peak RSS {web_rss:.0f} MB")
    print(f"chunks: CSV {extra['chunks-csv']}, Parquet {extra['chunks-parquet']}; predictions equal to the model's "
          f"own predict: CSV {100 * extra['agree-csv']:.3f} %, Parquet {100 * extra['agree-parquet']:.3f} %")
    print(f"prediction log filled after each job in (median) CSV {statistics.median(extra['log-csv']):.1f} s, "
          f"Parquet {statistics.median(extra['log-parquet']):.1f} s")
    for fmt in ("csv", "parquet"):
        print(f"portal phases ({fmt}, s):", " | ".join(extra[f"phases-{fmt}"]))
    print("all runs:", {f"{k[0]}/{k[1]}": [round(x, 2) for x in v] for k, v in results.items()})


if __name__ == "__main__":
    main()
