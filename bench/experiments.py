"""An A/B experiment's analysis over 10 million logged predictions: from the rollups (what the portal does) beside a
full scan of the prediction log joined with its ground truth (what answering from raw rows costs), in one run.

    .venv/bin/python bench/experiments.py [--rows 10000000] [--days 7] [--repeat 5]

A fresh database (portal_bench_experiments) gets a model whose champion (v1, accuracy 0.80) and canary challenger
(v2, accuracy 0.82) split traffic 50/50 by sticky user over ``--days``; the predictions and their ground truth (90 %
of them) are generated with numpy and written with COPY. The per-minute rollups the experiment reads (request and
keyless-request counts, and per arm the outcome sums) are built with one SQL aggregate, hours from the minutes, and
the experiment's units (each user once, for the sample-ratio check) with another; before anything is timed, a sample
of minutes is recomputed with the portal's own rollup and unit code (``monitoring.rollups.compute_minutes``,
``monitoring.experiments.units.units_record``) and must agree with them, and the analysis's per-arm counts, sums and
units must equal the full scan's. Medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.serving import bench_keys  # noqa: E402 - production asks for explicit keys

ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = "portal_bench_experiments"
DB_URL = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
CHUNK = 1_000_000
MODEL = "bench-ab"
ROWS_PER_REQUEST = 2
REQUESTS_PER_USER = 10
ACCURACY = {1: 0.80, 2: 0.82}

FULL_SCAN = """
SELECT p.version, p.role, count(*), count(DISTINCT p.request_id),
       count(f.prediction_id), coalesce(sum(CASE WHEN f.actual = p.output THEN 1 ELSE 0 END), 0),
       count(DISTINCT p.unit_hash) FILTER (WHERE p.unit_hash <> ''),
       count(DISTINCT p.request_id) FILTER (WHERE p.unit_hash = '')
FROM monitoring_predictionlog p LEFT JOIN monitoring_feedback f ON f.prediction_id = p.id
WHERE p.model_name = %s AND p.environment = 'dev' AND p.created_at >= %s AND p.created_at < %s
  AND p.role IN ('champion', 'canary')
GROUP BY p.version, p.role ORDER BY p.version
"""

MINUTE_ROLLUPS = """
INSERT INTO monitoring_rollup (model_name, environment, version, role, granularity, start, count, errors, labelled,
                               data)
SELECT %(model)s, 'dev', version, role, 'minute', minute, n, 0, labelled,
       jsonb_build_object('requests', requests, 'anonymous', anonymous, 'truth', jsonb_build_object(
           'n', labelled, 'correct', correct, 'outcome', jsonb_build_array(labelled, ones, ones),
           'logloss', jsonb_build_array(0, 0.0, 0.0), 'reg', jsonb_build_array(0, 0.0, 0.0, 0.0, 0.0)))
FROM (SELECT p.version, p.role, date_trunc('minute', p.created_at) AS minute, count(*) AS n,
             count(DISTINCT p.request_id) AS requests,
             count(DISTINCT p.request_id) FILTER (WHERE p.unit_hash = '') AS anonymous,
             count(f.prediction_id) AS labelled,
             coalesce(sum(CASE WHEN f.actual = p.output THEN 1 ELSE 0 END), 0) AS correct,
             coalesce(sum(CASE WHEN f.actual = '1'::jsonb THEN 1 ELSE 0 END), 0) AS ones
      FROM monitoring_predictionlog p LEFT JOIN monitoring_feedback f ON f.prediction_id = p.id
      WHERE p.model_name = %(model)s GROUP BY 1, 2, 3) m
"""

HOUR_ROLLUPS = """
INSERT INTO monitoring_rollup (model_name, environment, version, role, granularity, start, count, errors, labelled,
                               data)
SELECT model_name, environment, version, role, 'hour', date_trunc('hour', start), sum(count), 0, sum(labelled),
       jsonb_build_object('requests', sum((data->>'requests')::bigint),
                          'anonymous', sum((data->>'anonymous')::bigint), 'truth', jsonb_build_object(
           'n', sum(labelled), 'correct', sum((data->'truth'->>'correct')::bigint),
           'outcome', jsonb_build_array(sum(labelled), sum((data->'truth'->'outcome'->>1)::float),
                                        sum((data->'truth'->'outcome'->>2)::float)),
           'logloss', jsonb_build_array(0, 0.0, 0.0), 'reg', jsonb_build_array(0, 0.0, 0.0, 0.0, 0.0)))
FROM monitoring_rollup WHERE model_name = %(model)s AND granularity = 'minute'
GROUP BY model_name, environment, version, role, date_trunc('hour', start)
"""


# What the roll-up records per experiment (``monitoring.experiments.units``): each keyed unit once, in the arm and
# at the time of its first request.
EXPERIMENT_UNITS = """
INSERT INTO monitoring_experimentunit (experiment_id, unit_hash, arm, first_seen)
SELECT %(experiment)s, unit_hash, CASE WHEN role = 'canary' THEN 'challenger' ELSE 'champion' END, min(created_at)
FROM monitoring_predictionlog WHERE model_name = %(model)s AND unit_hash <> '' AND created_at >= %(started)s
GROUP BY unit_hash, role
"""


def configure() -> None:
    for key in [k for k in os.environ if k.startswith(("PORTAL_", "DJANGO_"))]:
        del os.environ[key]
    os.environ.update(DATABASE_URL=DB_URL, CELERY_BROKER_URL=os.environ.get(
        "BENCH_BROKER_URL", "redis://127.0.0.1:6379/3"), PORTAL_DEBUG="0",
        PORTAL_SECRET_KEY="bench-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
        PORTAL_ALLOWED_HOSTS="testserver", PORTAL_SECURE_SSL_REDIRECT="0", PORTAL_SECURE_COOKIES="0",
        PORTAL_VAR_DIR=str(ROOT / "var" / "bench" / "experiments"), PORTAL_LOG_LEVEL="WARNING",
        DJANGO_SETTINGS_MODULE="config.settings", **bench_keys())


def fresh_database() -> None:
    admin = psycopg2.connect(ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {DB_NAME}")
    admin.close()
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=os.environ,
                   check=True)


def make_model(started: float) -> object:
    import datetime as dt

    from django.contrib.auth import get_user_model

    from monitoring.experiments import stats
    from monitoring.experiments.models import Experiment
    from portal.models import Team
    from registry.models import Blob, Deployment, EnvironmentState, ModelVersion, RegisteredModel

    admin = get_user_model().objects.create_superuser("bench", "bench@example.invalid", "bench-pass-123456")
    team, _ = Team.objects.get_or_create(slug="bench", defaults={"name": "Bench"})
    model = RegisteredModel.objects.create(name=MODEL, team=team)
    deployments = []
    for number in (1, 2):
        blob = Blob.objects.create(sha256=os.urandom(32).hex(), size=1, storage_name="bench")
        version = ModelVersion.objects.create(
            model=model, number=number, status="ready", artifact=blob, artifact_sha256=blob.sha256, artifact_size=1,
            format="onnx", signature={"inputs": [{"name": "x", "type": "double"}], "outputs": [{"type": "long"}]})
        deployments.append(Deployment.objects.create(
            model=model, version=version, environment="dev", status="live", progress=100, requested_by=admin,
            strategy="replace" if number == 1 else "canary", traffic_percent=100 if number == 1 else 50))
    EnvironmentState.objects.create(model=model, environment="dev", champion=deployments[0],
                                    challenger=deployments[1], mode="canary", challenger_percent=50, generation=1)
    plan = stats.plan(sd=0.4, mde=0.01, alpha=0.05)
    return Experiment.objects.create(
        model=model, environment="dev", champion=deployments[0], challenger=deployments[1], champion_version=1,
        challenger_version=2, traffic_percent=50, metric="accuracy", mde=0.01, alpha=0.05, baseline_sd=0.4,
        tau2=plan.tau2, planned_sample=plan.planned_sample, fixed_horizon_sample=plan.fixed_horizon_sample,
        started_by=admin, started_at=dt.datetime.fromtimestamp(started, dt.UTC))


def generate(rows: int, start: float, end: float) -> float:
    """``rows`` predictions with numpy, written with COPY: requests of two rows from sticky users (one user sends
    ``REQUESTS_PER_USER`` requests on average, at any time in the window) split half to each side by user, and one
    request in ten without a key (split by request); answers 0/1, ground truth for 90 % that is right with each
    side's accuracy."""
    rng = np.random.default_rng(35)
    began = time.perf_counter()
    conn = psycopg2.connect(DB_URL)
    written = 0
    while written < rows:
        n = min(CHUNK, rows - written)
        requests = np.arange(written, written + n) // ROWS_PER_REQUEST
        users = requests * 40503 % max(1, rows // ROWS_PER_REQUEST // REQUESTS_PER_USER)
        keyless = requests % 10 == 0
        side = np.where(keyless, requests, users) * 2654435761 % 1000 < 500  # hashed, as a routing key is
        version = np.where(side, 2, 1)
        created = start + rng.random(n) * (end - start)
        # Rows of one request share their time.
        created[1::2] = created[0::2][: len(created[1::2])]
        output = rng.integers(0, 2, n)
        right = rng.random(n) < np.where(version == 2, ACCURACY[2], ACCURACY[1])
        actual = np.where(right, output, 1 - output)
        labelled = rng.random(n) < 0.9
        ids = [f"{i:032x}" for i in range(written, written + n)]
        stamps = np.datetime_as_string((created * 1e6).astype("datetime64[us]"), unit="us")
        log = io.StringIO()
        for i in range(n):
            log.write(f"{ids[i]}\t{MODEL}\t{version[i]}\tdev\t{'canary' if version[i] == 2 else 'champion'}\t"
                      f"{stamps[i]}+00\t1.5\t\\N\t{output[i]}\t\t{requests[i]:x}\t\t\t"
                      f"{'' if keyless[i] else f'{users[i]:016x}'}\n")
        log.seek(0)
        truth = io.StringIO()
        for i in np.flatnonzero(labelled):
            truth.write(f"{ids[i]}\t{actual[i]}\t{stamps[i]}+00\tbench\n")
        truth.seek(0)
        with conn, conn.cursor() as cur:
            cur.copy_expert("COPY monitoring_predictionlog (id, model_name, version, environment, role, created_at, "
                            "latency_ms, inputs, output, subject_hash, request_id, error, shadow_of, unit_hash) "
                            "FROM STDIN", log)
            cur.copy_expert("COPY monitoring_feedback (prediction_id, actual, received_at, submitted_by) FROM STDIN",
                            truth)
        written += n
        print(f"  {written:,} predictions written, {time.perf_counter() - began:.0f} s", flush=True)
    with conn, conn.cursor() as cur:
        cur.execute("ANALYZE monitoring_predictionlog")
        cur.execute("ANALYZE monitoring_feedback")
    conn.close()
    return time.perf_counter() - began


def build_rollups(experiment: Any) -> float:
    began = time.perf_counter()
    conn = psycopg2.connect(DB_URL)
    with conn, conn.cursor() as cur:
        cur.execute(MINUTE_ROLLUPS, {"model": MODEL})
        cur.execute(HOUR_ROLLUPS, {"model": MODEL})
        cur.execute(EXPERIMENT_UNITS, {"model": MODEL, "experiment": experiment.pk,
                                       "started": experiment.started_at})
        cur.execute("ANALYZE monitoring_rollup")
        cur.execute("ANALYZE monitoring_experimentunit")
    conn.close()
    return time.perf_counter() - began


def check_rollups_with_the_portals_code(samples: int = 5) -> None:
    """Prove the SQL-built minutes (and units) equal what the portal's rollup code computes from the same raw
    rows."""
    import datetime as dt

    from monitoring.models import Rollup
    from monitoring.rollups import compute_minutes

    minutes = list(Rollup.objects.filter(model_name=MODEL, granularity="minute").order_by("?")
                   .values_list("start", flat=True)[:samples])
    for minute in minutes:
        ours = compute_minutes(MODEL, "dev", minute, minute + dt.timedelta(minutes=1))
        for (start, version, role), part in ours.items():
            row = Rollup.objects.get(model_name=MODEL, granularity="minute", start=start, version=version, role=role)
            truth = part["data"]["truth"]
            assert (row.count, row.labelled) == (part["count"], part["labelled"]), (minute, row.count, part["count"])
            assert row.data["requests"] == part["data"]["requests"]
            assert row.data["anonymous"] == part["data"]["anonymous"]
            assert row.data["truth"]["n"] == truth["n"] and row.data["truth"]["correct"] == truth["correct"]
            assert row.data["truth"]["outcome"][:2] == [truth["outcome"][0], truth["outcome"][1]]
    print(f"  {len(minutes)} sampled minutes: the SQL-built rollups equal the portal's rollup code")
    # The portal's own unit recording over those minutes finds every unit already there, in the same arm.
    from django.db import transaction

    from monitoring.experiments.models import ExperimentUnit
    from monitoring.experiments.units import units_record

    before = ExperimentUnit.objects.count()
    with transaction.atomic():
        for minute in minutes:
            units_record(MODEL, "dev", minute, minute + dt.timedelta(minutes=1))
    assert ExperimentUnit.objects.count() == before
    print(f"  the portal's unit recording agrees with the {before:,} SQL-built units")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=float, default=7)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    configure()
    fresh_database()
    import django

    django.setup()
    from django.db import connection

    from monitoring.experiments.selectors import counted_from, experiment_analysis

    end = time.time() - 60
    start = end - args.days * 86400
    experiment = make_model(start - 120)
    generate_s = generate(args.rows, start, end)
    rollup_s = build_rollups(experiment)
    check_rollups_with_the_portals_code()

    from django.utils import timezone

    now = timezone.now()
    analysis: dict[str, object] = {}
    fast, slow = [], []
    scanned: list[tuple[object, ...]] = []
    for i in range(args.repeat + 1):
        began = time.perf_counter()
        analysis = experiment_analysis(experiment, now=now)  # type: ignore[arg-type]
        took = time.perf_counter() - began
        began = time.perf_counter()
        with connection.cursor() as cur:
            cur.execute(FULL_SCAN, [MODEL, counted_from(experiment), now])  # type: ignore[arg-type]
            scanned = cur.fetchall()
        scan = time.perf_counter() - began
        if i:  # the first round warms caches
            fast.append(took)
            slow.append(scan)
    arms = analysis["arms"]  # type: ignore[index]
    by_version = {int(r[0]): r for r in scanned}
    for side, version in (("champion", 1), ("challenger", 2)):
        _v, _role, count, requests, labelled, correct, keyed, keyless = by_version[version]
        arm = arms[side]  # type: ignore[index]
        assert (arm["predictions"], arm["requests"], arm["outcomes"]) == (count, requests, labelled), (arm, count)
        srm = analysis["srm"]  # type: ignore[index]
        i = 0 if side == "champion" else 1
        assert (srm["keyed_units"][i], srm["anonymous_requests"][i]) == (keyed, keyless), (srm, keyed, keyless)
        assert abs(arm["mean"] * labelled - correct) < 1e-6 * labelled
    print(f"\nA/B analysis over {args.rows:,} logged predictions ({args.days:g} days; medians of {args.repeat})\n")
    print(f"{'':32}{'seconds':>10}")
    print(f"{'from rollups (the portal)':32}{statistics.median(fast):10.3f}")
    print(f"{'full scan of the log':32}{statistics.median(slow):10.3f}")
    print(f"\nratio scan/rollups: {statistics.median(slow) / statistics.median(fast):.0f}x "
          f"(target: rollups under 1 s); both give the same per-arm counts and sums")
    srm = analysis["srm"]  # type: ignore[index]
    print(f"sample-ratio check on units: {srm['units']} (keyed {srm['keyed_units']}, keyless requests "
          f"{srm['anonymous_requests']}; requests {srm['requests']}), p = {srm['p_value']:.3g}")
    print(f"verdict: {analysis['proposed_verdict']}: {analysis['proposed_sentence']}")
    print(f"generating and COPYing: {generate_s:.0f} s; building rollups: {rollup_s:.0f} s")


if __name__ == "__main__":
    main()
