"""Soak: scoring at half the measured peak for a long while, with prediction logging on, against real processes.

    .venv/bin/python bench/soak.py [--minutes 10] [--connections 8]

The portal runs as it does in production: gunicorn with 2 workers (PostgreSQL + Redis from DATABASE_URL and
CELERY_BROKER_URL, defaulting to the local services) and a Celery worker with beat that flushes the prediction
buffer into the log as it goes. The model is the serving benchmark's (logistic regression, 20 features, 1-row JSON
bodies). Steps: measure the peak with wrk for 10 s; then run wrk throttled to about half of it (a per-request delay
in wrk's Lua script) minute after minute, sampling the resident memory of every web and worker process after each
minute. It prints requests/s per minute, errors (non-2xx and socket errors), the RSS of the web workers and of the
Celery worker from the end of the first minute (warm) to the end, and whether every answered prediction reached the
log. Targets (issue 9): 0 errors, RSS growth under 10 %, 0 predictions lost.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import (  # the serving benchmark's helpers: one way to build, start and load the portal
    DB_URL,
    PY,
    ROOT,
    SETUP,
    body,
    build_model,
    free_port,
    logged_count,
    portal_env,
    recreate_database,
    run_wrk,
    wait_up,
)

def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def process_tree(pid: int) -> list[int]:
    found = [pid]
    for child in children(pid):
        found += process_tree(child)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    recreate_database(DB_URL)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        work = Path(tmp)
        _mlflow_dir, _native, columns = build_model(work)
        one_row = body(columns, 1, work)
        env = portal_env(work)
        subprocess.run([PY, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        out = subprocess.run([PY, "manage.py", "shell", "-c", SETUP.replace("sys.argv[1]", repr(str(work)))],
                             cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
        token = re.search(r"TOKEN (\S+)", out).group(1)  # type: ignore[union-attr]
        port = free_port()
        web = subprocess.Popen([PY, "-m", "gunicorn", "config.wsgi:application", "-w", "2", "-b", f"127.0.0.1:{port}",
                                "--log-level", "warning"], cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        worker = subprocess.Popen([PY, "-m", "celery", "-A", "config", "worker", "-B", "--pool", "solo",
                                   "--loglevel", "WARNING", "-s", str(work / "beat-schedule")], cwd=ROOT, env=env,
                                  start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/api/v1/serve/bench-lr/dev/invocations"
        minutes: list[dict[str, float]] = []
        try:
            wait_up(url, web, one_row.read_bytes(), {"Content-Type": "application/json",
                                                     "Authorization": f"Bearer {token}"})
            warm = run_wrk(url, one_row, 3, args.connections, token, work)
            peak = run_wrk(url, one_row, 10, args.connections, token, work)
            before_soak = 1 + sum(r["total"] - r["non2xx"] for r in (warm, peak))  # 1: the readiness request
            target = peak["rps"] / 2
            # Each connection waits `delay` between requests: rate = connections * 1000 / (delay + latency). The
            # latency at half load is not the latency at peak: one calibration run measures it.
            delay_ms = max(0, round(args.connections * 1000 / target - peak["p50"]))
            probe = run_wrk(url, one_row, 10, args.connections, token, work, delay_ms)
            latency = max(0.0, args.connections * 1000 / probe["rps"] - delay_ms)
            delay_ms = max(0, round(args.connections * 1000 / target - latency))
            before_soak += probe["total"] - probe["non2xx"]
            runs = 3  # warm-up, peak and calibration; each run (and each soak minute) can leave requests in flight
            print(f"peak {peak['rps']:.0f} req/s (p50 {peak['p50']:.2f} ms); soaking at about {target:.0f} req/s "
                  f"for {args.minutes} min (wrk -c{args.connections}, {delay_ms} ms between a connection's requests)",
                  flush=True)
            print(f"{'minute':>6}{'req/s':>9}{'p99 ms':>9}{'errors':>8}{'web MB':>9}{'worker MB':>11}"
                  f"{'(beat)':>8}", flush=True)
            for minute in range(1, args.minutes + 1):
                result = run_wrk(url, one_row, 60, args.connections, token, work, delay_ms)
                web_pids = [p for p in process_tree(web.pid) if p != web.pid]  # the workers, not the arbiter
                result["web_mb"] = sum(rss_mb(p) for p in web_pids)
                result["worker_mb"] = sum(rss_mb(p) for p in process_tree(worker.pid))
                result["beat_mb"] = sum(rss_mb(p) for p in children(worker.pid))  # -B runs beat in a child
                result["errors"] = result["non2xx"] + (1 if result["socket_errors"] else 0)
                minutes.append(result)
                print(f"{minute:>6}{result['rps']:>9.0f}{result['p99']:>9.2f}{result['non2xx']:>8}"
                      f"{result['web_mb']:>9.1f}{result['worker_mb']:>11.1f}{result['beat_mb']:>8.1f}  "
                      f"{result['socket_errors']}", flush=True)
            time.sleep(5)  # the last flush by beat
            logged = logged_count(env)
        finally:
            for proc in (web, worker):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)
    answered = sum(m["total"] - m["non2xx"] for m in minutes)
    first, last = minutes[0], minutes[-1]
    web_growth = (last["web_mb"] / first["web_mb"] - 1) * 100
    worker_growth = (last["worker_mb"] / first["worker_mb"] - 1) * 100
    errors = sum(m["non2xx"] for m in minutes)
    socket_errors = [m["socket_errors"] for m in minutes if m["socket_errors"]]
    print(f"\nanswered in the soak: {answered:,} at {answered / (60 * len(minutes)):.0f} req/s on average "
          f"(target {target:.0f}); non-2xx: {errors}; socket errors: {socket_errors or 'none'}")
    print(f"RSS from the end of minute 1 to the end: web workers {first['web_mb']:.1f} -> {last['web_mb']:.1f} MB "
          f"({web_growth:+.1f} %), Celery worker and beat {first['worker_mb']:.1f} -> {last['worker_mb']:.1f} MB "
          f"({worker_growth:+.1f} %); target under +10 %")
    expected = answered + before_soak
    # wrk counts the requests it saw answered; those in flight when a run stops are answered (and logged) by the
    # server without wrk counting them: at most `connections` per run.
    in_flight = args.connections * (runs + len(minutes))
    verdict = ("none lost" if 0 <= logged - expected <= in_flight
               else f"LOST {expected - logged:,}" if logged < expected else "MORE THAN IN FLIGHT: check")
    print(f"predictions in the log: {logged:,}; counted by wrk: {expected:,} (soak {answered:,}; warm-up, peak, "
          f"calibration and readiness {before_soak:,}); {logged - expected:+,} answered while wrk stopped "
          f"(at most {in_flight}): {verdict}")


if __name__ == "__main__":
    main()
