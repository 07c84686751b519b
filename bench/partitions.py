"""The prediction log at volume: the partitioned table (one partition a day) against the same table unpartitioned.

    .venv/bin/python bench/partitions.py [--rows 50000000] [--days 30] [--flush-rows 1000000] [--resume]

One PostgreSQL database (DATABASE_URL's server, database `portal_bench_partitions`), migrated as the portal is, so
`monitoring_predictionlog` is partitioned by day; the peer is a plain copy of it (`predlog_plain`: same columns,
same indexes, no partitions), as the log was before. Both get the same rows:

1. flush throughput on the empty tables: ``--flush-rows`` predictions through the flusher's own code
   (``monitoring.flush.write_batches``: COPY into a staging table, INSERT … ON CONFLICT DO NOTHING), one move of
   ``MOVE_BATCHES`` records a call, as a busy flusher writes them: records of 100 rows, and of 1 row (real time);
2. ``--rows`` rows spread evenly over ``--days`` days up to now (8 numeric inputs each), generated inside the server
   (``generate_series``) into both tables;
3. flush throughput again, now on top of the full tables;
4. a monitoring query (the rollup's raw-row read, one hour of one model) on each: its time and its plan (which
   tables it touches);
5. retention of the oldest day: DROP of its partition against DELETE of its rows;
6. sizes on disk.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import bench_keys, recreate_database  # noqa: E402 - the benchmarks' one way to start a database afresh
SERVER = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/portal").rsplit("/", 1)[0]
DB = f"{SERVER}/portal_bench_partitions"
INPUTS = 8
TABLES = ("monitoring_predictionlog", "predlog_plain")  # the partitioned log and its unpartitioned peer
COLUMNS = ("id, model_name, version, environment, role, created_at, latency_ms, inputs, output, subject_hash, "
           "request_id, error, shadow_of")


def setup_django() -> None:
    os.environ.update(DATABASE_URL=DB, DJANGO_SETTINGS_MODULE="config.settings", PORTAL_DEBUG="0",
                      PORTAL_SECRET_KEY="bench-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
                      PORTAL_ALLOWED_HOSTS="localhost", CELERY_BROKER_URL="redis://127.0.0.1:6379/3",
                      PORTAL_LOG_LEVEL="WARNING", **bench_keys())
    os.environ.setdefault("PORTAL_VAR_DIR", str(ROOT / "var" / "bench-partitions"))
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def sql(cursor, statement: str, params: list | None = None) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    cursor.execute(statement, params or [])
    return time.perf_counter() - started


def generate(cursor, table: str, first: int, count: int, start: dt.datetime, span: float, total: int,  # type: ignore[no-untyped-def]
             ) -> float:
    inputs = ", ".join("round(random()::numeric, 3)" for _ in range(INPUTS))
    return sql(cursor, f"""
        INSERT INTO {table} ({COLUMNS})
        SELECT md5(g::text || 'bench'), 'bench-lr', 1, 'prod', 'champion',
               %s::timestamptz + make_interval(secs => g * %s / %s), random() * 5, jsonb_build_array({inputs}),
               to_jsonb(mod(g, 2)), '', '', '', ''
        FROM generate_series(%s, %s) g""", [start, span, total, first, first + count - 1])


def flush_rate(table: str, rows: int, at: dt.datetime, tag: str, rows_per_batch: int = 100) -> float:
    """Rows/s through the flusher's write path into ``table`` (the model's table name is pointed at it): MOVE_BATCHES
    records a call (what one move from Redis takes) of ``rows_per_batch`` rows each (1: real-time requests of one
    row; 100: batch-sized requests)."""
    from monitoring.flush import write_batches
    from monitoring.models import PredictionLog

    original = PredictionLog._meta.db_table
    PredictionLog._meta.db_table = table
    try:
        from monitoring.flush import MOVE_BATCHES

        batches_per_call = MOVE_BATCHES
        done, started = 0, time.perf_counter()
        n = 0
        while done < rows:
            batches = []
            for b in range(batches_per_call):
                ids = [f"{tag}{n:08d}{b:04d}{i:04d}" for i in range(rows_per_batch)]
                batches.append({"model": "bench-lr", "environment": "prod", "version": 1, "role": "champion",
                                "ts": (at + dt.timedelta(milliseconds=n * 10 + b)).timestamp(), "latency_ms": 1.0,
                                "request_id": "", "error": "", "ids": ids,
                                "inputs": [[0.5] * INPUTS] * rows_per_batch, "outputs": [1] * rows_per_batch,
                                "subjects": None})
            done += write_batches(batches)
            n += 1
        return done / (time.perf_counter() - started)
    finally:
        PredictionLog._meta.db_table = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--flush-rows", type=int, default=1_000_000)
    parser.add_argument("--resume", action="store_true", help="the rows are loaded: build the indexes, measure")
    args = parser.parse_args()
    if args.resume:
        return resume(args)
    recreate_database(DB)
    setup_django()
    from django.core.management import call_command
    from django.db import connection

    from monitoring import partitions

    call_command("migrate", verbosity=0)
    now = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    start = partitions.unit_start(now - dt.timedelta(days=args.days), "day")
    span = (now - start).total_seconds()
    partitions.partitions_ensure(extra_starts={"monitoring_predictionlog": [start + dt.timedelta(days=d)
                                                                           for d in range(args.days + 1)]})
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE predlog_plain (LIKE monitoring_predictionlog INCLUDING ALL)")
        print(f"{args.rows:,} rows over {args.days} days ({args.rows / args.days:,.0f} a day), {INPUTS} inputs each; "
              f"partitions: {len(partitions.partitions(partitions.SPECS[0]))}", flush=True)

        print("\n1. flush throughput, empty tables (write_batches, MOVE_BATCHES records a call)", flush=True)
        empty = {t: flush_rate(t, args.flush_rows, now - dt.timedelta(minutes=30), "e") for t in TABLES}
        single = flush_rate(TABLES[0], args.flush_rows // 10, now - dt.timedelta(minutes=40), "s", rows_per_batch=1)
        for t in TABLES:
            print(f"   {t:<26} {empty[t]:>10,.0f} rows/s (records of 100 rows)", flush=True)
        print(f"   {TABLES[0]:<26} {single:>10,.0f} rows/s (records of 1 row: real-time requests)", flush=True)

        print(f"\n2. loading {args.rows:,} rows (generate_series, in the server; indexes built after the load, as a "
              "bulk load does)", flush=True)
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s)", [list(TABLES)])
        indexes = cursor.fetchall()
        cursor.execute("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                       "WHERE conrelid::regclass::text = ANY(%s) AND contype = 'p'", [list(TABLES)])
        keys = cursor.fetchall()
        # Kept in the database, so that --resume can build them after an interrupted run.
        cursor.execute("CREATE TABLE bench_saved_ddl (kind text, tbl text, name text, definition text)")
        for table, name, definition in keys:
            cursor.execute("INSERT INTO bench_saved_ddl VALUES ('key', %s, %s, %s)", [table, name, definition])
        key_names = {name for _table, name, _definition in keys}
        plain_indexes = [(name, definition) for name, definition in indexes if name not in key_names]
        for name, definition in plain_indexes:
            cursor.execute("INSERT INTO bench_saved_ddl VALUES ('index', '', %s, %s)", [name, definition])
        for table, name, _definition in keys:
            sql(cursor, f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        for name, _definition in plain_indexes:
            sql(cursor, f'DROP INDEX IF EXISTS "{name}"')
        took = 0.0
        for first in range(1, args.rows + 1, step := 5_000_000):
            took += generate(cursor, TABLES[0], first, min(step, args.rows - first + 1), start, span, args.rows)
            print(f"   {TABLES[0]}: {min(first + step - 1, args.rows):,} rows, {took:.0f} s", flush=True)
        # The generated rows (32-character ids); each table keeps the rows it was flushed in step 1.
        copied = sql(cursor, f"INSERT INTO {TABLES[1]} SELECT * FROM {TABLES[0]} WHERE length(id) = 32")
        print(f"   {TABLES[1]}: the same rows copied in {copied:.0f} s", flush=True)
        build_indexes(cursor)

        measure(cursor, args, now, empty)
    finish()


def build_indexes(cursor) -> None:  # type: ignore[no-untyped-def]
    sql(cursor, "SET maintenance_work_mem = '2GB'")
    cursor.execute("SELECT kind, tbl, name, definition FROM bench_saved_ddl")
    saved = cursor.fetchall()
    for table in TABLES:
        built = 0.0
        for kind, t, name, definition in saved:
            if kind == "key" and t == table:
                cursor.execute("SELECT 1 FROM pg_constraint WHERE conname = %s", [name])
                if not cursor.fetchone():  # (a resumed run may have built it already)
                    built += sql(cursor, f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
            elif kind == "index" and (f" ON public.{table} " in definition or f" ON ONLY public.{table} " in definition):
                built += sql(cursor, definition.replace("ON ONLY", "ON").replace("CREATE INDEX ", "CREATE INDEX IF NOT "
                                                                                              "EXISTS "))
        built += sql(cursor, f"ANALYZE {table}")
        print(f"   {table}: primary key and indexes built in {built:.0f} s", flush=True)


def resume(args: argparse.Namespace) -> None:
    setup_django()
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT max(created_at) FROM monitoring_predictionlog")
        now = cursor.fetchone()[0]
        print(f"resuming on {args.rows:,} loaded rows: building indexes", flush=True)
        build_indexes(cursor)
        measure(cursor, args, now, None)
    finish()


def finish() -> None:
    from django.db import connection

    if not os.environ.get("BENCH_KEEP"):
        connection.close()
        subprocess.run(["psql", f"{SERVER}/postgres", "-qc", "DROP DATABASE portal_bench_partitions"], check=True,
                       capture_output=True)


def measure(cursor, args: argparse.Namespace, now: dt.datetime, empty: dict[str, float] | None) -> None:  # type: ignore[no-untyped-def]
    from monitoring import partitions
    from monitoring.rollups import ROW_SQL

    print("\n3. flush throughput on top of the full tables", flush=True)
    full = {t: flush_rate(t, args.flush_rows, now - dt.timedelta(minutes=20), "f") for t in TABLES}
    for t in TABLES:
        ratio = f" ({full[t] / empty[t]:.2f}x of empty)" if empty else ""
        print(f"   {t:<26} {full[t]:>10,.0f} rows/s{ratio}", flush=True)

    print("\n4. monitoring query: one hour of one model (the rollup's raw-row read), median of 5", flush=True)
    hour = now - dt.timedelta(days=args.days // 2)
    plans = {}
    for t in TABLES:
        query = ROW_SQL.format(log=t, feedback="monitoring_feedback")
        params = ["bench-lr", "prod", hour, hour + dt.timedelta(hours=1)]
        times = []
        for _ in range(5):
            started = time.perf_counter()
            cursor.execute(query, params)
            rows = len(cursor.fetchall())
            times.append(time.perf_counter() - started)
        cursor.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + query, params)
        plans[t] = [line for (line,) in cursor.fetchall()]
        print(f"   {t:<26} {statistics.median(times) * 1000:>8.1f} ms, {rows:,} rows", flush=True)
    for t in TABLES:
        print(f"\n   EXPLAIN on {t}:")
        for line in plans[t]:
            print(f"     {line}")

    print("\n5. retention: the oldest day goes", flush=True)
    oldest = partitions.partitions(partitions.SPECS[0])[0]
    cursor.execute("SELECT count(*) FROM predlog_plain WHERE created_at < %s", [oldest.upper])
    day_rows = cursor.fetchone()[0]
    drop = sql(cursor, f"ALTER TABLE monitoring_predictionlog DETACH PARTITION {oldest.name}")
    drop += sql(cursor, f"DROP TABLE {oldest.name}")
    delete = sql(cursor, "DELETE FROM predlog_plain WHERE created_at < %s", [oldest.upper])
    print(f"   partitioned: DETACH + DROP {oldest.name}: {drop * 1000:.1f} ms", flush=True)
    print(f"   plain: DELETE of the same {day_rows:,} rows: {delete:.1f} s ({delete / drop:,.0f}x; the plain "
          f"table also keeps their dead space until VACUUM)", flush=True)

    print("\n6. sizes", flush=True)
    for t in TABLES:
        cursor.execute("SELECT pg_size_pretty(sum(pg_total_relation_size(relid))) FROM pg_partition_tree(%s)"
                       if t == "monitoring_predictionlog" else
                       "SELECT pg_size_pretty(pg_total_relation_size(%s::regclass))", [t])
        print(f"   {t:<26} {cursor.fetchone()[0]}")


if __name__ == "__main__":
    main()
