"""Fault injection: restart Redis and PostgreSQL under steady scoring load, with a batch job and a deployment in
flight, against real processes.

    .venv/bin/python bench/faults.py [--rate 200] [--outage 5]

The script starts its own PostgreSQL cluster and Redis server (so that restarting them touches no one else's),
Redis with an append-only file as production runs the prediction buffer, then the portal as in production: gunicorn
with 2 workers and a Celery worker with beat. A load generator (8 threads, keep-alive connections) scores 1-row
bodies at a steady rate and records every answer with its time and prediction ids. Timeline:

- a batch job is submitted, then Redis is stopped for ``--outage`` seconds and started again (same data);
- a deployment (the live version again, replace strategy) is started, then PostgreSQL is stopped for ``--outage``
  seconds (fast shutdown: connections are cut) and started again;
- the load goes on until things settle, then stops.

It prints, per fault: requests answered and failed during the fault window, the time from the service being back to
the first good answer, and then: every prediction id handed to a client that is missing from the log (must be 0),
how long the worker took to bring the log up to date without help, and the final state of the batch job and the
deployment (stuck = not in a final state 3 minutes after the faults: must be 0). Exits 1 if anything is lost or stuck.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import PY, ROOT, SETUP, body, build_model, free_port, portal_env, wait_up

PG_BIN = Path("/usr/lib/postgresql") / (sorted(os.listdir("/usr/lib/postgresql"))[-1] if Path(
    "/usr/lib/postgresql").exists() else "15") / "bin"


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PrivatePostgres:
    """A throw-away cluster on a free port: initdb, start, stop (fast: open connections are cut), start again."""

    def __init__(self, work: Path) -> None:
        self.dir = work / "pg"
        self.dir.mkdir()
        if os.geteuid() == 0:
            subprocess.run(["chown", "postgres", str(self.dir)], check=True)
        self.port = free_port()
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
                                     "--auth=trust", "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
        self.start()

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/portal"

    def start(self) -> None:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-w", "-l",
                                     str(self.dir / "log"), "-o",
                                     f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                                     "-c max_connections=100", "start"]), check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-w", "-m", "fast",
                                     "stop"]), check=True, capture_output=True)

    def createdb(self) -> None:
        subprocess.run(["psql", f"postgres://postgres@127.0.0.1:{self.port}/postgres", "-qc",
                        "CREATE DATABASE portal"], check=True, capture_output=True)


class PrivateRedis:
    """Redis on a free port with an append-only file: what it held before a restart it holds after."""

    def __init__(self, work: Path) -> None:
        self.dir = work / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                              text=True).stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise SystemExit("private Redis did not start")

    def stop(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True)
        assert self.proc is not None
        self.proc.wait(timeout=30)


@dataclass
class Answer:
    at: float  # seconds since the load started
    status: int  # 0: no HTTP answer (connection refused, reset, timeout)
    ids: list[str] = field(default_factory=list)


class Load:
    """Threads on keep-alive connections, each pacing itself so that together they send ``rate`` requests/s."""

    def __init__(self, port: int, path: str, body: bytes, token: str, rate: float, threads: int = 8) -> None:
        self.port, self.path, self.body, self.token = port, path, body, token
        self.interval = threads / rate
        self.answers: list[Answer] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _run(self) -> None:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            try:
                conn.request("POST", self.path, self.body, headers)
                response = conn.getresponse()
                data = response.read()
                ids = orjson.loads(data)["prediction_ids"] if response.status == 200 else []
                self.answers.append(Answer(self.now(), response.status, ids))
            except (OSError, http.client.HTTPException):
                self.answers.append(Answer(self.now(), 0))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            next_at += self.interval
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                next_at = time.monotonic()

    def finish(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=10)


def fault_report(load: Load, name: str, down_at: float, up_at: float) -> dict[str, float]:
    failed = Counter(a.status for a in load.answers if down_at - 1 <= a.at <= up_at + 30 and a.status != 200)
    good_after = [a.at for a in load.answers if a.at >= up_at and a.status == 200]
    recovery = (min(good_after) - up_at) if good_after else float("inf")
    described = ", ".join(f"{k or 'no answer'}: {v}" for k, v in sorted(failed.items())) or "none"
    during = [a for a in load.answers if down_at <= a.at <= up_at]
    ok_during = sum(1 for a in during if a.status == 200)
    print(f"{name}: down {up_at - down_at:.1f} s; {ok_during}/{len(during)} requests answered 200 while it was down; "
          f"failed from 1 s before until 30 s after: {failed.total()} ({described}); first good answer "
          f"{recovery:.2f} s after it was back", flush=True)
    return {"failed": failed.total(), "recovery": recovery}


def outage(load: Load, service: PrivatePostgres | PrivateRedis, seconds: float) -> tuple[float, float]:
    """Stop ``service``, keep it down ``seconds``, start it again; returns when it went down and came back, on the
    load's clock."""
    down = load.now()
    service.stop()
    time.sleep(seconds)
    service.start()
    return down, load.now()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s, steady")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds each service stays down")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # noqa: S103 - the postgres user must reach its data folder inside
        pg, rds = PrivatePostgres(work), PrivateRedis(work)
        pg.createdb()
        _mlflow, _native, columns = build_model(work)
        one_row = body(columns, 1, work)
        batch_csv = work / "batch.csv"
        from sklearn.datasets import make_classification

        X, _ = make_classification(n_samples=200_000, n_features=20, random_state=2)
        import pandas as pd

        pd.DataFrame(X, columns=columns).to_csv(batch_csv, index=False)
        env = portal_env(work)
        env.update(DATABASE_URL=pg.url, CELERY_BROKER_URL=rds.url)
        subprocess.run([PY, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        out = subprocess.run([PY, "manage.py", "shell", "-c", SETUP.replace("sys.argv[1]", repr(str(work)))],
                             cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
        token = re.search(r"TOKEN (\S+)", out).group(1)  # type: ignore[union-attr]
        port = free_port()
        logs = work / "logs"
        logs.mkdir()
        web = subprocess.Popen([PY, "-m", "gunicorn", "config.wsgi:application", "-w", "2", "-b", f"127.0.0.1:{port}",
                                "--log-level", "warning"], cwd=ROOT, env=env, start_new_session=True,
                               stdout=open(logs / "web.log", "wb"), stderr=subprocess.STDOUT)
        worker = subprocess.Popen([PY, "-m", "celery", "-A", "config", "worker", "-B", "--pool", "prefork", "-c", "2",
                                   "--loglevel", "WARNING", "-s", str(work / "beat-schedule")], cwd=ROOT, env=env,
                                  start_new_session=True, stdout=open(logs / "worker.log", "wb"),
                                  stderr=subprocess.STDOUT)
        path = "/api/v1/serve/bench-lr/dev/invocations"
        base = f"http://127.0.0.1:{port}"
        api = {"Authorization": f"Bearer {token}"}
        failures: list[str] = []
        try:
            wait_up(base + path, web, one_row.read_bytes(), {"Content-Type": "application/json", **api})
            load = Load(port, path, one_row.read_bytes(), token, args.rate)
            load.start()
            time.sleep(8)
            with batch_csv.open("rb") as f:
                job = requests.post(f"{base}/api/v1/batch-jobs/", headers=api, timeout=120,
                                    data={"model": "bench-lr", "env": "dev"}, files={"file": ("batch.csv", f)})
            job.raise_for_status()
            job_id = job.json()["id"]
            print(f"batch job {job_id} submitted at {load.now():.1f} s (200,000 rows)", flush=True)
            seen = wait_for(f"{base}/api/v1/batch-jobs/{job_id}/", api, lambda j: (j.get("rows_done") or 0) > 0)
            print(f"  Redis goes down with the job {seen['status']}, {seen['rows_done']:,} rows done", flush=True)
            redis_down, redis_up = outage(load, rds, args.outage)
            time.sleep(15)
            deployment = requests.post(f"{base}/api/v1/models/bench-lr/versions/1/deploy", headers=api, timeout=30,
                                       json={"environment": "dev", "strategy": "replace"})
            deployment.raise_for_status()
            deployment_id = deployment.json()["id"]
            print(f"deployment {deployment_id} started at {load.now():.1f} s", flush=True)
            seen = wait_for(f"{base}/api/v1/deployments/{deployment_id}/", api,
                            lambda d: d["status"] == "running" and d["progress"] >= 30)
            print(f"  PostgreSQL goes down with the deployment {seen['status']} at {seen['progress']} %", flush=True)
            pg_down, pg_up = outage(load, pg, args.outage)
            time.sleep(25)
            load.finish()
            print(f"\nload: {len(load.answers):,} requests over {load.now():.0f} s at {args.rate:.0f} req/s "
                  f"(8 keep-alive connections), 1-row bodies\n")
            redis_fault = fault_report(load, "Redis restart", redis_down, redis_up)
            pg_fault = fault_report(load, "PostgreSQL restart", pg_down, pg_up)
            handed_out = {i for a in load.answers if a.status == 200 for i in a.ids}

            # The worker must bring the log up to date by itself (beat's flush every 2 s).
            started = time.monotonic()
            missing = handed_out
            while time.monotonic() - started < 120:
                missing = missing_ids(env, missing)
                if not missing:
                    break
                time.sleep(2)
            caught_up = time.monotonic() - started
            print(f"\nprediction ids handed to clients: {len(handed_out):,}; missing from the log "
                  f"{caught_up:.0f} s after the load stopped: {len(missing):,}"
                  f"{' (the worker caught up by itself)' if not missing else ''}")
            if missing:
                failures.append(f"{len(missing)} predictions lost")

            finals = {"batch job": (f"/api/v1/batch-jobs/{job_id}/", {"done", "failed", "cancelled"}),
                      "deployment": (f"/api/v1/deployments/{deployment_id}/", {"live", "failed", "retired"})}
            deadline = time.monotonic() + 180
            states: dict[str, dict[str, object]] = {}
            while time.monotonic() < deadline:
                states = {k: requests.get(base + p, headers=api, timeout=10).json() for k, (p, _) in finals.items()}
                if all(states[k]["status"] in ok for k, (_, ok) in finals.items()):
                    break
                time.sleep(2)
            for what, (_, ok) in finals.items():
                state = states.get(what, {})
                detail = state.get("error") or ""
                rows = (f", {state.get('rows_done')}/{state.get('rows_total')} rows" if what == "batch job"
                        else f", attempts {state.get('attempts')}")
                print(f"{what}: {state.get('status')}{rows}{' (' + str(detail)[:200] + ')' if detail else ''}")
                if state.get("status") not in ok:
                    failures.append(f"{what} stuck in {state.get('status')}")
            alive = {"web": web.poll() is None, "worker": worker.poll() is None}
            print(f"processes still running: {alive}")
            print(f"\nsummary: failed requests {redis_fault['failed']:.0f} (Redis) + {pg_fault['failed']:.0f} "
                  f"(PostgreSQL); recovery {redis_fault['recovery']:.2f} s / {pg_fault['recovery']:.2f} s; "
                  f"predictions lost {len(missing)}; stuck {sum('stuck' in f for f in failures)}")
        finally:
            for proc in (web, worker):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
            rds.stop()
            pg.stop()
            if os.environ.get("FAULTS_KEEP_LOGS"):
                for log in logs.iterdir():
                    (ROOT / "var").mkdir(exist_ok=True)
                    (ROOT / "var" / f"faults-{log.name}").write_bytes(log.read_bytes())
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))


def wait_for(url: str, headers: dict[str, str], done: Any, seconds: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        state = requests.get(url, headers=headers, timeout=10).json()
        if done(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def missing_ids(env: dict[str, str], ids: set[str]) -> set[str]:
    """Which of ``ids`` are not in the prediction log (read through Django, as the portal sees it)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f:
        f.write(orjson.dumps(sorted(ids)))
    try:
        out = subprocess.run([PY, "manage.py", "shell", "-c",
                              "import orjson\n"
                              "from monitoring.models import PredictionLog\n"
                              f"ids = orjson.loads(open({f.name!r}, 'rb').read())\n"
                              "found = set()\n"
                              "for i in range(0, len(ids), 5000):\n"
                              "    found |= set(PredictionLog.objects.filter(pk__in=ids[i:i + 5000])"
                              ".values_list('pk', flat=True))\n"
                              "print('MISSING', orjson.dumps(sorted(set(ids) - found)).decode())"],
                             cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    return set(orjson.loads(re.search(r"MISSING (.*)", out).group(1)))  # type: ignore[union-attr]


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
