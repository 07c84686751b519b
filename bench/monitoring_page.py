"""The monitoring page's server time for a model with 10,000 logged predictions against one with 10,000,000, both
over 30 days, in one run (the page reads rollups, never the prediction log).

    .venv/bin/python bench/monitoring_page.py [--small 10000] [--large 10000000] [--repeat 20]

Predictions (20 numeric inputs, a 0/1 output, a latency) are generated inside PostgreSQL with bulk INSERTs into a
fresh database (portal_bench_monitoring), every minute holding them is marked, and the portal's own rollup code
rolls them up (its throughput is printed too). The page is then fetched through Django's full stack (middleware,
session, template) for a 30-day range, alternating the two models; medians and the ratio are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.serving import bench_keys  # noqa: E402 - production asks for explicit keys
ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = "portal_bench_monitoring"
DB_URL = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
FEATURES = 20
STEP_ROWS = 1_000_000


def configure() -> None:
    for key in [k for k in os.environ if k.startswith(("PORTAL_", "DJANGO_"))]:
        del os.environ[key]
    os.environ.update(DATABASE_URL=DB_URL, CELERY_BROKER_URL="redis://127.0.0.1:6379/3", PORTAL_DEBUG="0",
                      PORTAL_SECRET_KEY="bench-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
                      PORTAL_ALLOWED_HOSTS="testserver", PORTAL_SECURE_SSL_REDIRECT="0",
                      PORTAL_SECURE_COOKIES="0", PORTAL_VAR_DIR=str(ROOT / "var" / "bench" / "monitoring"),
                      PORTAL_LOG_LEVEL="WARNING", DJANGO_SETTINGS_MODULE="config.settings",
                      **bench_keys())


def fresh_database() -> None:
    admin = psycopg2.connect(ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {DB_NAME}")
    admin.close()
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=os.environ,
                   check=True)


def make_model(name: str, admin: object) -> None:
    import numpy as np

    from portal.models import Team
    from registry.models import (Blob, Deployment, EnvironmentState, ModelVersion, ReferenceData, RegisteredModel)

    team, _ = Team.objects.get_or_create(slug="bench", defaults={"name": "Bench"})
    model = RegisteredModel.objects.create(name=name, team=team)
    edges = np.quantile(np.random.default_rng(1).normal(0, 1, 100_000), np.linspace(0, 1, 11)).tolist()
    profile = {"rows": 100_000, "features": {f"f{i:02d}": {"kind": "numeric", "missing_rate": 0.0, "edges": edges,
                                                             "counts": [0] + [10_000] * 10 + [0]}
                                             for i in range(FEATURES)}}
    blob = Blob.objects.create(sha256=os.urandom(32).hex(), size=1, storage_name="bench")
    reference = ReferenceData.objects.create(blob=blob, format="csv", rows=100_000, profile=profile)
    version = ModelVersion.objects.create(
        model=model, number=1, status="ready", artifact=blob, artifact_sha256=blob.sha256, artifact_size=1,
        format="onnx", reference=reference,
        signature={"inputs": [{"name": f"f{i:02d}", "type": "double"} for i in range(FEATURES)],
                   "outputs": [{"type": "long"}]})
    deployment = Deployment.objects.create(model=model, version=version, environment="prod", status="live",
                                           progress=100, requested_by=admin)
    EnvironmentState.objects.create(model=model, environment="prod", champion=deployment, generation=1)


def insert_predictions(name: str, rows: int) -> float:
    """Rows drawn from 1,000 distinct input vectors (built once), so generating them costs little per row."""
    array = ", ".join("round((random() * 3 - 1.5)::numeric, 4)" for _ in range(FEATURES))
    sql = f"""
        WITH pool AS (SELECT array_agg(v) AS vs FROM (SELECT jsonb_build_array({array}) AS v
                                                      FROM generate_series(1, 1000)) p)
        INSERT INTO monitoring_predictionlog (id, model_name, version, environment, role, created_at, latency_ms,
            inputs, output, subject_hash, request_id, error, shadow_of)
        SELECT md5(%s || g::text), %s, 1, 'prod', 'champion', now() - random() * interval '30 days',
               exp(random() * 3), pool.vs[1 + floor(random() * 1000)::int], to_jsonb((random() > 0.4)::int),
               '', '', '', ''
        FROM generate_series(%s, %s) AS g, pool"""
    started = time.perf_counter()
    conn = psycopg2.connect(DB_URL)
    with conn, conn.cursor() as cur:
        for lo in range(0, rows, STEP_ROWS):
            cur.execute(sql, [name, name, lo, min(lo + STEP_ROWS, rows) - 1])
            conn.commit()
            print(f"  {name}: {min(lo + STEP_ROWS, rows):,} rows, {time.perf_counter() - started:.0f} s", flush=True)
        cur.execute("""INSERT INTO monitoring_rollupdirty (model_name, environment, minute, marked_at)
                       SELECT DISTINCT model_name, environment, date_trunc('minute', created_at), now()
                       FROM monitoring_predictionlog WHERE model_name = %s""", [name])
    conn.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    configure()
    fresh_database()
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.test.utils import override_settings

    # Static files from the source tree (no collectstatic manifest in a bench database's run).
    override_settings(STORAGES={**settings.STORAGES, "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}).enable()

    from monitoring.models import Rollup
    from monitoring.rollups import rollup_dirty

    admin = get_user_model().objects.create_superuser("bench", "bench@example.invalid", "bench-pass-123456")
    models = {"small": ("bench_small", args.small), "large": ("bench_large", args.large)}
    timings: dict[str, float] = {}
    for key, (name, rows) in models.items():
        make_model(name, admin)
        timings[f"insert {key}"] = insert_predictions(name, rows)
    started = time.perf_counter()
    minutes = 0
    while True:
        done = rollup_dirty()
        if not done:
            break
        minutes += done
    rollup_seconds = time.perf_counter() - started
    total_rows = args.small + args.large
    client = Client()
    client.force_login(admin)
    samples: dict[str, list[float]] = {"small": [], "large": []}
    api: dict[str, list[float]] = {"small": [], "large": []}
    for i in range(args.repeat + 3):
        for key, (name, _rows) in models.items():
            started = time.perf_counter()
            response = client.get(f"/models/{name}/environments/prod/monitoring?range=30d")
            page = time.perf_counter() - started
            assert response.status_code == 200, response.status_code
            started = time.perf_counter()
            body = client.get(f"/api/v1/models/{name}/environments/prod/monitoring?range=30d")
            call = time.perf_counter() - started
            assert body.status_code == 200 and body.json()["totals"]["predictions"] > 0
            if i >= 3:  # the first rounds warm caches and code paths
                samples[key].append(page)
                api[key].append(call)
    small, large = statistics.median(samples["small"]), statistics.median(samples["large"])
    api_small, api_large = statistics.median(api["small"]), statistics.median(api["large"])
    print(f"\nmonitoring page, 30 days, median of {args.repeat} (Django test client through the full stack)\n")
    print(f"{'predictions':>14}{'page ms':>10}{'API ms':>10}{'rollup rows':>13}")
    for key, (name, rows) in models.items():
        count = Rollup.objects.filter(model_name=name).count()
        print(f"{rows:>14,}{statistics.median(samples[key]) * 1000:10.1f}{statistics.median(api[key]) * 1000:10.1f}"
              f"{count:>13,}")
    print(f"\nratio large/small: page {large / small:.2f}x, API {api_large / api_small:.2f}x (target <= 1.5x)")
    print(f"rolling up {total_rows:,} predictions ({minutes:,} minutes): {rollup_seconds:.1f} s, "
          f"{total_rows / rollup_seconds:,.0f} predictions/s; generating them: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
