"""Snapshot benchmark: a million logged predictions joined with their ground truth, cut by the portal in chunks
(keyset-paginated queries, Parquet parts, one streamed ParquetWriter) beside ``pandas.read_sql`` + ``to_parquet`` of
the same rows, in one run, each in its own process so each peak RSS (VmHWM) is its own.

    .venv/bin/python bench/snapshots.py [--rows 1000000] [--features 12] [--chunk-rows 20000]

Creates a scratch PostgreSQL database (``portal_bench_snapshots``), migrates it, registers a model with one version
whose signature has ``--features`` double inputs, and COPYs ``--rows`` prediction-log rows (subject hashes on every
row, ground truth for 80 % of them) into the last hour. Then:
- the portal: ``snapshot_create`` + ``snapshot_cut`` (what the Celery worker runs), wall time, rows/s, peak RSS;
- the peer: ``pandas.read_sql`` of the same join (log LEFT JOIN feedback over the window, the same order), the
  inputs spread into one column per feature, ``DataFrame.to_parquet``; wall time, rows/s, peak RSS.
Prints both, the ratios, and checks that the two files hold the same prediction ids in the same order.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = "portal_bench_snapshots"
DB_URL = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
LOG_COLUMNS = ["id", "model_name", "version", "environment", "role", "created_at", "latency_ms", "inputs", "output",
               "subject_hash", "request_id", "error", "shadow_of"]
QUERY = """SELECT p.id AS prediction_id, p.created_at, p.version, p.role, p.subject_hash, p.inputs,
                  p.output AS prediction, f.actual, f.id IS NOT NULL AS labelled
           FROM monitoring_predictionlog p LEFT JOIN monitoring_feedback f ON f.prediction_id = p.id
           WHERE p.model_name = 'bench' AND p.environment = 'dev' AND p.created_at >= %(start)s
             AND p.created_at < %(end)s AND p.role IN ('champion', 'canary') AND p.inputs IS NOT NULL
           ORDER BY p.created_at, p.id"""


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def env_for(work: Path, chunk_rows: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTAL_", "DJANGO_"))}
    env.update(DATABASE_URL=DB_URL, CELERY_BROKER_URL=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/3"),
               PORTAL_DEBUG="1", PORTAL_VAR_DIR=str(work / "var"), PORTAL_LOG_LEVEL="WARNING",
               PORTAL_SNAPSHOT_CHUNK_ROWS=str(chunk_rows), DJANGO_SETTINGS_MODULE="config.settings")
    return env


def fresh_database(env: dict[str, str]) -> None:
    admin = psycopg2.connect(ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {DB_NAME}")
        cur.execute(f"CREATE DATABASE {DB_NAME}")
    admin.close()
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)


def setup_model(features: int) -> None:
    import django

    django.setup()
    from django.contrib.auth.models import Group, User

    from portal.models import Membership, Team
    from portal.roles import sync_roles
    from registry.models import ModelVersion, RegisteredModel

    sync_roles()
    team, _ = Team.objects.get_or_create(slug="bench", defaults={"name": "Bench"})
    user, _ = User.objects.get_or_create(username="bench-ds")
    user.groups.add(Group.objects.get(name="data_scientist"))
    Membership.objects.get_or_create(team=team, user=user)
    model, _ = RegisteredModel.objects.get_or_create(name="bench", team=team)
    ModelVersion.objects.get_or_create(model=model, number=1, defaults={
        "artifact_sha256": "0" * 64, "artifact_size": 0, "format": "joblib", "status": "ready",
        "signature": {"inputs": [{"name": f"f{i}", "type": "double"} for i in range(features)],
                      "outputs": [{"type": "long"}]}})


def write_rows(n: int, features: int, start: datetime) -> float:
    """N log rows and ground truth for 80 % of them, by COPY; returns seconds."""
    rng = random.Random(7)  # noqa: S311 - bench data, not secrets
    started = time.perf_counter()
    conn = psycopg2.connect(DB_URL)
    log, truth = io.StringIO(), io.StringIO()
    step = 3_000_000 / max(n, 1)  # spread over the last ~50 minutes
    with conn, conn.cursor() as cur:
        for i in range(1, n + 1):
            pid = f"{i:032x}"
            at = (start + timedelta(microseconds=int(i * step * 1000))).isoformat()
            inputs = json.dumps([round(rng.gauss(0, 1), 6) for _ in range(features)])
            subject = f"{rng.randrange(50_000):064x}"
            log.write("\t".join([pid, "bench", "1", "dev", "champion", at, "2.0", inputs, str(i % 2), subject, "", "",
                                 ""]) + "\n")
            if i % 5:
                truth.write(f"{pid}\t{i % 2}\t{at}\tbench\n")
            if i % 100_000 == 0 or i == n:
                log.seek(0)
                truth.seek(0)
                cur.copy_expert(f"COPY monitoring_predictionlog ({', '.join(LOG_COLUMNS)}) FROM STDIN", log)
                cur.copy_expert("COPY monitoring_feedback (prediction_id, actual, received_at, submitted_by) "
                                "FROM STDIN", truth)
                log, truth = io.StringIO(), io.StringIO()
        cur.execute("ANALYZE monitoring_predictionlog")
        cur.execute("ANALYZE monitoring_feedback")
    conn.close()
    return time.perf_counter() - started


def child_portal(start: str, end: str) -> None:
    import django

    django.setup()
    from django.contrib.auth.models import User

    from monitoring.datasets.cut import snapshot_cut
    from monitoring.datasets.services import snapshot_create
    from registry.models import RegisteredModel

    began = time.perf_counter()
    snapshot = snapshot_create(model=RegisteredModel.objects.get(name="bench"), environment="dev",
                               start=datetime.fromisoformat(start), end=datetime.fromisoformat(end),
                               actor=User.objects.get(username="bench-ds"), labelled_only=False)
    done = snapshot_cut(snapshot_id=snapshot.pk)
    seconds = time.perf_counter() - began
    assert done is not None and done.status == "ready", done.error if done else "not claimed"
    from registry import storage

    assert done.blob is not None
    with storage.verified_local_path(done.blob) as path:
        import pyarrow.parquet as pq

        ids = pq.read_table(path, columns=["prediction_id"]).column(0)
        first, last = ids[0].as_py(), ids[-1].as_py()
    print(json.dumps({"seconds": seconds, "rows": done.manifest["rows"], "size": done.size, "chunks": done.chunks_done,
                      "peak_rss_mb": peak_rss_mb(os.getpid()), "first": first, "last": last}))


def child_pandas(start: str, end: str, out: str) -> None:
    import pandas as pd

    began = time.perf_counter()
    conn = psycopg2.connect(DB_URL)
    frame = pd.read_sql(QUERY, conn, params={"start": start, "end": end})
    spread = pd.DataFrame(frame.pop("inputs").tolist(), index=frame.index)
    spread.columns = [f"f{i}" for i in range(spread.shape[1])]
    frame = pd.concat([frame, spread], axis=1)
    frame["prediction"] = frame["prediction"].astype(float)
    frame["actual"] = pd.to_numeric(frame["actual"])
    frame.to_parquet(out, compression="zstd")
    seconds = time.perf_counter() - began
    conn.close()
    print(json.dumps({"seconds": seconds, "rows": len(frame), "size": Path(out).stat().st_size,
                      "peak_rss_mb": peak_rss_mb(os.getpid()), "first": frame["prediction_id"].iloc[0],
                      "last": frame["prediction_id"].iloc[-1]}))


def run_child(env: dict[str, str], *args: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=12)
    parser.add_argument("--chunk-rows", type=int, default=20_000)
    parser.add_argument("--child", nargs="*")
    parser.add_argument("--keep-database", action="store_true", help="leave the scratch database for a look")
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "portal":
            child_portal(args.child[1], args.child[2])
        else:
            child_pandas(args.child[1], args.child[2], args.child[3])
        return
    with tempfile.TemporaryDirectory(prefix="bench-snapshots-") as tmp:
        work = Path(tmp)
        env = env_for(work, args.chunk_rows)
        os.environ.update({k: v for k, v in env.items() if k in ("DATABASE_URL", "PORTAL_DEBUG", "PORTAL_VAR_DIR",
                                                                 "DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL")})
        fresh_database(env)
        setup_model(args.features)
        start = datetime.now(UTC) - timedelta(hours=1)
        end = datetime.now(UTC) + timedelta(minutes=1)
        print(f"writing {args.rows:,} log rows with {args.features} features (80 % labelled) ...", flush=True)
        print(f"  {write_rows(args.rows, args.features, start):.1f} s", flush=True)
        print(f"  window {start.isoformat()} {end.isoformat()}", flush=True)
        portal = run_child(env, "portal", start.isoformat(), end.isoformat())
        peer = run_child(env, "pandas", start.isoformat(), end.isoformat(), str(work / "pandas.parquet"))
        assert portal["rows"] == peer["rows"] == args.rows, (portal["rows"], peer["rows"])
        assert (portal["first"], portal["last"]) == (peer["first"], peer["last"]), "the same rows in the same order"
        print(f"\n{'':32}{'seconds':>10}{'rows/s':>12}{'peak RSS MB':>14}{'file MB':>10}")
        for name, r in ((f"portal (chunks of {args.chunk_rows})", portal), ("pandas read_sql + to_parquet", peer)):
            print(f"{name:32}{r['seconds']:>10.1f}{r['rows'] / r['seconds']:>12,.0f}{r['peak_rss_mb']:>14.0f}"
                  f"{r['size'] / 1e6:>10.1f}")
        print(f"\nthroughput portal / pandas: {peer['seconds'] / portal['seconds']:.2f}x; "
              f"peak RSS portal / pandas: {portal['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x")
    from django.db import connections

    connections.close_all()
    if args.keep_database:
        return
    admin = psycopg2.connect(ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {DB_NAME}")
    admin.close()


if __name__ == "__main__":
    main()
