"""Serving benchmark: MLflow's scoring server, the portal, and a bare Django view, side by side on one model.

    .venv/bin/python bench/serving.py [--seconds 10] [--connections 8]

One run, one machine, one model (scikit-learn logistic regression, 20 numeric features, saved by MLflow 3.17), one
load generator (wrk from Debian's packages), 1-row and 100-row JSON bodies:

- MLflow's own scoring server: ``mlflow models serve --env-manager local`` with 2 workers;
- the portal: gunicorn with 2 workers on PostgreSQL + Redis (DATABASE_URL / CELERY_BROKER_URL, defaulting to the
  local services), bearer-token auth, rate limiting and prediction logging on, the version deployed by the real
  deployment service;
- a bare Django view (orjson + numpy + ``predict``, no middleware) with 2 gunicorn workers: this stack's ceiling.

Prints requests/s, p50 and p99 for each, the ratios, and checks that every answered prediction reached the log.
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
PY = str(ROOT / ".venv" / "bin" / "python")
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
            delay_ms: int | None = None) -> dict[str, float]:
    """wrk against ``url``; with ``delay_ms``, each connection waits that long between its requests (a throttle)."""
    script = work / f"wrk-{body_file.stem}-{abs(hash(url))}.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {token}"' if token else ""
    throttle = f"\nfunction delay()\n  return {delay_ms}\nend\n" if delay_ms is not None else ""
    script.write_text(WRK_LUA.replace("{auth}", auth).replace("{body}", str(body_file)) + throttle)
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def logged_count(env: dict[str, str]) -> int:
    """Drain the prediction buffer into the log (waiting for the worker's flusher if it is at work, 10 minutes at
    most), then count the benchmark model's logged predictions."""
    out = subprocess.run([PY, "manage.py", "shell", "-c",
                          "from monitoring.flush import drain\n"
                          "drain(timeout=600)\n"
                          "from monitoring.models import PredictionLog\n"
                          "print('LOGGED', PredictionLog.objects.filter(model_name='bench-lr').count())"],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return int(re.search(r"LOGGED (\d+)", out).group(1))  # type: ignore[union-attr]


def build_model(work: Path) -> tuple[Path, Path, list[str]]:
    import joblib
    import mlflow.sklearn
    import pandas as pd
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    X, y = make_classification(n_samples=2000, n_features=20, random_state=0)
    columns = [f"x{i}" for i in range(20)]
    frame = pd.DataFrame(X, columns=columns)
    model = LogisticRegression(max_iter=1000).fit(frame, y)
    mlflow_dir = work / "mlflow-model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.sklearn.save_model(model, str(mlflow_dir), input_example=frame.head(3))
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


def portal_env(work: Path) -> dict[str, str]:
    """The portal as production runs it: debug off (under DEBUG, Django keeps every query of a long-lived worker in
    memory, which Celery warns about), plain HTTP on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTAL_", "DJANGO_"))}
    env.update(DATABASE_URL=DB_URL, CELERY_BROKER_URL=BROKER, PORTAL_DEBUG="0", PORTAL_VAR_DIR=str(work / "var"),
               PORTAL_SECRET_KEY="bench-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
               PORTAL_ALLOWED_HOSTS="127.0.0.1,localhost", PORTAL_SECURE_SSL_REDIRECT="0", PORTAL_SECURE_COOKIES="0",
               PORTAL_SERVE_RATE_LIMIT="1000000", PORTAL_LOG_LEVEL="WARNING")
    return env


# Shared by the benchmarks' set-up scripts (run with `manage.py shell -c`): a data scientist `bench` in team `bench`.
BENCH_USER = '''
import sys
from pathlib import Path
from django.contrib.auth.models import Group, User
from portal.models import Membership, Team
from portal.roles import sync_roles
from portal import services as portal_services
from registry import deployments, services
from registry.localfiles import LocalUpload
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
version = services.version_scan(version_id=version.pk)
assert version.status == "ready", version.status_detail
d = deployments.deployment_run(deployment_id=deployments.deployment_start(version=version, environment="dev",
                                                                           actor=user).pk)
assert d.status == "live", d.error
client = buffer.redis_client()
client.delete(buffer.REDIS_KEY, buffer.PROCESSING_KEY)
print("SERVING", d.serving_kind)
print("TOKEN", portal_services.token_create(user=user, name="bench", actor=user)[1])
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    recreate_database(DB_URL)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        mlflow_dir, native, columns = build_model(work)
        bodies = {1: body(columns, 1, work), 100: body(columns, 100, work)}
        env = portal_env(work)
        subprocess.run([PY, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        out = subprocess.run([PY, "manage.py", "shell", "-c", SETUP.replace("sys.argv[1]", repr(str(work)))],
                             cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
        token = re.search(r"TOKEN (\S+)", out).group(1)  # type: ignore[union-attr]
        serving_kind = re.search(r"SERVING (\S+)", out).group(1)  # type: ignore[union-attr]
        (work / "bare_settings.py").write_text(BARE_SETTINGS)
        (work / "bare_app.py").write_text(BARE_APP)

        servers = {
            "mlflow models serve": ([PY, "-m", "mlflow", "models", "serve", "-m", str(mlflow_dir), "--env-manager",
                                     "local", "-h", "127.0.0.1", "-p", "{port}", "-w", "2"], "/invocations",
                                    None, {**env, "MLFLOW_DISABLE_TELEMETRY": "1",
                                           "PATH": f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"}),
            "portal": ([PY, "-m", "gunicorn", "portal.wsgi:application", "-w", "2", "-b", "127.0.0.1:{port}",
                        "--log-level", "warning"], "/api/v1/serve/bench-lr/dev/invocations", token, env),
            "bare Django view": ([PY, "-m", "gunicorn", "--chdir", str(work), "django.core.wsgi:get_wsgi_application()",
                                  "-w", "2", "-b", "127.0.0.1:{port}", "--log-level", "warning"], "/invocations", None,
                                 {**env, "DJANGO_SETTINGS_MODULE": "bare_settings", "BARE_MODEL": str(native),
                                  "PYTHONPATH": str(work)}),
        }
        results: dict[tuple[str, int], dict[str, float]] = {}
        for name, (cmd, path, auth, server_env) in servers.items():
            port = free_port()
            proc = subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], cwd=ROOT, env=server_env,
                                    start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}{path}"
            headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {auth}"} if auth else {})}
            try:
                wait_up(url, proc, bodies[1].read_bytes(), headers)
                for rows, body_file in bodies.items():
                    run_wrk(url, body_file, 2, args.connections, auth, work)  # warm-up
                    results[(name, rows)] = run_wrk(url, body_file, args.seconds, args.connections, auth, work)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=30)

        # Every answered portal prediction must be in the log once the flusher has drained the buffer.
        logged = logged_count(env)

    print(f"\nmodel: LogisticRegression, 20 features; portal serving form: {serving_kind}; "
          f"wrk -t2 -c{args.connections} -d{args.seconds}s\n")
    print(f"{'server':<22}{'rows':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}")
    for (name, rows), r in results.items():
        print(f"{name:<22}{rows:>5}{r['rps']:>10.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['non2xx']:>9}  {r['socket_errors']}")
    for rows in bodies:
        portal, mlflow_, bare = (results[(n, rows)]["rps"] for n in ("portal", "mlflow models serve",
                                                                      "bare Django view"))
        print(f"\n{rows}-row bodies: portal / MLflow = {portal / mlflow_:.1f}x (target >= 20x); "
              f"portal / bare view = {portal / bare:.2f}x (target >= 0.6x)")
    expected = sum((results[("portal", rows)]["total"] - results[("portal", rows)]["non2xx"]) * rows
                   for rows in bodies)
    expected_min = expected  # warm-up requests are logged too, so the log may hold more
    print(f"\nportal predictions answered in the measured runs: {expected}; in the log after flushing: {logged} "
          f"({'all present' if logged >= expected_min else 'MISSING ' + str(expected_min - logged)}; the log also "
          "holds the warm-up and readiness requests)")


if __name__ == "__main__":
    main()
