"""Batch scoring benchmark: the portal's job against the single-process pyarrow limit and `mlflow models predict`,
on the same file, for a logistic regression and a 200-tree random forest, in one run.

    .venv/bin/python bench/batch.py [--rows 1000000] [--repeat 3] [--workers 2] [--models lr,forest]
                                    [--forms onnx,host] [--formats csv,parquet] [--no-log]

Writes ROWS rows x 20 numeric features as CSV (about 390 MB at 1M rows) and Parquet, trains each model on 5,000
rows and saves it with MLflow (the forest with skops, as MLflow 3 does, trusted by an approver as the portal asks),
and for each model and format runs, REPEAT times in turn:
- the in-process limit: one process reading with pyarrow, the model's own predict, pyarrow writing inputs plus
  predictions;
- `mlflow models predict --env-manager local` (CSV in, JSON predictions out, as MLflow writes them);
- the portal, for each serving form: gunicorn (2 sync workers) and WORKERS Celery worker processes (prefork,
  concurrency 1 each) on PostgreSQL and Redis; the file is posted to `POST /api/v1/batch-jobs/` and the clock stops
  when the job reads `done` (its scored file, inputs plus prediction and prediction id, is then downloadable). One
  unmeasured job per deployment first (200,000 rows): workers keep their sandboxed hosts between jobs, so a host's
  start is not counted against every job.
  Forms: `onnx`, the deployment's own choice (the in-process ONNX form, proven exact on the reference rows and
  probes); `host`, the same MLflow archive deployed as a model that leaves the fast path is (MLflow's scoring code
  in a sandboxed host): in this set-up process only, the deployment's "prepare the serving form" step answers
  ("mlflow", None), what it answers for a model it cannot prove; the rest is the real deployment.

Prints medians and ratios; for each portal job the phases from its timestamps (upload, queue, plan, score,
assemble) and the chunks' stages summed over chunks (read, parse, model, format, write: worker seconds, so with two
workers about twice the wall time of the score phase when both are busy all the time); the share of the result's
predictions equal to the model's own predict; peak RSS of each Celery worker process and of the model hosts.
Report `uptime`'s load average beside every figure (printed at the start and the end).
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
from portal.client import MultipartStream  # noqa: E402

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

# One deployment per (model, form): NAME, FOLDER and FORM are filled in.
SETUP = BENCH_USER + '''
import shutil
approver, _ = User.objects.get_or_create(username="bench-approver")
approver.groups.add(Group.objects.get(name="approver"))
Membership.objects.get_or_create(team=team, user=approver)
archive = shutil.make_archive(str(work / "NAME"), "zip", root_dir=work / "FOLDER")
model = services.model_register(name="NAME", team=team, actor=user)
version = services.version_upload(model=model, upload=LocalUpload(Path(archive), "model.zip"), reference=None,
                                  meta=services.UploadMetadata(), actor=user)
if version.trust_state == "pending":
    version = services.version_trust_decide(version=version, trust=True, reason="scikit-learn's own tree storage",
                                            actor=approver)
version = services.version_scan(version_id=version.pk)
assert version.status == "ready", version.status_detail
real_prepare = deployments._prepare
if "FORM" == "host":
    def leaves_the_fast_path(deployment, tmp):
        deployments._step(deployment, 45, "bench/batch.py measures MLflow's scoring code in a sandboxed host.")
        return "mlflow", None
    deployments._prepare = leaves_the_fast_path
try:
    d = deployments.deployment_run(deployment_id=deployments.deployment_start(version=version, environment="dev",
                                                                               actor=user).pk)
finally:
    deployments._prepare = real_prepare
assert d.status == "live", d.error
print("SERVING", d.serving_kind)
'''
TOKEN = BENCH_USER + '''
print("TOKEN", portal_services.token_create(user=user, name="bench", actor=user)[1])
'''
WORKERS = 2  # set from --workers
MODELS = {"lr": "LogisticRegression", "forest": "RandomForestClassifier(200 trees)"}
STAGES = ("read", "parse", "model", "format", "write")


def build(work: Path, rows: int, models: list[str]) -> tuple[Path, Path, Path]:
    import joblib
    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    X, y = make_classification(n_samples=5000, n_features=20, random_state=0)
    columns = [f"x{i}" for i in range(20)]
    frame = pd.DataFrame(X, columns=columns)
    for name in models:
        if name == "lr":
            model: Any = LogisticRegression(max_iter=1000).fit(frame, y)
            extra: dict[str, Any] = {}
        else:
            model = RandomForestClassifier(n_estimators=200, random_state=0, n_jobs=1).fit(frame, y)
            extra = {"skops_trusted_types": ["sklearn.tree._tree.Tree"]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.sklearn.save_model(model, str(work / f"mlflow-{name}"), input_example=frame.head(3), **extra)
        joblib.dump(model, work / f"{name}.joblib")
    data = np.random.default_rng(1).normal(size=(rows, 20))
    table = pa.table({c: data[:, i] for i, c in enumerate(columns)})
    pacsv.write_csv(table, work / "input.csv", pacsv.WriteOptions(quoting_style="none"))
    pq.write_table(table, work / "input.parquet", row_group_size=100_000)
    pacsv.write_csv(table.slice(0, 200_000), work / "warmup.csv", pacsv.WriteOptions(quoting_style="none"))
    return work / "input.csv", work / "input.parquet", work / "warmup.csv"


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


def portal_job(url: str, token: str, model: str, path: Path) -> tuple[float, dict[str, Any]]:
    body = MultipartStream({"model": model, "env": "dev"}, {"file": path})
    headers = {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    response = requests.post(f"{url}/api/v1/batch-jobs/", data=body, headers={**headers,
                                                                              "Content-Type": body.content_type},
                             timeout=1200)
    assert response.status_code == 202, response.text
    uid = response.json()["id"]
    while True:
        job = requests.get(f"{url}/api/v1/batch-jobs/{uid}/", headers=headers, timeout=30).json()
        if job["status"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if job["status"] != "done":
        raise SystemExit(f"the portal's job for {model} ended {job['status']}: {job['error']}")
    job["phases"] = phases(job, time.time() - seconds)
    job["busy"] = busy_share(job)
    job["stages"] = {s: sum(float((c.get("stage_seconds") or {}).get(s, 0.0)) for c in job["chunks"])
                     for s in STAGES}
    return seconds, job


def ts(value: str | None) -> float:
    """An API timestamp as epoch seconds (NaN for none)."""
    import datetime as dt

    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() if value else float("nan")


def phases(job: dict[str, Any], posted_at: float) -> dict[str, float]:
    """Where the wall time went: upload (request until the row exists), queue, planning, scoring, assembly."""
    first_chunk = min(ts(c["started_at"]) for c in job["chunks"])
    marks = [posted_at, ts(job["created_at"]), ts(job["started_at"]), first_chunk, ts(job["scored_at"]),
             ts(job["finished_at"])]
    names = ["upload", "queue", "plan", "score", "assemble"]
    return {n: b - a for n, a, b in zip(names, marks, marks[1:], strict=False)}


def busy_share(job: dict[str, Any]) -> float:
    """How busy the score workers were while the job scored: the chunks' run seconds summed, over the workers
    times the wall seconds from the first chunk's start to the last chunk's end (1.0: every worker scored all the
    time; with 2 workers, 0.5 is one idle throughout)."""
    spans = [(ts(c["started_at"]), ts(c["finished_at"])) for c in job["chunks"]]
    wall = max(end for _s, end in spans) - min(start for start, _e in spans)
    return sum(end - start for start, end in spans) / (WORKERS * wall) if wall > 0 else float("nan")


def wait_logged(url: str, token: str, job: dict[str, Any]) -> float:
    started = time.perf_counter()
    while True:
        current = requests.get(f"{url}/api/v1/batch-jobs/{job['id']}/", headers={"Authorization": f"Bearer {token}"},
                               timeout=30).json()
        if current["rows_logged"] >= current["rows_total"] - current["rows_failed"]:
            return time.perf_counter() - started
        time.sleep(0.5)


def check_result(url: str, token: str, job: dict[str, Any], fmt: str, model_path: Path, source: Path) -> float:
    """Share of rows whose portal prediction equals the model's own predict on the rows as pyarrow reads them."""
    import io

    import joblib
    import numpy as np
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    response = requests.get(f"{url}/api/v1/batch-jobs/{job['id']}/result", headers={"Authorization": f"Bearer {token}"},
                            timeout=1200)
    data = response.content
    table = pacsv.read_csv(io.BytesIO(data)) if fmt == "csv" else pq.read_table(io.BytesIO(data))
    inputs = pacsv.read_csv(source) if fmt == "csv" else pq.read_table(source)
    assert table.num_rows == inputs.num_rows, (table.num_rows, inputs.num_rows)
    assert table.column_names[:20] == inputs.column_names, table.column_names
    expected = joblib.load(model_path).predict(inputs.to_pandas())
    return float(np.mean(table.column("prediction").to_numpy() == expected))


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = worker_pids(todo.pop())
        found += children
        todo += children
    return found


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", default="lr,forest")
    parser.add_argument("--forms", default="onnx,host")
    parser.add_argument("--formats", default="csv,parquet")
    parser.add_argument("--no-log", action="store_true", help="PORTAL_BATCH_LOG_PREDICTIONS=0: no prediction log "
                                                                "filling between jobs (faster runs while developing)")
    args = parser.parse_args()
    models, forms, formats = args.models.split(","), args.forms.split(","), args.formats.split(",")
    global WORKERS
    WORKERS = args.workers
    print("load at start:", uptime(), flush=True)
    base, name = DB_URL.rsplit("/", 1)
    for sql in (f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}"):
        subprocess.run(["psql", base + "/postgres", "-qc", sql], check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        csv_path, parquet_path, warmup = build(work, args.rows, models)
        sources = {"csv": csv_path, "parquet": parquet_path}
        sizes = {fmt: path.stat().st_size for fmt, path in sources.items()}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTAL_", "DJANGO_"))}
        env.update(DATABASE_URL=DB_URL, CELERY_BROKER_URL=BROKER, PORTAL_DEBUG="1",
                   PORTAL_VAR_DIR=str(work / "var"), PORTAL_LOG_LEVEL="WARNING", MLFLOW_DISABLE_TELEMETRY="1",
                   PATH=f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}",
                   **({"PORTAL_BATCH_LOG_PREDICTIONS": "0"} if args.no_log else {}))
        subprocess.run(["redis-cli", "-u", BROKER, "flushdb"], check=True, capture_output=True)
        subprocess.run([PY, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        serving: dict[tuple[str, str], str] = {}
        for model in models:
            for form in forms:
                script = (SETUP.replace("sys.argv[1]", repr(str(work))).replace("NAME", f"bench-{model}-{form}")
                          .replace("FOLDER", f"mlflow-{model}").replace('"FORM"', repr(form)))
                done = subprocess.run([PY, "manage.py", "shell", "-c", script], cwd=ROOT, env=env,
                                      capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"setting up {model}/{form} failed: {done.stderr[-2000:]}")
                serving[(model, form)] = re.search(r"SERVING (\S+)", done.stdout).group(1)  # type: ignore[union-attr]
        out = subprocess.run([PY, "manage.py", "shell", "-c", TOKEN.replace("sys.argv[1]", repr(str(work)))],
                             cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
        token = re.search(r"TOKEN (\S+)", out).group(1)  # type: ignore[union-attr]

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        web = subprocess.Popen([PY, "-m", "gunicorn", "config.wsgi:application", "-w", "2", "-b", f"127.0.0.1:{port}",
                                "--timeout", "1200", "--log-level", "warning"], cwd=ROOT, env=env,
                               start_new_session=True)
        workers = [subprocess.Popen([PY, "-m", "celery", "-A", "config", "worker", "--pool", "prefork",
                                     "--concurrency", "1", "--loglevel", "WARNING", "-n", f"bench{i}@%h",
                                     "--without-gossip", "--without-mingle"], cwd=ROOT, env=env,
                                    start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for i in range(args.workers)]
        results: dict[tuple[str, str, str], list[float]] = {}
        rss: dict[tuple[str, str, str], float] = {}
        jobs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        agree: dict[tuple[str, str, str], float] = {}
        try:
            for _ in range(300):
                try:
                    if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.2)
            time.sleep(5)  # the workers' imports
            # A job per deployment before any clock runs: each worker process starts its own sandboxed host (or
            # loads its ONNX session) on first use and keeps it, so the measured jobs see warm workers, as a
            # worker scoring its second job of the day does. The warm-up file has several chunks, for every worker.
            for model in models:
                for form in forms:
                    seconds, _job = portal_job(url, token, f"bench-{model}-{form}", warmup)
                    print(f"warm-up {model} {form}: {seconds:.2f} s", flush=True)
            for model in models:
                model_path = work / f"{model}.joblib"
                for fmt in formats:
                    source = sources[fmt]
                    for i in range(args.repeat):
                        _s, peak, out = run_measured([PY, "-c", LIMIT, str(source), str(work / f"limit.{fmt}"),
                                                      str(model_path)], env)
                        results.setdefault((model, "limit", fmt), []).append(float(out.split()[-1]))
                        rss[(model, "limit", fmt)] = max(rss.get((model, "limit", fmt), 0), peak)
                        if fmt == "csv":
                            seconds, peak, _out = run_measured(
                                [PY, "-m", "mlflow", "models", "predict", "-m", str(work / f"mlflow-{model}"), "-i",
                                 str(source), "-t", "csv", "-o", str(work / "mlflow-out.json"),
                                 "--env-manager", "local"], env)
                            results.setdefault((model, "mlflow", fmt), []).append(seconds)
                            rss[(model, "mlflow", fmt)] = max(rss.get((model, "mlflow", fmt), 0), peak)
                        for form in forms:
                            key = (model, f"portal-{form}", fmt)
                            seconds, job = portal_job(url, token, f"bench-{model}-{form}", source)
                            results.setdefault(key, []).append(seconds)
                            if not args.no_log:
                                job["log_seconds"] = wait_logged(url, token, job)
                            jobs.setdefault(key, []).append(job)
                            if i == 0:
                                agree[key] = check_result(url, token, job, fmt, model_path, source)
                            print(f"{model} {form} {fmt} run {i + 1}: {seconds:.2f} s; phases "
                                  + ", ".join(f"{k} {v:.2f}" for k, v in job["phases"].items()) + "; stages "
                                  + ", ".join(f"{k} {v:.2f}" for k, v in job["stages"].items())
                                  + f"; workers busy {100 * job['busy']:.0f} % of the score phase; load "
                                  + open("/proc/loadavg").read().split()[0], flush=True)
            worker_rss = {w.pid: max(peak_rss_mb(p) for p in [w.pid, *worker_pids(w.pid)]) for w in workers}
            host_rss = max([peak_rss_mb(p) for w in workers for p in descendants(w.pid)
                            if p not in worker_pids(w.pid)], default=0.0)
            web_rss = max(peak_rss_mb(p) for p in worker_pids(web.pid))
        finally:
            for proc in (web, *workers):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{args.rows:,} rows x 20 features; CSV {sizes['csv'] / 1e6:.0f} MB, Parquet {sizes['parquet'] / 1e6:.0f} MB;"
          f" {args.workers} workers; median of {args.repeat}")
    print("serving forms: " + ", ".join(f"{m}/{f}: {k}" for (m, f), k in serving.items()))
    for model in models:
        print(f"\n{MODELS[model]}")
        print(f"  {'':<42}" + "".join(f"{fmt + ' s':>10}{'peak MB':>9}" for fmt in formats))
        labels = {"limit": "in-process limit (pyarrow+predict+write)", "mlflow": "mlflow models predict (local)",
                  **{f"portal-{f}": f"portal job, {f} form, submit to done" for f in forms}}
        for kind, label in labels.items():
            cells = ""
            for fmt in formats:
                value = med.get((model, kind, fmt), float("nan"))
                peak = rss.get((model, kind, fmt), float("nan"))
                cells += f"{value:>10.2f}{peak:>9.0f}"
            print(f"  {label:<42}{cells}")
        for form in forms:
            for fmt in formats:
                key = (model, f"portal-{form}", fmt)
                limit = med[(model, "limit", fmt)] / med[key]
                versus = (f"; mlflow / portal {med[(model, 'mlflow', fmt)] / med[key]:.2f}x (target >= 2)"
                          if (model, "mlflow", fmt) in med else "")
                print(f"  {form} form, {fmt}: limit / portal {limit:.2f}x (target >= 1){versus}; predictions equal "
                      f"to the model's own: {100 * agree[key]:.3f} %; chunks {jobs[key][0]['chunks_total']}")
                for job in jobs[key]:
                    print("      phases " + ", ".join(f"{k} {v:.2f}" for k, v in job["phases"].items())
                          + " | chunk stages (worker s) " + ", ".join(f"{k} {v:.2f}" for k, v in job["stages"].items())
                          + f" | workers busy {100 * job['busy']:.0f} %"
                          + (f" | log filled in {job['log_seconds']:.1f}" if "log_seconds" in job else ""))
    print(f"\npeak RSS: Celery worker processes {', '.join(f'{v:.0f}' for v in worker_rss.values())} MB; largest "
          f"model host {host_rss:.0f} MB; web workers {web_rss:.0f} MB")
    print("all runs:", {"/".join(k): [round(x, 2) for x in v] for k, v in results.items()})
    print("load at end:", uptime())


if __name__ == "__main__":
    main()
