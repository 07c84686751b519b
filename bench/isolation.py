"""Availability under attack: a benign model's latency, and pages', quiet and while two hostile models misbehave.

    .venv/bin/python bench/isolation.py [--seconds 15] [--connections 4] [--attackers 4] [--runs 2] [--host-nice 19]

The real stack as ``make run`` starts it: ``manage.py runstack`` (gunicorn with its gthread workers, a Celery worker
and beat) on PostgreSQL and Redis (BENCH_DATABASE_URL, default ``portal_bench_isolation`` on the local server,
dropped and re-created; BENCH_BROKER_URL, default Redis DB 9 on the local server: give it a database or a server of
its own), debug off, bearer tokens, rate limiting and prediction logging on. Three models, uploaded, scanned and
deployed by the real services:

- ``benign``: a scikit-learn logistic regression (20 features, MLflow archive), served by the in-process ONNX path;
- ``hostile-hang``: a custom pyfunc (trusted by an approver) that never answers a request holding its trigger
  value: its sandboxed host hangs;
- ``hostile-loop``: a bare ONNX graph whose ``Loop`` runs as many times as the request's values add up to; the
  deployment sends it to a sandboxed model host (control flow is not run in-process).

Each run measures, quiet and then under attack: wrk on the benign model (1-row bodies, ``--connections``
connections, ``--seconds`` seconds: requests/s, p50, p99), and, during the same seconds, a sequential client
fetching a page (``/login/``, HTML) and an API list (``/api/v1/models/``): p50 and p99. The attack: ``--attackers``
connections per hostile model, each sending its trigger (``[[666, 1]]`` to the hang, ``[[1e9, 0]]`` to the loop) again
as soon as it is answered (after 50 ms when it was refused at once, so that the refusals themselves do not become a
CPU flood the benchmark would then measure). Prints both side by side with the ratio per run, the medians, the
answers the attackers got, and the machine's load. Goal: the benign p99 under attack within 2x its quiet p99.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import serving  # noqa: E402 - the serving benchmark's helpers (wrk, model, environment)

DB_URL = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/portal_bench_isolation")
BROKER = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/9")
PY = serving.PY

SETUP = serving.BENCH_USER + '''
import shutil
from portal.roles import APPROVER
from registry.models import Deployment
from registry.serving import buffer

approver, _ = User.objects.get_or_create(username="bench-approver")
approver.groups.add(Group.objects.get(name=APPROVER))
Membership.objects.get_or_create(team=team, user=approver)
archive = shutil.make_archive(str(work / "model"), "zip", root_dir=work / "mlflow-model")
uploads = {"benign": (Path(archive), "model.zip"), "hostile-hang": (work / "hang.zip", "model.zip"),
           "hostile-loop": (work / "loop.onnx", "model.onnx")}
for name, (path, filename) in uploads.items():
    model = services.model_register(name=name, team=team, actor=user)
    version = services.version_upload(model=model, upload=LocalUpload(path, filename), meta=services.UploadMetadata(),
                                      reference=LocalUpload(work / "reference.csv", "reference.csv")
                                      if name == "benign" else None, actor=user)
    if version.trust_state == "pending":
        version = services.version_trust_decide(version=version, trust=True, reason="bench/isolation.py",
                                                actor=approver)
    version = services.version_scan(version_id=version.pk)
    assert version.status == "ready", (name, version.status_detail)
    d = deployments.deployment_run(deployment_id=deployments.deployment_start(version=version, environment="dev",
                                                                               actor=user).pk)
    assert d.status == "live", (name, d.error)
    print("SERVING", name, d.serving_kind, "|", d.log[-3]["message"][:160])
client = buffer.redis_client()
client.delete(buffer.REDIS_KEY, buffer.PROCESSING_KEY, *buffer.stream_keys())
print("TOKEN", portal_services.token_create(user=user, name="bench", actor=user)[1])
'''


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


class Sampler(threading.Thread):
    """A sequential client fetching ``path`` until stopped: latencies (ms) and status codes."""

    def __init__(self, url: str, token: str | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.token = url, token
        self.latencies: list[float] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.stopping = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        while not self.stopping.is_set():
            started = time.perf_counter()
            try:
                status = session.get(self.url, headers=headers, timeout=60).status_code
            except requests.RequestException:
                status = 0
            self.latencies.append((time.perf_counter() - started) * 1000)
            self.statuses[status] += 1
            time.sleep(0.02)


class Attacker(threading.Thread):
    """One connection sending ``body`` to a hostile model again as soon as it is answered."""

    def __init__(self, url: str, token: str, body: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.token, self.body = url, token, body
        self.answers: collections.Counter[str] = collections.Counter()
        self.stopping = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        while not self.stopping.is_set():
            started = time.perf_counter()
            try:
                response = session.post(self.url, data=self.body, headers=headers, timeout=120)
                code = response.json().get("error", {}).get("code", "ok") if response.status_code != 200 else "ok"
                self.answers[f"{response.status_code} {code}"] += 1
            except (requests.RequestException, ValueError):
                self.answers["connection error"] += 1
            if time.perf_counter() - started < 0.05:
                time.sleep(0.05)


def measure(base: str, token: str, body_file: Path, seconds: int, connections: int, work: Path) -> dict[str, Any]:
    pages = {"page /login/": Sampler(base + "/login/"), "API /api/v1/models/": Sampler(base + "/api/v1/models/", token)}
    for sampler in pages.values():
        sampler.start()
    result: dict[str, Any] = {"benign": serving.run_wrk(base + "/api/v1/serve/benign/dev/invocations", body_file,
                                                        seconds, connections, token, work, threads=1)}
    for name, sampler in pages.items():
        sampler.stopping.set()
        sampler.join()
        result[name] = {"p50": percentile(sampler.latencies, 50), "p99": percentile(sampler.latencies, 99),
                        "n": len(sampler.latencies), "statuses": dict(sampler.statuses)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--attackers", type=int, default=4, help="connections per hostile model")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--host-nice", type=int, default=10, choices=range(20), metavar="0-19",
                        help="PORTAL_MODEL_HOST_NICE for the stack (the portal's default, 10; 0 is the control)")
    args = parser.parse_args()
    from tests.registry import hostile

    serving.recreate_database(DB_URL)
    with tempfile.TemporaryDirectory(prefix="bench-isolation-") as tmp:
        work = Path(tmp)
        _mlflow_dir, _native, columns = serving.build_model(work)
        body_file = serving.body(columns, 1, work)
        (work / "hang.zip").write_bytes(hostile.hanging_pyfunc_zip())
        (work / "loop.onnx").write_bytes(hostile.onnx_loop())
        env = {**serving.portal_env(work), "DATABASE_URL": DB_URL, "CELERY_BROKER_URL": BROKER,
               "PORTAL_MODEL_HOST_NICE": str(args.host_nice)}
        print(f"model hosts at nice {args.host_nice} (PORTAL_MODEL_HOST_NICE)", flush=True)
        subprocess.run([PY, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        subprocess.run([PY, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)  # as make run
        done = subprocess.run([PY, "manage.py", "shell", "-c", SETUP.replace("sys.argv[1]", repr(str(work)))],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:  # what failed, not only that it did
            raise SystemExit(f"the set-up failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        out = done.stdout
        token = re.search(r"TOKEN (\S+)", out).group(1)  # type: ignore[union-attr]
        for line in re.findall(r"SERVING .*", out):
            print(line)
        port = serving.free_port()
        stack = subprocess.Popen([PY, "manage.py", "runstack", "--port", str(port)], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=open(work / "stack.log", "wb"),  # noqa: SIM115
                                 start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        results: list[tuple[dict[str, Any], dict[str, Any]]] = []
        answers: collections.Counter[str] = collections.Counter()
        try:
            serving.wait_up(base + "/api/v1/serve/benign/dev/invocations", stack, body_file.read_bytes(),
                            {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            for name, row in (("hostile-hang", [1.0, 2.0]), ("hostile-loop", [0.0, 0.0])):  # hosts started
                for _ in range(4):  # both web workers, whichever accepts
                    requests.post(f"{base}/api/v1/serve/{name}/dev/invocations", timeout=120,
                                  headers={"Authorization": f"Bearer {token}"},
                                  json={"dataframe_split": {"columns": hostile.COLUMNS, "data": [row]}})
            serving.run_wrk(base + "/api/v1/serve/benign/dev/invocations", body_file, 2, args.connections, token,
                            work, threads=1)  # warm-up
            for run in range(args.runs):
                quiet = measure(base, token, body_file, args.seconds, args.connections, work)
                attackers = [Attacker(f"{base}/api/v1/serve/{name}/dev/invocations", token, json.dumps(
                    {"dataframe_split": {"columns": hostile.COLUMNS, "data": [row]}}).encode())
                    for name, row in (("hostile-hang", [hostile.TRIGGER, 1.0]), ("hostile-loop", [1e9, 0.0]))
                    for _ in range(args.attackers)]
                for attacker in attackers:
                    attacker.start()
                time.sleep(2)  # the hosts are busy, hung or being restarted
                attacked = measure(base, token, body_file, args.seconds, args.connections, work)
                for attacker in attackers:
                    attacker.stopping.set()
                for attacker in attackers:
                    attacker.join(timeout=30)
                    answers.update({f"{attacker.url.split('/')[-3]}: {k}": v for k, v in attacker.answers.items()})
                results.append((quiet, attacked))
                print_run(run + 1, quiet, attacked)
                time.sleep(3)  # the attack's last requests end
        finally:
            stack.send_signal(signal.SIGTERM)
            try:
                stack.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(stack.pid, signal.SIGKILL)
        print_summary(results, answers)
        print(f"machine load: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min) on "
              f"{os.cpu_count()} cores")


ROWS = (("benign model", "benign"), ("page /login/", "page /login/"), ("API /api/v1/models/", "API /api/v1/models/"))


def print_run(run: int, quiet: dict[str, Any], attacked: dict[str, Any]) -> None:
    print(f"\nrun {run}")
    print(f"{'':22}{'quiet p50':>10}{'p99':>9}{'attack p50':>12}{'p99':>9}{'p99 ratio':>11}   notes")
    for label, key in ROWS:
        q, a = quiet[key], attacked[key]
        if key == "benign":
            notes = (f"{q['rps']:.0f} -> {a['rps']:.0f} req/s, non-2xx {q['non2xx']} -> {a['non2xx']}"
                     + (f", {a['socket_errors']}" if a["socket_errors"] else ""))
        else:
            notes = f"{q['n']} -> {a['n']} fetches, statuses {q['statuses']} -> {a['statuses']}"
        print(f"{label:22}{q['p50']:>10.1f}{q['p99']:>9.1f}{a['p50']:>12.1f}{a['p99']:>9.1f}"
              f"{a['p99'] / q['p99']:>10.2f}x   {notes}")


def print_summary(results: list[tuple[dict[str, Any], dict[str, Any]]], answers: collections.Counter[str]) -> None:
    print(f"\nmedians over {len(results)} runs (ms)")
    print(f"{'':22}{'quiet p50':>10}{'p99':>9}{'attack p50':>12}{'p99':>9}{'p99 ratio':>11}")
    for label, key in ROWS:
        values = {part: serving.median([r[i][key][part] for r in results]) for i, part in ((0, "p50"), (0, "p99"))}
        attacked = {part: serving.median([r[1][key][part] for r in results]) for part in ("p50", "p99")}
        ratio = serving.median([r[1][key]["p99"] / r[0][key]["p99"] for r in results])
        print(f"{label:22}{values['p50']:>10.1f}{values['p99']:>9.1f}{attacked['p50']:>12.1f}{attacked['p99']:>9.1f}"
              f"{ratio:>10.2f}x")
    print("goal: the benign model's p99 under attack within 2x its quiet p99")
    print("what the attackers got: " + ", ".join(f"{k} x{v}" for k, v in sorted(answers.items())))


if __name__ == "__main__":
    main()
