"""Serving benchmark: MLflow's scoring server, the portal's two serving paths, MLServer and a bare Django view, side
by side on one model.

    .venv/bin/python bench/serving.py [--model lr|forest] [--sandboxed-kind mlflow|native] [--seconds 10]
                                      [--connections 8] [--runs 2] [--hop-calls 2000]
    .venv/bin/python bench/serving.py --against 4e38706 [--rounds 6] [--seconds 10] [--connections 8]

One machine, one model (``--model``: a scikit-learn logistic regression, or a 200-tree random forest; 20 numeric
features, saved by MLflow 3.17; run once per model), one load generator (wrk from Debian's packages), 1-row and
100-row bodies holding the same rows:

- MLflow's own scoring server: ``mlflow models serve --env-manager local`` with 2 workers;
- the portal: gunicorn as `manage.py runstack` starts it (2 gthread workers of 8 threads) on PostgreSQL + Redis (BENCH_DATABASE_URL / BENCH_BROKER_URL, defaulting to
  a database of its own, ``portal_bench_serving``, dropped and re-created, and Redis DB 7 on the local services),
  bearer-token auth, rate limiting and prediction logging on, each version deployed by the real deployment service,
  measured on its two serving paths:
  - the fast path: model ``bench-MODEL``, converted to ONNX and run in the web worker;
  - the sandboxed path: model ``bench-MODEL-sandboxed`` (the same MLflow archive) deployed with serving kind
    ``mlflow`` (``--sandboxed-kind``), as an MLflow model that leaves the fast path is served: each web worker asks
    its own bubblewrap-sandboxed model host over a Unix socket, numeric ``dataframe_split`` rows as one float64
    frame answered by the estimator as MLflow's server would (``child._FrameScorer``), anything else through
    MLflow's own scoring code (``native``: the matrix path of a non-MLflow file). The model converts to ONNX, so
    the set-up script (this benchmark's own process only) replaces the deployment's "prepare the serving form"
    step by the answer it gives a model it cannot prove, ``("mlflow", None)``; everything else (warming through a
    host, the input example, the traffic switch) is the real deployment;
- MLServer (Seldon) 1.7 with ``mlserver-sklearn`` serving the same estimator (joblib) with ``parallel_workers`` 2,
  its V2 inference protocol over HTTP (one FP64 tensor of shape [rows, 20]), ``debug`` off, metrics on (its
  defaults otherwise). It runs from a virtualenv of its own, never the project's (skipped, saying so, when it is
  missing; BENCH_MLSERVER_VENV, default /tmp/mlserver-venv):
      python3 -m venv /tmp/mlserver-venv && /tmp/mlserver-venv/bin/pip install mlserver mlserver-sklearn 'uvloop<0.21'
- a bare Django view (orjson + numpy + ``predict``, no middleware) with 2 gunicorn workers: this stack's ceiling.

All servers are started once and stay up; each run measures every target in turn (a 2 s warm-up, then the
measurement), so load from elsewhere on the machine spreads over all of them, then the portal's two paths and
MLServer once more with one connection and 1-row bodies: under 8 connections a p50 is mostly queueing, with one it
is the latency a request adds. Prints requests/s, p50 and p99 per run and their medians, the ratios per run and
their medians, and checks that every answered prediction reached the log. Then, without HTTP, the socket hop
itself: the median time of ``LoadedModel.predict`` (and ``predict_frame``, an MLflow host's frame) on a 1-row
matrix for the sandboxed host and for the in-process ONNX session, and a breakdown of the host's share (an empty
``ping`` frame's round trip; what the host runs per request, timed in this benchmark's own process on its own
model); the per-request overhead is the host's frame minus what the host computes for the row (the shortcut it
proves and then runs, ``child.fast_predictor``, else the estimator's own ``predict`` on the bare array), printed
beside the frame minus the estimator's own ``predict``.
Report `uptime`'s load average beside every figure (printed at the start and the end).

``--against COMMIT`` measures only the fast path, this tree's against that commit's (issue 31's "nothing here may
cost the fast path more than 10 % of its requests per second", against ``4e38706``, the commit before it): the
commit is checked out into a temporary git worktree (``git worktree add --detach``, no network), migrated into a
database of its own (BENCH_AGAINST_DATABASE_URL, default this benchmark's database name + ``_before``, dropped and
re-created; BENCH_AGAINST_BROKER_URL, default the next Redis DB), set up by its own ``bench/serving.py`` set-up script
and served by the web command its own ``manage.py runstack`` starts (captured, not copied); then ``--rounds``
rounds, each measuring both (the first alternating), 1-row bodies, the same wrk settings: req/s per round, the
ratio per round and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
PY = os.environ.get("BENCH_PYTHON") or str(ROOT / ".venv" / "bin" / "python")  # a venv reached through a symlink: its real path
DB_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/portal_bench")
BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/3")

BARE_SETTINGS = '''
SECRET_KEY = "bench-only-bare-view-key"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "bare_app"
MIDDLEWARE = []
INSTALLED_APPS = []
'''
BARE_APP = '''
import os
import joblib
import numpy as np
import orjson
from django.http import HttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

MODEL = joblib.load(os.environ["BARE_MODEL"])
COLUMNS = list(MODEL.feature_names_in_)

@csrf_exempt
def invocations(request):
    split = orjson.loads(request.body)["dataframe_split"]
    index = [split["columns"].index(c) for c in COLUMNS]
    matrix = np.asarray(split["data"], dtype="float64")[:, index]
    return HttpResponse(orjson.dumps({"predictions": MODEL.predict(matrix).tolist()}),
                        content_type="application/json")

urlpatterns = [path("invocations", invocations)]
'''
WRK_LUA = '''
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
{auth}
local f = io.open("{body}", "r")
wrk.body = f:read("*a")
f:close()
'''


def recreate_database(url: str) -> None:
    """Drop the database ``url`` names (cutting off any session left in it) and create it empty."""
    server, name = url.rsplit("/", 1)
    for statement in (f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}"):
        subprocess.run(["psql", f"{server}/postgres", "-qc", statement], check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[bytes], body: bytes, headers: dict[str, str]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server for {url} exited with {proc.returncode}")
        try:
            r = requests.post(url, data=body, headers=headers, timeout=2)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} never answered 200")


def parse_wrk(out: str) -> dict[str, float]:
    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return {"rps": rps, "p50": p50, "p99": p99, "total": total, "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(0) if errors else ""}


def run_wrk(url: str, body_file: Path, seconds: int, connections: int, token: str | None, work: Path,
            delay_ms: int | None = None, threads: int = 2) -> dict[str, float]:
    """wrk against ``url``; with ``delay_ms``, each connection waits that long between its requests (a throttle)."""
    script = work / f"wrk-{body_file.stem}-{abs(hash(url))}.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {token}"' if token else ""
    throttle = f"\nfunction delay()\n  return {delay_ms}\nend\n" if delay_ms is not None else ""
    script.write_text(WRK_LUA.replace("{auth}", auth).replace("{body}", str(body_file)) + throttle)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def logged_count(env: dict[str, str], models: tuple[str, ...] = ("bench-lr",)) -> int:
    """Drain the prediction buffer into the log (waiting for the worker's flusher if it is at work, 10 minutes at
    most), then count the benchmark models' logged predictions."""
    out = subprocess.run([PY, "manage.py", "shell", "-c",
                          "from monitoring.flush import drain\n"
                          "drain(timeout=600)\n"
                          "from monitoring.models import PredictionLog\n"
                          f"print('LOGGED', PredictionLog.objects.filter(model_name__in={list(models)!r}).count())"],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return int(re.search(r"LOGGED (\d+)", out).group(1))  # type: ignore[union-attr]


def build_model(work: Path, kind: str = "lr") -> tuple[Path, Path, list[str]]:
    import joblib
    import mlflow.sklearn
    import pandas as pd
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    X, y = make_classification(n_samples=2000, n_features=20, random_state=0)
    columns = [f"x{i}" for i in range(20)]
    frame = pd.DataFrame(X, columns=columns)
    extra: dict[str, object] = {}
    if kind == "forest":
        model: object = RandomForestClassifier(n_estimators=200, random_state=0, n_jobs=1).fit(frame, y)
        extra["skops_trusted_types"] = ["sklearn.tree._tree.Tree"]  # MLflow 3 saves scikit-learn with skops
    else:
        model = LogisticRegression(max_iter=1000).fit(frame, y)
    mlflow_dir = work / "mlflow-model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.sklearn.save_model(model, str(mlflow_dir), input_example=frame.head(3), **extra)
    native = work / "model.joblib"
    joblib.dump(model, native)
    frame.head(500).assign(target=y[:500]).to_csv(work / "reference.csv", index=False)
    return mlflow_dir, native, columns


def body(columns: list[str], rows: int, work: Path) -> Path:
    from sklearn.datasets import make_classification

    X, _ = make_classification(n_samples=rows, n_features=20, random_state=1)
    path = work / f"body-{rows}.json"
    path.write_text(json.dumps({"dataframe_split": {"columns": columns, "data": X.tolist()}}))
    return path


def portal_web_command() -> list[str]:
    """The web server exactly as ``manage.py runstack`` (``make run``) starts it: gunicorn, 2 workers of 8 threads
    (gthread), access log off for the benchmark."""
    import sys

    sys.path.insert(0, str(ROOT))
    from portal.webserver import web_command

    command = web_command(PY, "127.0.0.1:{port}")
    log = command.index("--access-logfile")
    return command[:log] + command[log + 2:]


def portal_env(work: Path) -> dict[str, str]:
    """The portal as production runs it: debug off (under DEBUG, Django keeps every query of a long-lived worker in
    memory, which Celery warns about), plain HTTP on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTAL_", "DJANGO_"))}
    env.update(DATABASE_URL=DB_URL, CELERY_BROKER_URL=BROKER, PORTAL_DEBUG="0", PORTAL_VAR_DIR=str(work / "var"),
               PORTAL_SECRET_KEY="bench-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
               PORTAL_ALLOWED_HOSTS="127.0.0.1,localhost", PORTAL_SECURE_SSL_REDIRECT="0", PORTAL_SECURE_COOKIES="0",
               PORTAL_SERVE_RATE_LIMIT="1000000", PORTAL_LOG_LEVEL="WARNING", **bench_keys())
    return env


def bench_keys() -> dict[str, str]:
    """Keys made up for one benchmark: outside the demo the portal wants the keys protecting data at rest set
    explicitly (payload encryption, subject hashing, audit signing), never derived or generated by itself."""
    import secrets

    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signing = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()).decode()
    return {"PORTAL_PAYLOAD_KEYS": Fernet.generate_key().decode(), "PORTAL_SUBJECT_HASH_KEY": secrets.token_hex(32),
            "PORTAL_AUDIT_SIGNING_KEY": signing}


# Shared by the benchmarks' set-up scripts (run with `manage.py shell -c`): a data scientist `bench` in team `bench`.
BENCH_USER = '''
import sys
from pathlib import Path
from django.contrib.auth.models import Group, User
from portal.models import Membership, Team
from portal.roles import sync_roles
from portal import services as portal_services
from registry.versions import services
from registry.deployments import services as deployments
from registry.versions.localfiles import LocalUpload
work = Path(sys.argv[1])
sync_roles()
user, _ = User.objects.get_or_create(username="bench")
user.groups.add(Group.objects.get(name="data_scientist"))
team, _ = Team.objects.get_or_create(slug="bench", defaults={"name": "Bench"})
Membership.objects.get_or_create(team=team, user=user)
'''

SETUP = BENCH_USER + '''
from registry.serving import buffer
import shutil
archive = shutil.make_archive(str(work / "model"), "zip", root_dir=work / "mlflow-model")
model = services.model_register(name="bench-lr", team=team, actor=user)
version = services.version_upload(model=model, upload=LocalUpload(Path(archive), "model.zip"),
                                  reference=LocalUpload(work / "reference.csv", "reference.csv"),
                                  meta=services.UploadMetadata(), actor=user)
if version.trust_state == "pending":  # the forest, saved with skops: an approver names what it loads
    approver, _ = User.objects.get_or_create(username="bench-approver")
    approver.groups.add(Group.objects.get(name="approver"))
    Membership.objects.get_or_create(team=team, user=approver)
    version = services.version_trust_decide(version=version, trust=True, reason="scikit-learn's own tree storage",
                                            actor=approver)
version = services.version_scan(version_id=version.pk)
assert version.status == "ready", version.status_detail
d = deployments.deployment_run(deployment_id=deployments.deployment_start(version=version, environment="dev",
                                                                           actor=user).pk)
assert d.status == "live", d.error
client = buffer.redis_client()
client.delete(buffer.REDIS_KEY, buffer.PROCESSING_KEY, *buffer.stream_keys())  # records of an earlier run
print("SERVING", d.serving_kind)
print("FORM", next((e["message"] for e in d.log if e["message"].startswith("Serving")), "").replace("\\n", " "))
print("TOKEN", portal_services.token_create(user=user, name="bench", actor=user)[1])
'''


# The same archive as a second model, deployed with serving kind SANDBOXED_KIND ("mlflow": how an MLflow model that
# leaves the fast path is served; "native": the matrix path of other files): a sandboxed model host per web worker.
# The model converts to ONNX, so the deployment's "prepare the serving form" step is replaced, in this set-up
# process only, by what it answers for a model it cannot prove; the rest is the real deployment (warming through a
# host, the input example against the signature, the traffic switch). No setting of the portal changes.
SANDBOXED_SETUP = BENCH_USER + '''
archive = work / "model.zip"
model = services.model_register(name="bench-lr-sandboxed", team=team, actor=user)
version = services.version_upload(model=model, upload=LocalUpload(archive, "model.zip"),
                                  reference=LocalUpload(work / "reference.csv", "reference.csv"),
                                  meta=services.UploadMetadata(), actor=user)
if version.trust_state == "pending":  # the forest, saved with skops: an approver names what it loads
    approver, _ = User.objects.get_or_create(username="bench-approver")
    approver.groups.add(Group.objects.get(name="approver"))
    Membership.objects.get_or_create(team=team, user=approver)
    version = services.version_trust_decide(version=version, trust=True, reason="scikit-learn's own tree storage",
                                            actor=approver)
version = services.version_scan(version_id=version.pk)
assert version.status == "ready", version.status_detail
real_prepare = deployments._prepare
def no_onnx_form(deployment, tmp):
    deployments._step(deployment, 45, "Serving from a host: bench/serving.py measures the sandboxed model host.")
    return "SANDBOXED_KIND", None
deployments._prepare = no_onnx_form
try:
    d = deployments.deployment_run(deployment_id=deployments.deployment_start(version=version, environment="dev",
                                                                               actor=user).pk)
finally:
    deployments._prepare = real_prepare
assert d.status == "live", d.error
assert d.serving_kind == "SANDBOXED_KIND" and d.serving_blob is None, (d.serving_kind, d.serving_blob)
print("SERVING", d.serving_kind)
'''

# The socket hop without HTTP, in one process of the portal's (settings, database): LoadedModel.predict on a 1-row
# matrix through the sandboxed host and through the in-process ONNX session, interleaved in blocks; then what the
# host's time is made of: an empty ping frame's round trip (socket, framing, two wake-ups), and the host's own work
# per request timed here, outside the sandbox, on the benchmark's own model (mlflow.pyfunc's predict on a one-row
# DataFrame, as child.host() does for an MLflow archive; the bare estimator on a DataFrame and on an array).
HOP = '''
import json, statistics, sys, time, warnings
from pathlib import Path
import numpy as np
import orjson
from registry.models import Deployment
from registry.serving import runtime
from registry.sandbox import hosts
from registry.sandbox.child import FRAME_HEADER
work = Path(sys.argv[1])
calls = int(sys.argv[2])
def live(name):
    return Deployment.objects.select_related("version__artifact", "serving_blob").get(
        model__name=name, environment="dev", status="live")
fast_d, host_d = live("bench-lr"), live("bench-lr-sandboxed")
fast = runtime.load_serving_model(version=fast_d.version, kind=fast_d.serving_kind, blob=fast_d.serving_blob)
hosted = runtime.load_serving_model(version=host_d.version, kind=host_d.serving_kind, blob=host_d.serving_blob,
                                    key="bench-hop")
assert hosted.kind == "SANDBOXED_KIND", hosted.kind
row = np.asarray(json.loads((work / "body-1.json").read_text())["dataframe_split"]["data"], dtype="float64")
columns = fast.columns
hosted.predict(row)  # starts the host
host = hosts.pool.get("bench-hop", runtime.materialiser(host_d.version), label="bench-hop")
ping_header = orjson.dumps({"op": "ping"})
def ping():
    with host._lock:
        host._sock.sendall(FRAME_HEADER.pack(len(ping_header)) + ping_header)
        assert host._receive(5).get("ok")
import mlflow.pyfunc
import pandas as pd
warnings.simplefilter("ignore")
pyfunc = mlflow.pyfunc.load_model(str(work / "mlflow-model"))
estimator = pyfunc.get_raw_model()
frame = lambda: pd.DataFrame(row, columns=columns)
subjects = {
    "host: LoadedModel.predict": lambda: hosted.predict(row),
    **({"host: LoadedModel.predict_frame": lambda: hosted.predict_frame(row)} if hosted.takes_frames else {}),
    f"fast: LoadedModel.predict ({fast.kind})": lambda: fast.predict(row),
    "host: empty ping frame": ping,
    "in-process pyfunc.predict(DataFrame)": lambda: pyfunc.predict(frame()),
    "in-process estimator.predict(DataFrame)": lambda: estimator.predict(frame()),
    "in-process estimator.predict(ndarray)": lambda: estimator.predict(row),
    "in-process DataFrame(1 row) build": frame,
}
from registry.sandbox.child import fast_predictor
shortcut, _why = fast_predictor(estimator, row)  # what the host proves, then runs for finite rows
if shortcut is not None:
    subjects["in-process proven shortcut (fast_predictor)"] = lambda: shortcut(row)
samples = {name: [] for name in subjects}
for fn in subjects.values():
    for _ in range(100):
        fn()
block = 250
for _ in range(max(1, calls // block)):
    for name, fn in subjects.items():
        out = samples[name]
        for _ in range(block):
            t0 = time.perf_counter_ns()
            fn()
            out.append(time.perf_counter_ns() - t0)
hosted.close()
print("HOP " + json.dumps({name: statistics.median(v) / 1000 for name, v in samples.items()}))
'''


def mlserver_setup(work: Path, native: Path, venv: Path) -> tuple[list[str], dict[str, str], Path]:
    """A model repository for MLServer: settings (2 parallel workers, debug off, ports filled in at start) and the
    estimator, saved with joblib."""
    repo = work / "mlserver"
    (repo / "bench-lr").mkdir(parents=True)
    shutil.copyfile(native, repo / "bench-lr" / "model.joblib")
    (repo / "bench-lr" / "model-settings.json").write_text(json.dumps({
        "name": "bench-lr", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"}}))
    (repo / "settings.json").write_text(json.dumps({
        "parallel_workers": 2, "debug": False, "host": "127.0.0.1", "http_port": free_port(),
        "grpc_port": free_port(), "metrics_port": free_port(), "metrics_dir": str(work / "mlserver-metrics")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTAL_", "DJANGO_", "MLSERVER_"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",  # as the model hosts run
               PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return [str(venv / "bin" / "mlserver"), "start", str(repo)], env, repo


def v2_body(rest_body: Path, work: Path) -> Path:
    """The rows of an MLflow ``dataframe_split`` body as one V2 FP64 tensor."""
    data = json.loads(rest_body.read_text())["dataframe_split"]["data"]
    path = work / f"v2-{rest_body.stem}.json"
    path.write_text(json.dumps({"inputs": [{"name": "input-0", "shape": [len(data), len(data[0])],
                                            "datatype": "FP64", "data": [x for r in data for x in r]}]}))
    return path


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


FAST, SANDBOXED, MLFLOW, BARE, MLSERVER = ("portal fast (ONNX)", "portal sandboxed host", "mlflow models serve",
                                           "bare Django view", "MLServer (2 workers)")
TARGETS = {"fast / MLflow": ">= 20", "fast / bare": ">= 0.6", "sandboxed / MLServer": ">= 1.0",
           "sandboxed / fast": "", "hop p50 ms (sandboxed - fast)": "< 1", "hop p50 ms, 1 connection": "< 1"}


def ratios(results: dict[tuple[str, int], dict[str, float]], rows: int) -> dict[str, float]:
    r = {name: results[(name, rows)] for name in (FAST, SANDBOXED, MLFLOW, BARE, MLSERVER)
         if (name, rows) in results}
    out = {"fast / MLflow": r[FAST]["rps"] / r[MLFLOW]["rps"], "fast / bare": r[FAST]["rps"] / r[BARE]["rps"]}
    if MLSERVER in r:
        out["sandboxed / MLServer"] = r[SANDBOXED]["rps"] / r[MLSERVER]["rps"]
    out["sandboxed / fast"] = r[SANDBOXED]["rps"] / r[FAST]["rps"]
    out["hop p50 ms (sandboxed - fast)"] = r[SANDBOXED]["p50"] - r[FAST]["p50"]
    one = (f"{SANDBOXED}, 1 conn", rows), (f"{FAST}, 1 conn", rows)
    if all(key in results for key in one):
        out["hop p50 ms, 1 connection"] = results[one[0]]["p50"] - results[one[1]]["p50"]
    return out


def print_table(title: str, results: dict[tuple[str, int], dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'server':<32}{'rows':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}")
    for (name, rows), r in results.items():
        print(f"{name:<32}{rows:>5}{r['rps']:>10.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['non2xx']:>9.0f}  "
              f"{r.get('socket_errors', '')}", flush=True)


Target = tuple[str, str, "str | None", dict[int, Path]]  # name, path, bearer token, {rows: body file}


# --against COMMIT: the fast path of this tree and of an earlier commit side by side (issue 31: "nothing here may
# cost the fast path more than 10 % of its requests per second"). Each tree runs its own runstack's web command,
# captured by running that tree's `manage.py runstack` with subprocess.Popen replaced (so "the way make run starts
# it", whatever that commit's runstack did), its own migrations on a database of its own, and its own set-up script.
# The project's virtualenv maps its packages to the main checkout (setuptools' editable finder): a module the earlier
# commit lacks would be found there. The earlier tree's processes drop that finder (``sitecustomize`` runs after the
# .pth files) so that they import that tree and nothing else of the project.
NO_EDITABLE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
"""
CAPTURE_WEB = """
import json, os, subprocess, sys
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup()
from django.core.management import call_command
class Captured(Exception):
    pass
def popen(cmd, *args, **kwargs):
    if "gunicorn" in cmd:
        print("WEB " + json.dumps(list(cmd)))
        raise Captured
    raise SystemExit("runstack started something before its web server: " + repr(cmd))
subprocess.Popen = popen
try:
    call_command("runstack", "--port", "65000", "--host", "127.0.0.1")
except Captured:
    pass
"""


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every server's process group, then SIGKILL whatever has not ended within 30 s."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def fast_path_against(commit: str, seconds: int, connections: int, rounds: int) -> None:
    """This tree's fast path and ``commit``'s, alternately (the first server changes every round), 1-row bodies,
    the same wrk settings: req/s per round, the medians and the ratio (this tree / commit), and the load."""
    against_db = os.environ.get("BENCH_AGAINST_DATABASE_URL", DB_URL + "_before")
    server, _, db_index = BROKER.rpartition("/")
    against_broker = os.environ.get("BENCH_AGAINST_BROKER_URL", f"{server}/{(int(db_index or 0) + 1) % 16}")
    resolved = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                              capture_output=True, text=True)
    if resolved.returncode != 0:
        raise SystemExit(f"--against {commit}: no such commit here ({resolved.stderr.strip()})")
    before_sha = resolved.stdout.strip()
    ours_sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    print("load at start:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-against-") as tmp:
        work = Path(tmp)
        old_root = work / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(old_root), before_sha],
                       check=True)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            _mlflow_dir, _native, columns = build_model(work)
            body_file = body(columns, 1, work)
            targets: list[tuple[str, str, str]] = []  # (label, url, token)
            for label, root, db, broker in ((f"this tree ({ours_sha[:7]}{', uncommitted changes' if dirty else ''})",
                                             ROOT, DB_URL, BROKER),
                                            (f"before ({before_sha[:7]})", old_root, against_db, against_broker)):
                side = work / ("ours" if root == ROOT else "before")
                side.mkdir()
                for name in ("mlflow-model", "reference.csv"):
                    src = work / name
                    (shutil.copytree if src.is_dir() else shutil.copy)(src, side / name)  # type: ignore[operator]
                # That tree's own bench/serving.py: its environment, its keys and its set-up script.
                helper = ("import json, sys\nsys.path.insert(0, 'bench')\nimport serving\n"
                          f"print('ENV ' + json.dumps(serving.portal_env(__import__('pathlib').Path({str(side)!r}))))\n"
                          "print('SETUP ' + json.dumps(serving.SETUP))\n")
                python_path, py = str(root), PY
                if root != ROOT:
                    # The virtualenv by its real folder: that commit's sandbox binds the interpreter's prefix, and a
                    # symlinked .venv (a worktree's) is not there inside it.
                    py = str(Path(PY).parent.parent.resolve() / "bin" / Path(PY).name)
                    (work / "shim").mkdir(exist_ok=True)
                    (work / "shim" / "sitecustomize.py").write_text(NO_EDITABLE)
                    python_path = f"{root}{os.pathsep}{work / 'shim'}"
                base_env = {**os.environ, "DATABASE_URL": db, "CELERY_BROKER_URL": broker, "PYTHONPATH": python_path}
                out = subprocess.run([py, "-c", helper], cwd=root, env=base_env, check=True, capture_output=True,
                                     text=True).stdout
                env = json.loads(re.search(r"^ENV (.*)$", out, re.M).group(1))  # type: ignore[union-attr]
                setup = json.loads(re.search(r"^SETUP (.*)$", out, re.M).group(1))  # type: ignore[union-attr]
                env.update(DATABASE_URL=db, CELERY_BROKER_URL=broker, PYTHONPATH=python_path)
                recreate_database(db)
                subprocess.run([py, "manage.py", "migrate", "-v0"], cwd=root, env=env, check=True)
                out = subprocess.run([py, "manage.py", "shell", "-c", setup.replace("sys.argv[1]", repr(str(side)))],
                                     cwd=root, env=env, check=True, capture_output=True, text=True).stdout
                token = re.search(r"TOKEN (\S+)", out).group(1)  # type: ignore[union-attr]
                kind = re.search(r"SERVING (\S+)", out)
                out = subprocess.run([py, "-c", CAPTURE_WEB], cwd=root, env=env, check=True, capture_output=True,
                                     text=True).stdout
                command = json.loads(re.search(r"^WEB (.*)$", out, re.M).group(1))  # type: ignore[union-attr]
                if "--access-logfile" in command:  # as the main benchmark: no access log
                    at = command.index("--access-logfile")
                    command = command[:at] + command[at + 2:]
                port = free_port()
                command = [c.replace("127.0.0.1:65000", f"127.0.0.1:{port}") for c in command]
                command[0] = py
                print(f"{label}: serving kind {kind.group(1) if kind else '?'}; "
                      f"{' '.join(command[1:]).replace(str(root), '.')}", flush=True)
                with open(side / "web.log", "wb") as log:
                    procs.append(subprocess.Popen([*command, "--log-level", "warning"], cwd=root, env=env,
                                                  start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
                url = f"http://127.0.0.1:{port}/api/v1/serve/bench-lr/dev/invocations"
                try:
                    wait_up(url, procs[-1], body_file.read_bytes(),
                            {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
                except SystemExit:
                    print((side / "web.log").read_text()[-3000:])
                    raise
                run_wrk(url, body_file, 5, connections, token, work)  # every worker loads its model
                targets.append((label, url, token))
            rps: dict[str, list[float]] = {label: [] for label, _, _ in targets}
            print(f"\nfast path, 1-row bodies, wrk -t2 -c{connections} -d{seconds}s, {rounds} rounds alternating "
                  "(2 s warm-up before each measurement)")
            print(f"{'round':<7}" + "".join(f"{label:>36}" for label, _, _ in targets) + f"{'ratio':>8}{'load':>7}")
            for n in range(rounds):
                for label, url, token in (targets if n % 2 == 0 else targets[::-1]):
                    run_wrk(url, body_file, 2, connections, token, work)
                    result = run_wrk(url, body_file, seconds, connections, token, work)
                    if result["non2xx"]:
                        raise SystemExit(f"{label}: {result['non2xx']:.0f} answers were not 2xx")
                    rps[label].append(result["rps"])
                ours, before = (rps[label][-1] for label, _, _ in targets)
                print(f"{n + 1:<7}{ours:>36.0f}{before:>36.0f}{ours / before:>8.2f}{os.getloadavg()[0]:>7.2f}",
                      flush=True)
            ours_all, before_all = (rps[label] for label, _, _ in targets)
            print(f"{'median':<7}{median(ours_all):>36.0f}{median(before_all):>36.0f}"
                  f"{median(ours_all) / median(before_all):>8.2f}")
            print(f"median of the per-round ratios: {median([a / b for a, b in zip(ours_all, before_all, strict=True)]):.2f} "
                  "(issue 31's bound: >= 0.90)")
        finally:
            stop_all(procs)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_root)], check=False)
    print("load at end:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2, help="rounds over every target; medians are printed")
    parser.add_argument("--hop-calls", type=int, default=2000, help="calls per subject of the in-process hop timing")
    parser.add_argument("--model", choices=("lr", "forest"), default="lr",
                        help="a logistic regression, or a random forest of 200 trees")
    parser.add_argument("--sandboxed-kind", choices=("mlflow", "native"), default="mlflow",
                        help="how the sandboxed deployment is served: as an MLflow model that leaves the fast path "
                             "(mlflow), or the matrix path of a non-MLflow file (native)")
    parser.add_argument("--against", metavar="COMMIT",
                        help="only the fast path, this tree against COMMIT's (checked out into a temporary git "
                             "worktree), alternating --rounds rounds of --seconds at --connections")
    parser.add_argument("--rounds", type=int, default=6, help="with --against: rounds, each measuring both")
    args = parser.parse_args()
    if args.against:
        fast_path_against(args.against, args.seconds, args.connections, args.rounds)
        return
    print("load at start:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    deployed = f"bench-{args.model}"  # the fast path's model; the sandboxed one is f"{deployed}-sandboxed"

    def script(text: str) -> str:
        return (text.replace("sys.argv[1]", repr(str(work))).replace("bench-lr", deployed)
                .replace("SANDBOXED_KIND", args.sandboxed_kind))
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    venv = Path(os.environ.get("BENCH_MLSERVER_VENV", "/tmp/mlserver-venv"))  # noqa: S108 - a benchmark's venv
    mlserver_missing = "" if (venv / "bin" / "mlserver").is_file() else (
        f"MLServer skipped: no virtualenv at {venv} (python3 -m venv {venv} && {venv}/bin/pip install mlserver "
        "mlserver-sklearn 'uvloop<0.21'; or set BENCH_MLSERVER_VENV)")
    if mlserver_missing:
        print(mlserver_missing, flush=True)
    recreate_database(DB_URL)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        mlflow_dir, native, columns = build_model(work, args.model)
        bodies = {1: body(columns, 1, work), 100: body(columns, 100, work)}
        env = portal_env(work)
        subprocess.run([PY, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        out = subprocess.run([PY, "manage.py", "shell", "-c", script(SETUP)],
                             cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
        token = re.search(r"TOKEN (\S+)", out).group(1)  # type: ignore[union-attr]
        serving_kind = re.search(r"SERVING (\S+)", out).group(1)  # type: ignore[union-attr]
        form_line = re.search(r"FORM (.*)", out)
        form = form_line.group(1) if form_line else ""
        out = subprocess.run([PY, "manage.py", "shell", "-c", script(SANDBOXED_SETUP)],
                             cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
        sandboxed_kind = re.search(r"SERVING (\S+)", out).group(1)  # type: ignore[union-attr]
        (work / "bare_settings.py").write_text(BARE_SETTINGS)
        (work / "bare_app.py").write_text(BARE_APP)

        # name -> (command, working folder, environment, what it serves)
        servers: dict[str, tuple[list[str], Path, dict[str, str], list[Target]]] = {
            "mlflow": ([PY, "-m", "mlflow", "models", "serve", "-m", str(mlflow_dir), "--env-manager", "local",
                        "-h", "127.0.0.1", "-p", "{port}", "-w", "2"], ROOT,
                       {**env, "MLFLOW_DISABLE_TELEMETRY": "1",
                        "PATH": f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"},
                       [(MLFLOW, "/invocations", None, bodies)]),
            "portal": ([*portal_web_command(), "--log-level", "warning"], ROOT, env,
                       [(FAST, f"/api/v1/serve/{deployed}/dev/invocations", token, bodies),
                        (SANDBOXED, f"/api/v1/serve/{deployed}-sandboxed/dev/invocations", token, bodies)]),
            "bare": ([PY, "-m", "gunicorn", "--chdir", str(work), "django.core.wsgi:get_wsgi_application()",
                      "-w", "2", "-b", "127.0.0.1:{port}", "--log-level", "warning"], ROOT,
                     {**env, "DJANGO_SETTINGS_MODULE": "bare_settings", "BARE_MODEL": str(native),
                      "PYTHONPATH": str(work)}, [(BARE, "/invocations", None, bodies)]),
        }
        if not mlserver_missing:
            cmd, mlserver_env, repo = mlserver_setup(work, native, venv)
            servers["mlserver"] = (cmd, work, mlserver_env,
                                   [(MLSERVER, "/v2/models/bench-lr/infer", None,
                                     {rows: v2_body(b, work) for rows, b in bodies.items()})])
        procs: list[subprocess.Popen[bytes]] = []
        urls: list[tuple[str, str, str | None, dict[int, Path]]] = []
        runs: list[dict[tuple[str, int], dict[str, float]]] = []
        try:
            for name, (cmd, cwd, server_env, targets) in servers.items():
                port = free_port()
                if name == "mlserver":
                    settings_file = repo / "settings.json"
                    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "http_port": port}))
                with open(work / f"{name}.log", "wb") as log:
                    procs.append(subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], cwd=cwd,
                                                  env=server_env, start_new_session=True, stdout=log,
                                                  stderr=subprocess.STDOUT))
                for target, path, auth, target_bodies in targets:
                    url = f"http://127.0.0.1:{port}{path}"
                    headers = {"Content-Type": "application/json",
                               **({"Authorization": f"Bearer {auth}"} if auth else {})}
                    try:
                        wait_up(url, procs[-1], target_bodies[1].read_bytes(), headers)
                    except SystemExit:
                        print((work / f"{name}.log").read_text()[-3000:])
                        raise
                    # Every worker starts what it serves (a sandboxed host, MLServer's pool) before any run.
                    run_wrk(url, target_bodies[1], 5, args.connections, auth, work)
                    urls.append((target, url, auth, target_bodies))
            for n in range(args.runs):
                results: dict[tuple[str, int], dict[str, float]] = {}
                for target, url, auth, target_bodies in urls:
                    for rows, body_file in target_bodies.items():
                        run_wrk(url, body_file, 2, args.connections, auth, work)  # warm-up
                        results[(target, rows)] = run_wrk(url, body_file, args.seconds, args.connections, auth,
                                                          work)
                # Latency without queueing: one connection, one request at a time, 1-row bodies. Under the
                # throughput runs' 8 connections a p50 is mostly time spent waiting behind other requests.
                for target, url, auth, target_bodies in urls:
                    if target in (FAST, SANDBOXED, MLSERVER):
                        run_wrk(url, target_bodies[1], 2, 1, auth, work, threads=1)
                        results[(f"{target}, 1 conn", 1)] = run_wrk(url, target_bodies[1], args.seconds, 1, auth,
                                                                    work, threads=1)
                runs.append(results)
                print_table(f"run {n + 1} of {args.runs}", results)
        finally:
            stop_all(procs)

        hop_script = script(HOP).replace("sys.argv[2]", repr(str(args.hop_calls)))
        hop_out = subprocess.run([PY, "manage.py", "shell", "-c", hop_script], cwd=ROOT, env=env, check=True,
                                 capture_output=True, text=True).stdout
        hop = json.loads(re.search(r"HOP (.*)", hop_out).group(1))  # type: ignore[union-attr]

        # Every answered portal prediction must be in the log once the flusher has drained the buffer.
        logged = logged_count(env, (deployed, f"{deployed}-sandboxed"))

    medians = {key: {field: median([run[key][field] for run in runs]) for field in ("rps", "p50", "p99", "non2xx")}
               for key in runs[0]}
    model_name = "LogisticRegression" if args.model == "lr" else "RandomForestClassifier (200 trees)"
    print(f"\nmodel: {model_name}, 20 features; serving forms: {FAST}: {serving_kind}, {SANDBOXED}: "
          f"{sandboxed_kind}; wrk -t2 -c{args.connections} -d{args.seconds}s; {args.runs} runs")
    # The fast path's share: of the bench's two deployments, bench-lr-sandboxed is forced onto a host by design;
    # bench-lr takes the fast path only when its ONNX form was proven (issue 32: labels equal on the reference data
    # and on probes at the decision boundary).
    print(f"fast path: {FAST} serves as {serving_kind} ({1 if serving_kind == 'onnx' else 0} of 1 deployment that "
          f"may take it): {form}")
    if mlserver_missing:
        print(mlserver_missing)
    print_table(f"medians over {args.runs} runs", medians)
    for rows in bodies:
        per_run = [ratios(run, rows) for run in runs]
        print(f"\n{rows}-row bodies{'':<22}{'target':>8}"
              + "".join(f"{'run ' + str(i + 1):>9}" for i in range(len(runs))) + f"{'median':>9}")
        for name in per_run[0]:
            values = [r[name] for r in per_run]
            print(f"  {name:<33}{TARGETS[name]:>8}" + "".join(f"{v:>9.2f}" for v in values)
                  + f"{median(values):>9.2f}")
    print(f"\nthe hop without HTTP, median microseconds per call on a 1-row matrix ({args.hop_calls} calls each, "
          "interleaved in blocks of 250):")
    for name, us in hop.items():
        print(f"  {name:<44}{us:>9.0f}")
    fast_key = next(k for k in hop if k.startswith("fast: "))
    print(f"  {'host - fast':<44}{hop['host: LoadedModel.predict'] - hop[fast_key]:>9.0f}")
    own = hop["in-process estimator.predict(ndarray)"]
    # What the host itself computes per row: the proven shortcut where it has one, else the estimator's predict
    computed = hop.get("in-process proven shortcut (fast_predictor)", own)
    for key in ("host: LoadedModel.predict_frame", "host: LoadedModel.predict"):
        if key in hop:
            print(f"  {'overhead: ' + key.split(': ')[1] + ' - host computation':<44}{hop[key] - computed:>9.0f}"
                  "   (target < 150)")
            print(f"  {key.split(': ')[1] + ' - estimator.predict(ndarray)':<44}{hop[key] - own:>9.0f}")
    expected = sum((r["total"] - r["non2xx"]) * rows for run in runs for (name, rows), r in run.items()
                   if name.startswith((FAST, SANDBOXED)))
    print(f"\nportal predictions answered in the measured runs: {expected}; in the log after flushing: {logged} "
          f"({'all present' if logged >= expected else 'MISSING ' + str(expected - logged)}; the log also "
          "holds the warm-up and readiness requests)")
    print("load at end:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
