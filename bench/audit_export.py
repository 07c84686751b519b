"""Audit export benchmark: a million chained audit events exported through the portal, against PostgreSQL's own
COPY of the same rows, in one run; and verify_audit over the same chain.

    .venv/bin/python bench/audit_export.py [--events 1000000]

Creates a scratch PostgreSQL database (``portal_bench_audit``), migrates it, writes N events with a valid hash chain
by COPY FROM STDIN, then:
- the portal: one gunicorn sync worker, a compliance officer's token, ``GET /api/v1/audit/export?format=csv``
  streamed to nowhere; wall time, events/s, ZIP size and the worker's peak RSS (VmHWM);
- PostgreSQL: ``COPY (SELECT ... ORDER BY seq) TO STDOUT WITH CSV`` of the same rows, read to nowhere;
- ``manage.py verify_audit`` over the chain.
Prints the table and the ratios the compliance issue asks for (throughput vs COPY, verify time vs export time).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.upload import free_port, peak_rss_mb, wait_up, worker_pids  # noqa: E402

ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = "portal_bench_audit"
DB_URL = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
COLUMNS = ["seq", "timestamp", "actor_username", "action", "action_code", "target_type", "target_id", "target_repr",
           "team_slug", "before", "after", "metadata", "request_id", "ip", "user_agent", "outcome", "prev_hash",
           "hash"]


def env_for(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTAL_", "DJANGO_"))}
    env.update(DATABASE_URL=DB_URL, CELERY_BROKER_URL="redis://127.0.0.1:6379/3", PORTAL_DEBUG="1",
               PORTAL_VAR_DIR=str(work / "var"), PORTAL_LOG_LEVEL="WARNING")
    return env


def fresh_database(env: dict[str, str]) -> None:
    admin = psycopg2.connect(ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {DB_NAME}")
        cur.execute(f"CREATE DATABASE {DB_NAME}")
    admin.close()
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)


def write_events(n: int) -> float:
    """N events with a valid chain, by COPY FROM STDIN; returns seconds."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from portal.audit.record import GENESIS_HASH, chain_hash, event_document

    started = time.perf_counter()
    conn = psycopg2.connect(DB_URL)
    prev = GENESIS_HASH
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    actions = [("auth.login", 1001), ("version.upload", 2011), ("deployment.live", 3002), ("promotion.approve", 4002)]
    batch = io.StringIO()
    with conn, conn.cursor() as cur:
        for seq in range(1, n + 1):
            action, code = actions[seq % len(actions)]
            ts = t0 + timedelta(milliseconds=seq * 31)
            doc = event_document(seq=seq, timestamp=ts, actor_username=f"user{seq % 97}", action=action,
                                 action_code=code, target_type="modelversion", target_id=f"model-{seq % 50}/{seq % 9}",
                                 target_repr=f"model-{seq % 50} v{seq % 9}", team_slug="bench",
                                 before={"status": "scanning"}, after={"status": "ready", "n": seq},
                                 metadata={"note": "bench"}, request_id=uuid.UUID(int=seq).hex, ip="10.0.0.1",
                                 user_agent="bench/1", outcome="success")
            digest = chain_hash(prev, doc)
            values = [str(seq), ts.isoformat(), doc["actor"], action, str(code), doc["target_type"], doc["target_id"],
                      doc["target_repr"], "bench", json.dumps(doc["before"]), json.dumps(doc["after"]),
                      json.dumps(doc["metadata"]), doc["request_id"], "10.0.0.1", "bench/1", "success", prev, digest]
            batch.write("\t".join(values) + "\n")
            prev = digest
            if seq % 50_000 == 0 or seq == n:
                batch.seek(0)
                cur.copy_expert(f"COPY portal_auditevent ({', '.join(COLUMNS)}) FROM STDIN", batch)
                batch = io.StringIO()
        cur.execute("INSERT INTO portal_auditchainhead (id, seq, hash) VALUES (1, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash", [n, prev])
    conn.close()
    return time.perf_counter() - started


def pg_copy_seconds() -> tuple[float, int]:
    class Sink(io.RawIOBase):
        size = 0

        def write(self, data: bytes) -> int:  # type: ignore[override]
            Sink.size += len(data)
            return len(data)

    conn = psycopg2.connect(DB_URL)
    started = time.perf_counter()
    with conn.cursor() as cur:
        cur.copy_expert(f"COPY (SELECT {', '.join(COLUMNS)} FROM portal_auditevent ORDER BY seq) TO STDOUT WITH CSV",
                        Sink())
    seconds = time.perf_counter() - started
    conn.close()
    return seconds, Sink.size


SETUP = '''
from django.contrib.auth.models import Group, User
from portal.roles import sync_roles
from portal import services
sync_roles()
user, _ = User.objects.get_or_create(username="bench-compliance")
user.groups.add(Group.objects.get(name="compliance_officer"))
print("TOKEN", services.token_create(user=user, name="bench", actor=user)[1])
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        work = Path(tmp)
        env = env_for(work)
        os.environ.update({k: v for k, v in env.items() if k in ("DATABASE_URL", "PORTAL_DEBUG", "PORTAL_VAR_DIR")})
        fresh_database(env)
        print(f"writing {args.events:,} chained events ...", flush=True)
        print(f"  written in {write_events(args.events):.1f} s", flush=True)
        out = subprocess.run([sys.executable, "manage.py", "shell", "-c", SETUP], cwd=ROOT, env=env, check=True,
                             capture_output=True, text=True).stdout
        token = next(line.split()[1] for line in out.splitlines() if line.startswith("TOKEN"))

        copy_s, copy_bytes = pg_copy_seconds()

        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "gunicorn", "config.wsgi", "-w", "1", "-b",
                                   f"127.0.0.1:{port}", "--timeout", "600"], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_up(f"http://127.0.0.1:{port}/healthz", server)
            started = time.perf_counter()
            size = 0
            with requests.get(f"http://127.0.0.1:{port}/api/v1/audit/export", params={"format": "csv"},
                              headers={"Authorization": f"Bearer {token}"}, stream=True, timeout=3600) as r:
                r.raise_for_status()
                for chunk in r.iter_content(1 << 20):
                    size += len(chunk)
            export_s = time.perf_counter() - started
            rss = max(peak_rss_mb(pid) for pid in worker_pids(server.pid))
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)

        started = time.perf_counter()
        verdict = subprocess.run([sys.executable, "manage.py", "verify_audit"], cwd=ROOT, env=env,
                                 capture_output=True, text=True)
        verify_s = time.perf_counter() - started

    n = args.events
    print()
    print(f"| what ({n:,} events) | seconds | events/s | size | peak RSS |")
    print("|---|---|---|---|---|")
    print(f"| PostgreSQL COPY TO STDOUT (CSV) | {copy_s:.1f} | {n / copy_s:,.0f} | {copy_bytes / 2**20:.0f} MB | - |")
    print(f"| portal export (CSV in a signed ZIP) | {export_s:.1f} | {n / export_s:,.0f} | {size / 2**20:.0f} MB | "
          f"{rss:.0f} MB |")
    print(f"| manage.py verify_audit (exit {verdict.returncode}) | {verify_s:.1f} | {n / verify_s:,.0f} | - | - |")
    print()
    print(f"export throughput / COPY throughput: {copy_s / export_s:.2f}x (target >= 0.3x)")
    print(f"verify time / export time: {verify_s / export_s:.2f}x (target < 2x); web worker peak RSS {rss:.0f} MB "
          "(target < 150 MB)")


if __name__ == "__main__":
    main()
