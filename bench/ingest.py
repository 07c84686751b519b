"""Prediction-log ingestion: rows a second from the Redis buffer into the prediction log, with one-row records (one
real-time request each), for 1, 2 and 4 flushers on Redis Streams beside the flusher of the earlier design (a Redis
list, a processing list and a lock: one at a time; `bench/flush_list_baseline.py`, the code as it was), in one run.

    BENCH_REDIS_URL=redis://127.0.0.1:6379/7 .venv/bin/python bench/ingest.py [--records 200000] [--runs 3]

One PostgreSQL database (DATABASE_URL's server, database `portal_bench_ingest`, made afresh and migrated) and one
Redis database (`BENCH_REDIS_URL`, default db 3; only the buffer's own keys are deleted). Each run of each set-up:
the log is emptied, ``--records`` records are put in the buffer (not timed: the scoring path's side is measured by
bench/serving.py), then the flushers (forked processes, each calling the flusher's entry point,
``flush_predictions``, until it finds nothing) are released together; the time is from their release until the last
one is done, and every record's row must be in the log exactly once. Runs of the set-ups alternate, so a busy
machine slows them all alike; medians are printed, with each set-up's ratio to the baseline.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import bench_keys, recreate_database  # noqa: E402 - the benchmarks' one way to start a database afresh

SERVER = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/portal").rsplit("/", 1)[0]
DB = f"{SERVER}/portal_bench_ingest"
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/3")
INPUTS = 8
SETUPS = (("list, 1 flusher (before)", "list", 1), ("streams, 1 flusher", "streams", 1),
          ("streams, 2 flushers", "streams", 2), ("streams, 4 flushers", "streams", 4))


def setup_django(streams: int) -> None:
    os.environ.update(DATABASE_URL=DB, DJANGO_SETTINGS_MODULE="config.settings", PORTAL_DEBUG="0",
                      PORTAL_SECRET_KEY="bench-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
                      PORTAL_ALLOWED_HOSTS="localhost", CELERY_BROKER_URL=REDIS, PORTAL_PREDICTION_BUFFER_URL=REDIS,
                      PORTAL_PREDICTION_STREAMS=str(streams), PORTAL_LOG_LEVEL="WARNING", **bench_keys())
    os.environ.setdefault("PORTAL_VAR_DIR", str(ROOT / "var" / "bench-ingest"))
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def records(n: int, tag: str) -> list[bytes]:
    from registry.serving import buffer

    now = time.time()
    return [buffer.encode({"model": "bench-lr", "environment": "prod", "version": 1, "role": "champion",
                           "ts": now + i / 1e4, "latency_ms": 1.2, "request_id": f"req{i}", "error": "",
                           "ids": [f"{tag}{i:024d}"], "inputs": [[0.125 * (i % 7), 1.5, 2, 3.25, 4, 5, 6, 7]],
                           "outputs": [i % 2], "subjects": None})
            for i in range(n)]


def clear_buffer(client: Any) -> None:
    from flush_list_baseline import LOCK_KEY  # the baseline's lock: the portal's flushers no longer read the list
    from monitoring.flush import FAN_OUT_KEY, flushed_key
    from registry.serving import buffer

    keys = buffer.stream_keys()
    client.delete(buffer.REDIS_KEY, buffer.PROCESSING_KEY, LOCK_KEY, FAN_OUT_KEY, *keys,
                  *(flushed_key(k) for k in keys))


def fill(client: Any, kind: str, encoded: list[bytes]) -> None:
    from registry.serving import buffer

    keys, maxlen = buffer.stream_keys(), buffer.stream_maxlen()
    for start in range(0, len(encoded), 5000):
        pipe = client.pipeline(transaction=False)
        for i, raw in enumerate(encoded[start:start + 5000], start):
            if kind == "list":
                pipe.rpush(buffer.REDIS_KEY, raw)
            else:  # what buffer.emit sends, round robin over the keys
                pipe.execute_command("XADD", keys[i % len(keys)], "MAXLEN", "~", maxlen, "*", buffer.STREAM_FIELD,
                                     raw)
        pipe.execute()


def flusher(kind: str, go: Any) -> None:
    from django.db import connections

    connections.close_all()  # a connection of its own, never the parent's socket
    if kind == "list":
        import flush_list_baseline as implementation
    else:
        from monitoring import flush as implementation  # type: ignore[no-redef]
    go.wait()
    while implementation.flush_predictions():
        pass


def run(kind: str, flushers: int, encoded: list[bytes]) -> float:
    from django.db import connection, connections

    from monitoring.models import PredictionLog
    from registry.serving import buffer

    client = buffer.redis_client()
    clear_buffer(client)
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {PredictionLog._meta.db_table}")
        cursor.execute("TRUNCATE monitoring_rollupdirty")
    fill(client, kind, encoded)
    connections.close_all()
    context = mp.get_context("fork")
    go = context.Event()
    processes = [context.Process(target=flusher, args=(kind, go)) for _ in range(flushers)]
    for p in processes:
        p.start()
    time.sleep(1.0)  # every flusher imported and waiting
    started = time.perf_counter()
    go.set()
    for p in processes:
        p.join()
    elapsed = time.perf_counter() - started
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    logged = PredictionLog.objects.count()
    distinct = PredictionLog.objects.values("id").distinct().count()
    assert logged == distinct == len(encoded), (logged, distinct, len(encoded))
    waiting = sum(client.xlen(k) for k in buffer.stream_keys()) + client.llen(buffer.REDIS_KEY)
    assert waiting == 0, waiting
    return len(encoded) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000, help="one-row records per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4, help="PORTAL_PREDICTION_STREAMS")
    args = parser.parse_args()
    recreate_database(DB)
    setup_django(args.streams)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    rates: dict[str, list[float]] = {name: [] for name, _k, _f in SETUPS}
    print(f"{args.records:,} one-row records a run, {args.runs} runs, {args.streams} stream keys, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    for r in range(args.runs):
        for name, kind, flushers in SETUPS:
            encoded = records(args.records, f"r{r}{kind[0]}{flushers}")
            rates[name].append(run(kind, flushers, encoded))
            print(f"  run {r + 1} {name}: {rates[name][-1]:,.0f} rows/s (load {os.getloadavg()[0]:.1f})", flush=True)
    baseline = statistics.median(rates[SETUPS[0][0]])
    print(f"\n{'set-up':28} {'median rows/s':>14} {'min':>9} {'max':>9} {'× before':>9}")
    for name, _kind, _flushers in SETUPS:
        median = statistics.median(rates[name])
        print(f"{name:28} {median:>14,.0f} {min(rates[name]):>9,.0f} {max(rates[name]):>9,.0f} "
              f"{median / baseline:>9.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
