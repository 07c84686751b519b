"""Acceptance suite: a model file is a program, and a hostile one gets nowhere.

Each case uploads a model that, when loaded, tries something nasty (payloads: ``tests/registry/hostile.py``), through
the real entry points: the REST upload, a real Celery worker process that scans it, and, if it becomes ready, a
deployment to dev carried out by that worker, a scoring request through ``config.wsgi.application`` and a small batch
job scored by the worker. After every stage the suite checks that:

- no canary file exists outside the sandbox (the exact targets, and a search by name and content under ``var/``,
  ``/tmp``, the working directory and site-packages, which gets a recursive search once per case);
- no secret (the real SECRET_KEY, the database and broker URLs, the database's name, a sentinel only the worker's
  environment holds) appears in any HTTP response, version, deployment, batch job, prediction log or log line, nor
  the ``ESCAPED-<token>`` marker that a bounded fork or memory bomb writes when nothing stopped it;
- no Redis key and no PostgreSQL table was written by the payload;
- the worker, a decoy process started by the test, and the web process are alive, and a benign model deployed
  beside the hostile one keeps answering 200 (a hostile model may fail its own callers with a 5xx, or MLflow's own
  400 BAD_REQUEST for a model that raised, nothing else).

The worker, the users and the benign deployment are shared by the whole module (one set-up, then about 10 s per
case); the database is flushed at the end as ``transactional_db`` would. A case that kills the worker gets a new
one for the cases after it. Every payload is bounded (see ``hostile.py``), so a case that gets out does not take
the machine down with it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from tests.conftest import ROOT, EntryPointClient
from tests.registry import files, hostile

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow, pytest.mark.real_sandbox]

TOKEN = secrets.token_hex(6)  # per run: every canary, key, table and marker carries it
SENTINEL_NAME = "HOSTILE_SUITE_SENTINEL"
SENTINEL_VALUE = f"worker-environ-{secrets.token_hex(12)}"  # only in the environment of the test's worker and decoy
ESCAPED = f"ESCAPED-{TOKEN}"
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])
SCAN_TIMEOUT = 150  # the sandbox's own timeout is 120 s
DEPLOY_TIMEOUT = 150  # about 10 s normally, a minute for the memory bomb on a busy machine; longer is stuck
BATCH_TIMEOUT = 90

# case id: what the payload does (hostile.ACTIONS), or "memmap" for the plain-pickle case.
CASES: dict[str, str] = {
    "write a canary into var/": "write_var",
    "write a canary into /tmp": "write_tmp",
    "drop a .pth into site-packages": "write_pth",
    "write a canary into the working directory": "write_cwd",
    "secrets back through the prediction output": "exfil_output",
    "secrets back through an exception at load": "exfil_exception_load",
    "secrets back through an exception at predict": "exfil_exception_predict",
    "secrets back through stderr": "exfil_stderr",
    "secrets back through the input example and signature": "exfil_signature",
    "write a Redis key": "net_redis",
    "write a PostgreSQL row": "net_postgres",
    "fork bomb": "fork_bomb",
    "memory bomb": "memory_bomb",
    "kill the parent process": "kill_parent",
    "kill every process in sight": "kill_all",
    # Not a code model: a scikit-learn pickle the scanner accepts (numpy.memmap is a NumPy class on its allowlist)
    # that creates a file wherever it is unpickled.
    "plain pickle writing a file through numpy.memmap": "memmap",
}


# --- Evidence ---------------------------------------------------------------------------------------------------

@dataclass
class Evidence:
    case: str
    stages: list[str] = field(default_factory=list)
    route: str = ""
    refusals: list[str] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (where, text) searched for secrets
    problems: list[str] = field(default_factory=list)

    def text(self, where: str, value: Any) -> None:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif not isinstance(value, str):
            value = json.dumps(value, default=str)
        self.texts.append((where, value))


class _LogCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name}: {text} {record.exc_text or ''}")


class Arena:
    """What the cases share: a worker on a private queue, a decoy process, a data scientist's clients, the benign
    deployment, and the secrets to look for."""

    def __init__(self, worker_env: dict[str, str] | None = None) -> None:
        import tempfile

        from django.conf import settings

        self.worker_env = dict(worker_env or {})
        # Not under pytest's basetemp, which a concurrent pytest run may rotate away; skipped by the canary search.
        self.tmp = Path(tempfile.mkdtemp(prefix="hostile-suite-"))
        self.var_dir = Path(settings.VAR_DIR)
        db = settings.DATABASES["default"]
        self.db_name = str(db["NAME"])
        self.worker_db_url = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        self.queue = f"hostile-{os.getpid()}-{secrets.token_hex(3)}"
        self.workers: list[subprocess.Popen[bytes]] = []
        self.worker_logs: list[Path] = []
        self.log_offsets: dict[Path, int] = {}
        self.decoy: subprocess.Popen[bytes] | None = None
        self.logs = _LogCollector()
        self.log_mark = 0
        self.secret_key_file = self.var_dir / "secret_key"
        self.made_secret_key_file = False
        self.started = time.time()
        self.api = APIClient()
        self.approver_api = APIClient()  # trusts code an upload brings, when the portal asks for that
        self.scorer: EntryPointClient | None = None
        self.benign_columns: list[str] = []
        self.benign_rows: list[list[float]] = []
        self.secrets = {
            "the SECRET_KEY": settings.SECRET_KEY,
            "the worker's DATABASE_URL": self.worker_db_url,
            "the web process's DATABASE_URL": os.environ.get("DATABASE_URL", self.worker_db_url),
            "the database name": self.db_name,
            "the broker URL": str(settings.CELERY_BROKER_URL),
            "the worker's environment (sentinel)": SENTINEL_VALUE,
            "the escape marker of a bounded bomb": ESCAPED,
        }
        self.setting = hostile.Setting(
            token=TOKEN, var_dir=str(self.var_dir), site_packages=str(SITE_PACKAGES), sentinel_name=SENTINEL_NAME,
            host_pid_namespace=os.readlink("/proc/self/ns/pid"),
            secret_files=[str(self.secret_key_file), str(ROOT / "var" / "secret_key"), str(ROOT / "secrets" / "secret_key")],
            env_names=["PORTAL_SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL", SENTINEL_NAME],
            pg_databases=["postgres", "portal", self.db_name])

    # processes

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = self.tmp / f"worker-{len(self.workers)}.log"
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PORTAL_CELERY_QUEUE": self.queue,
               "DATABASE_URL": self.worker_db_url, SENTINEL_NAME: SENTINEL_VALUE, **self.worker_env}
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "config", "--quiet", "worker", "--pool", "solo",
                                     "--loglevel", "WARNING", "-Q", self.queue, "--without-heartbeat",
                                     "--without-gossip", "--without-mingle", "-n",
                                     f"w{len(self.workers)}-{self.queue}@%h"],
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(proc)
        self.worker_logs.append(log)
        return proc

    @property
    def worker(self) -> subprocess.Popen[bytes]:
        return self.workers[-1]

    def start_decoy(self) -> None:
        self.decoy = subprocess.Popen(["sleep", "3600"], env={"PATH": "/usr/bin:/bin", SENTINEL_NAME: SENTINEL_VALUE},
                                      start_new_session=True)

    def worker_alive(self) -> bool:
        return self.worker.poll() is None

    def new_worker_log(self) -> str:
        text = []
        for log in self.worker_logs:
            with open(log, "rb") as fh:
                fh.seek(self.log_offsets.get(log, 0))
                data = fh.read()
                self.log_offsets[log] = fh.tell()
            text.append(data.decode("utf-8", "replace"))
        return "".join(text)

    def new_log_lines(self) -> str:
        lines = self.logs.lines[self.log_mark:]
        self.log_mark = len(self.logs.lines)
        return "\n".join(lines)

    def stop(self) -> None:
        for proc in [*self.workers, *([self.decoy] if self.decoy else [])]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)


# --- What a payload may have left outside ---------------------------------------------------------------------

CANARY_NAMES = (f"hostile-canary-{TOKEN}", f"hostile_canary_{TOKEN}")
CANARY_CONTENT = (f"# {TOKEN}: a comment line".encode(), ESCAPED.encode())


def _is_canary(path: Path, *, since: float) -> bool:
    if any(n in path.name for n in CANARY_NAMES):
        return True
    try:
        st = path.lstat()
        if not path.is_file() or path.is_symlink() or st.st_size > 64 * 1024 or st.st_mtime < since:
            return False
        data = path.read_bytes()
    except OSError:
        return False
    return any(c in data for c in CANARY_CONTENT)


def _walk(root: Path, *, since: float, skip: tuple[Path, ...] = ()) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in [*filenames, *dirnames]:
            if _is_canary(here / name, since=since):
                found.append(here / name)
    return found


def find_canaries(arena: Arena, *, deep: bool = False) -> list[Path]:
    """Canaries outside any sandbox: var/ (all of it but the artifact store, whose uploads carry the token),
    /tmp, the working directories, site-packages (its top level; all of it when ``deep``)."""
    since = arena.started - 5
    found = _walk(arena.var_dir, since=since, skip=(arena.var_dir / "artifacts",))
    found += _walk(Path("/tmp"), since=since, skip=(arena.tmp,))
    for top in {ROOT, Path.cwd()}:
        found += [p for p in top.iterdir() if _is_canary(p, since=since)]
    if deep:
        found += _walk(SITE_PACKAGES, since=since)
    else:
        found += [p for p in SITE_PACKAGES.iterdir() if _is_canary(p, since=since)]
    return sorted(set(found))


def remove_canaries(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def redis_keys(delete: bool = True) -> list[str]:
    import redis

    found = []
    for db in range(16):
        client = redis.Redis(host="127.0.0.1", port=6379, db=db, socket_timeout=5)
        keys = list(client.scan_iter(match=f"*{TOKEN}*", count=1000))
        found += [f"db{db}:{k.decode()}" for k in keys]
        if keys and delete:
            client.delete(*keys)
    return found


def postgres_tables(delete: bool = True) -> list[str]:
    import psycopg2

    def connect(name: str) -> Any:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=name, connect_timeout=5)
        conn.autocommit = True
        return conn

    found = []
    conn = connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate")
            names = [r[0] for r in cur.fetchall()]
    finally:
        conn.close()
    for name in names:
        try:
            conn = connect(name)
        except psycopg2.OperationalError:
            continue
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT relname FROM pg_class WHERE relname LIKE %s", (f"%{TOKEN}%",))
                for (table,) in cur.fetchall():
                    found.append(f"{name}.{table}")
                    if delete:
                        cur.execute(f'DROP TABLE IF EXISTS "{table}"')
        finally:
            conn.close()
    return found


# --- The stages ------------------------------------------------------------------------------------------------

def _wait(arena: Arena, predicate: Callable[[], Any], timeout: float) -> tuple[Any, str]:
    """(value, "") once ``predicate`` holds; (None, why) when the worker dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value, ""
        if not arena.worker_alive():
            time.sleep(0.5)
            value = predicate()
            return (value, "") if value else (None, f"the worker died (exit {arena.worker.poll()})")
        time.sleep(0.2)
    return None, f"timed out after {timeout} s"


def _columns(version: Any) -> list[str]:
    names = [c["name"] for c in (version.signature or {}).get("inputs", []) if isinstance(c, dict) and c.get("name")]
    return names or hostile.COLUMNS


def _rows(columns: list[str]) -> list[list[float]]:
    """A row carrying the trigger (the exfiltrating payloads answer it with their loot), then ordinary ones."""
    width = len(columns)
    return [[hostile.TRIGGER] + [1.0] * (width - 1), [1.0] * width, [2.0] + [1.0] * (width - 1)]


def score(arena: Arena, name: str, columns: list[str], rows: list[list[float]]) -> Any:
    assert arena.scorer is not None
    return arena.scorer.post(f"/api/v1/serve/{name}/dev/invocations",
                             data=json.dumps({"dataframe_split": {"columns": columns, "data": rows}}),
                             content_type="application/json")


def check_outside(arena: Arena, ev: Evidence, stage: str, *, deep: bool = False) -> None:
    """After each stage: canaries, Redis keys, PostgreSQL tables, the worker, the decoy, the benign neighbour."""
    canaries = find_canaries(arena, deep=deep)
    if canaries:
        ev.problems.append(f"[{stage}] canary files outside the sandbox: {[str(p) for p in canaries][:8]}")
        remove_canaries(canaries)
    keys = redis_keys()
    if keys:
        ev.problems.append(f"[{stage}] the payload wrote Redis keys: {keys[:8]}")
    tables = postgres_tables()
    if tables:
        ev.problems.append(f"[{stage}] the payload created PostgreSQL tables: {tables[:8]}")
    if not arena.worker_alive():
        ev.problems.append(f"[{stage}] the worker process is dead (exit {arena.worker.poll()})")
    if arena.decoy is None or arena.decoy.poll() is not None:
        ev.problems.append(f"[{stage}] the decoy process the test started was killed")
    if arena.worker_alive():
        benign = score(arena, "benign", arena.benign_columns, arena.benign_rows)
        if benign.status_code != 200:
            ev.problems.append(f"[{stage}] the benign model beside it answered {benign.status_code}, not 200: "
                               f"{benign.content[:300]!r}")


def _scanner_miss(action: str) -> Any:
    """What the static inspection would answer had it missed the payload: a python_function model with its example
    (and signature). Used only once the real scanner has refused every route, so the sandbox still gets tested:
    the scanner is a filter, and the sandbox must hold for whatever gets past it."""
    from registry.scanning.findings import Finding
    from registry.scanning.inspect import Inspection

    signature = {} if action == "exfil_signature" else {
        "inputs": [{"type": "double", "name": c, "required": True} for c in hostile.COLUMNS],
        "outputs": [{"type": "double", "required": True}]}
    inspection = Inspection(format="mlflow", flavors=["python_function"], signature=signature,
                            input_example=hostile.EXAMPLE, mlflow_meta={"root": "."},
                            findings=[Finding("info", "test_scanner_miss", "The hostile-upload suite put this version "
                                                                           "past the static scanner.")])
    return lambda path, filename: inspection


def upload(arena: Arena, ev: Evidence, name: str, action: str, tmp: Path) -> Any:
    """Upload the payload, trying the routes in order; if the scanner refuses every one (each with a message a
    person can act on), once more with the static inspection answering as if it had missed it. The version, or
    None when the plain pickle was refused."""
    from unittest import mock

    from registry.models import ModelVersion

    response = arena.api.post("/api/v1/models/", {"name": name, "team": "acme"}, format="json")
    assert response.status_code == 201, response.content
    attempts: list[tuple[str, str, bytes, dict[str, Any]]] = []
    if action == "memmap":
        path = str(arena.var_dir / f"hostile-canary-{TOKEN}-memmap")
        ref = files.reference_csv(tmp / "ref.csv").read_bytes()
        attempts.append(("memmap pickle", "model.pkl", hostile.memmap_pickle(files.logistic_regression(), path),
                         {"reference_data": SimpleUploadedFile("ref.csv", ref)}))
    else:
        cfg = hostile.config(arena.setting, action)
        attempts += [(route, "model.zip", hostile.model_zip(cfg, route), {}) for route in hostile.ROUTES]
    for route, filename, data, extra in attempts:
        response = arena.api.post(f"/api/v1/models/{name}/versions/",
                                  {"file": SimpleUploadedFile(filename, data), **extra}, format="multipart")
        ev.text(f"upload response ({route})", response.content)
        if response.status_code == 201:
            ev.route = route
            break
        assert response.status_code == 422, (route, response.status_code, response.content[:500])
        message = response.json()["error"]["message"]
        assert message, response.content
        ev.refusals.append(f"{route}: {message[:160]}")
    else:
        if action == "memmap":
            return None  # a plain pickle the scanner refuses never loads anywhere: nothing more to check
        with mock.patch("registry.versions.services.inspect_upload", _scanner_miss(action)):
            response = arena.api.post(f"/api/v1/models/{name}/versions/", {
                "file": SimpleUploadedFile("model.zip", hostile.model_zip(cfg, "cloudpickle"))}, format="multipart")
        ev.text("upload response (scanner miss)", response.content)
        assert response.status_code == 201, response.content
        ev.route = "cloudpickle, past the scanner"
    ev.stages.append(f"uploaded ({ev.route})")
    number = response.json()["number"]
    if ModelVersion.objects.get(model__name=name, number=number).trust_state == "pending":
        # The portal holds code for an approver's decision. The suite's approver trusts it: the sandbox must
        # contain a model whatever a person decided about it.
        trust = arena.approver_api.post(f"/api/v1/models/{name}/versions/{number}/trust",
                                        {"trust": True, "reason": "hostile-upload suite"}, format="json")
        ev.text("trust response", trust.content)
        assert trust.status_code == 200, trust.content
        ev.stages.append("code trusted by an approver")
    version, why = _wait(arena, lambda: (v := ModelVersion.objects.get(model__name=name, number=number)).status
                         != "scanning" and v, SCAN_TIMEOUT)
    version = version or ModelVersion.objects.get(model__name=name, number=number)
    if why:
        ev.problems.append(f"[scan] the scan did not finish: {why}")
    ev.stages.append(f"scanned: {version.status}")
    for f in ("status_detail", "scan_findings", "sandbox_report", "signature", "input_example"):
        ev.text(f"ModelVersion.{f}", getattr(version, f))
    ev.text("GET version", arena.api.get(f"/api/v1/models/{name}/versions/{number}/").content)
    return version


def deploy(arena: Arena, ev: Evidence, name: str, version: Any) -> bool:
    from registry.models import Deployment

    response = arena.api.post(f"/api/v1/models/{name}/versions/{version.number}/deploy", {"environment": "dev"},
                              format="json")
    ev.text("deploy response", response.content)
    if response.status_code != 202:
        ev.problems.append(f"[deploy] the deployment was not accepted: {response.status_code}")
        return False
    uid = response.json()["id"]
    deployment, why = _wait(arena, lambda: (d := Deployment.objects.get(uid=uid)).status in ("live", "failed") and d,
                            DEPLOY_TIMEOUT)
    deployment = deployment or Deployment.objects.get(uid=uid)
    if why:
        ev.problems.append(f"[deploy] the deployment did not finish: {why}")
    ev.stages.append(f"deployed: {deployment.status}")
    for f in ("error", "log", "status"):
        ev.text(f"Deployment.{f}", getattr(deployment, f))
    ev.text("GET deployment", arena.api.get(f"/api/v1/deployments/{uid}/").content)
    return bool(deployment.status == "live")


def score_hostile(arena: Arena, ev: Evidence, name: str, columns: list[str]) -> None:
    from monitoring.models import PredictionLog
    from registry.serving import buffer

    response = score(arena, name, columns, _rows(columns))
    ev.stages.append(f"scored: {response.status_code}")
    ev.text("scoring response", response.content)
    mlflow_model_error = (response.status_code == 400 and response.get("Content-Type", "").startswith(
        "application/json") and response.json().get("error_code") == "BAD_REQUEST")
    if not (response.status_code == 200 or response.status_code >= 500 or mlflow_model_error):
        # MLflow's scoring code answers a model that raises with 400 BAD_REQUEST (and the portal keeps that answer
        # for MLflow models); anything else a hostile model gets is a 5xx.
        ev.problems.append(f"[score] the hostile model answered {response.status_code}: a model's failure is a 5xx "
                           "(or MLflow's own 400 BAD_REQUEST)")
    client = buffer.redis_client()
    if client is not None:
        # Only this model's records: the buffer is shared with whatever else uses this Redis database.
        records = [fields[buffer.STREAM_FIELD] for key in buffer.stream_keys()
                   for _id, fields in client.xrange(key) if name.encode() in fields[buffer.STREAM_FIELD]]
        ev.text("prediction buffer (Redis)", b"\n".join(records))
    ev.text("prediction log", list(PredictionLog.objects.filter(model_name=name).values()))


def batch(arena: Arena, ev: Evidence, name: str, columns: list[str]) -> None:
    from registry.models import BatchJob

    lines = [",".join(columns)] + [",".join(str(v) for v in row) for row in _rows(columns)]
    upload = io.BytesIO(("\n".join(lines) + "\n").encode())
    upload.name = "rows.csv"
    response = arena.api.post("/api/v1/batch-jobs/", {"model": name, "env": "dev", "file": upload,
                                                      "max_error_share": "1"}, format="multipart")
    ev.text("batch submit response", response.content)
    if response.status_code != 202:
        ev.problems.append(f"[batch] the job was not accepted: {response.status_code} {response.content[:300]!r}")
        return
    uid = response.json()["id"]
    job, why = _wait(arena, lambda: (j := BatchJob.objects.get(uid=uid)).status in ("done", "failed", "cancelled")
                     and j, BATCH_TIMEOUT)
    job = job or BatchJob.objects.get(uid=uid)
    if why:
        ev.problems.append(f"[batch] the job did not finish: {why}")
    ev.stages.append(f"batch: {job.status}")
    ev.text("BatchJob.error", job.error)
    ev.text("GET batch job", arena.api.get(f"/api/v1/batch-jobs/{uid}/").content)
    for which in ("result", "errors"):
        got = arena.api.get(f"/api/v1/batch-jobs/{uid}/{which}")
        if got.status_code == 200:
            ev.text(f"batch {which} file", b"".join(cast(Any, got).streaming_content))


def run_case(arena: Arena, case: str, tmp: Path) -> Evidence:
    action = CASES[case]
    ev = Evidence(case)
    name = "hostile-" + "".join(ch if ch.isalnum() else "-" for ch in action.lower()).strip("-")
    version = upload(arena, ev, name, action, tmp)
    check_outside(arena, ev, "scan")
    if version is None:
        return ev
    if version.status == "ready":
        live = deploy(arena, ev, name, version)
        check_outside(arena, ev, "deploy")
        if live:
            version.refresh_from_db()
            columns = _columns(version)
            score_hostile(arena, ev, name, columns)
            check_outside(arena, ev, "score")
            batch(arena, ev, name, columns)
            check_outside(arena, ev, "batch")
    return ev


# --- Fixtures --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def arena(django_db_setup: None, django_db_blocker: Any) -> Iterator[Arena]:
    with open_arena(django_db_blocker) as opened:
        yield opened


@contextlib.contextmanager
def open_arena(django_db_blocker: Any, *, worker_env: dict[str, str] | None = None) -> Iterator[Arena]:
    """The module's shared set-up (also used by test_model_host_service.py, whose workers reach models through the
    model-host service: ``worker_env``)."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import setup_databases, teardown_databases

    from config.celery import app
    from portal import services as portal_services
    from portal.models import Membership, Team
    from portal.roles import DATA_SCIENTIST, sync_roles
    from registry.models import Deployment, ModelVersion

    with django_db_blocker.unblock():
        own_db = None
        if not str(connection.settings_dict["NAME"]).startswith("test_"):
            # pytest-django sets up the database only for tests using its db fixtures; with this module alone, none do.
            own_db = setup_databases(verbosity=0, interactive=False, aliases=cast(Any, {"default"}))
        arena = Arena(worker_env)
        # Importing the WSGI entry point runs django.setup(), whose logging dictConfig drops the root logger's
        # handlers: import it first, or the collector would stop seeing the web process's log records.
        import config.wsgi  # noqa: F401

        logging.getLogger().addHandler(arena.logs)
        previous_queue = app.conf.task_default_queue
        try:
            if not arena.secret_key_file.exists():  # where a debug run keeps its key: a file worth stealing
                from django.conf import settings

                arena.secret_key_file.write_text(settings.SECRET_KEY)
                arena.made_secret_key_file = True
            app.conf.task_default_queue = arena.queue
            arena.start_worker()
            arena.start_decoy()
            sync_roles()
            user = get_user_model().objects.create_user(username="mallory", password="hostile-suite-pass-1234")
            user.groups.add(Group.objects.get(name=DATA_SCIENTIST))
            team, _ = Team.objects.get_or_create(slug="acme", defaults={"name": "Acme"})
            Membership.objects.get_or_create(team=team, user=user)
            _t, token = portal_services.token_create(user=user, name="hostile-suite", actor=user)
            arena.api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
            arena.scorer = EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {token}")
            from portal.roles import APPROVER

            approver = get_user_model().objects.create_user(username="trusting-tom", password="hostile-suite-pass-5678")
            approver.groups.add(Group.objects.get(name=APPROVER))
            Membership.objects.get_or_create(team=team, user=approver)
            _t, approver_token = portal_services.token_create(user=approver, name="hostile-suite", actor=approver)
            arena.approver_api.credentials(HTTP_AUTHORIZATION=f"Bearer {approver_token}")

            # The benign neighbour: a scikit-learn model deployed to dev through the same entry points.
            tmp = arena.tmp
            assert arena.api.post("/api/v1/models/", {"name": "benign", "team": "acme"}, format="json").status_code == 201
            response = arena.api.post("/api/v1/models/benign/versions/", {
                "file": SimpleUploadedFile("m.joblib", files.joblib_file(tmp / "m.joblib").read_bytes()),
                "reference_data": SimpleUploadedFile("ref.csv", files.reference_csv(tmp / "r.csv").read_bytes()),
            }, format="multipart")
            assert response.status_code == 201, response.content
            version, why = _wait(arena, lambda: (v := ModelVersion.objects.get(model__name="benign")).status
                                 != "scanning" and v, SCAN_TIMEOUT)
            assert version and version.status == "ready", (why, version and version.status_detail)
            response = arena.api.post("/api/v1/models/benign/versions/1/deploy", {"environment": "dev"}, format="json")
            assert response.status_code == 202, response.content
            uid = response.json()["id"]
            deployment, why = _wait(arena, lambda: (d := Deployment.objects.get(uid=uid)).status in ("live", "failed")
                                    and d, DEPLOY_TIMEOUT)
            assert deployment and deployment.status == "live", (why, deployment and deployment.error)
            arena.benign_columns = _columns(version)
            arena.benign_rows = [[1.0] * len(arena.benign_columns)]
            first = score(arena, "benign", arena.benign_columns, arena.benign_rows)
            assert first.status_code == 200, first.content
            remove_canaries(find_canaries(arena, deep=True))  # nothing of ours yet; stale ones of a crashed run
            yield arena
        finally:
            app.conf.task_default_queue = previous_queue
            logging.getLogger().removeHandler(arena.logs)
            arena.stop()
            remove_canaries(find_canaries(arena, deep=True))
            redis_keys()
            postgres_tables()
            if arena.made_secret_key_file:
                arena.secret_key_file.unlink(missing_ok=True)
            shutil.rmtree(arena.tmp, ignore_errors=True)
            from django.db import connections

            if own_db is not None:
                for conn in connections.all():
                    conn.close()
                teardown_databases(own_db, verbosity=0)
            else:
                call_command("flush", verbosity=0, interactive=False, database="default", reset_sequences=False,
                             allow_cascade=False, inhibit_post_migrate=False)


@pytest.fixture
def ready_arena(arena: Arena, django_db_blocker: Any) -> Iterator[Arena]:
    """The shared arena, with a live worker and decoy (a case before may have had them killed)."""
    if arena.logs not in logging.getLogger().handlers:  # something reconfigured logging since
        logging.getLogger().addHandler(arena.logs)
    with django_db_blocker.unblock():
        if not arena.worker_alive():
            arena.start_worker()
        if arena.decoy is None or arena.decoy.poll() is not None:
            arena.start_decoy()
        arena.new_worker_log()
        arena.new_log_lines()
        yield arena


# --- The cases -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_hostile_upload_gets_nowhere(case: str, ready_arena: Arena, capfd: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    judge_case(ready_arena, case, capfd, tmp_path)


def judge_case(arena: Arena, case: str, capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Run one case and fail, saying everything that got out, if anything did."""
    ev = run_case(arena, case, tmp_path)
    if CASES[case] == "write_pth":  # the one target deep inside a tree: search all of site-packages once
        deep = find_canaries(arena, deep=True)
        if deep:
            ev.problems.append(f"[end] canary files outside the sandbox: {[str(p) for p in deep][:8]}")
            remove_canaries(deep)
    out, err = capfd.readouterr()
    ev.text("web process stdout/stderr", out + err)
    ev.text("worker log", arena.new_worker_log())
    ev.text("web process log records", arena.new_log_lines())
    for label, value in arena.secrets.items():
        places = [where for where, text in ev.texts if value and value in text]
        if places:
            ev.problems.append(f"{label} is out, in: {sorted(set(places))}")
    summary = f"route {ev.route or '-'}; stages {ev.stages}; refused {ev.refusals}"
    print(f"{case}: {summary}")  # shown with -rP: how far each payload got
    assert not ev.problems, f"{case}: {summary}\n  " + "\n  ".join(ev.problems)


def test_a_model_carrying_code_reaches_sandboxed_loading(ready_arena: Arena) -> None:
    """A custom pyfunc is a legitimate format: one that does nothing hostile, uploaded the ordinary way (cloudpickle,
    or a loader module), is accepted and loaded in the sandbox. Without this the cases above test the scanner, not
    the sandbox."""
    from registry.models import ModelVersion

    arena = ready_arena
    cfg = hostile.config(arena.setting, "none")
    outcomes = []
    for route in ("cloudpickle", "loader_module"):
        name = f"custom-pyfunc-{route.replace('_', '-')}"
        assert arena.api.post("/api/v1/models/", {"name": name, "team": "acme"}, format="json").status_code == 201
        response = arena.api.post(f"/api/v1/models/{name}/versions/",
                                  {"file": SimpleUploadedFile("model.zip", hostile.model_zip(cfg, route))},
                                  format="multipart")
        if response.status_code != 201:
            outcomes.append(f"{route}: refused at upload ({response.status_code}): "
                            f"{response.json()['error']['message'][:300]}")
            continue
        if ModelVersion.objects.get(model__name=name).trust_state == "pending":
            arena.approver_api.post(f"/api/v1/models/{name}/versions/1/trust",
                                    {"trust": True, "reason": "a benign custom model"}, format="json")

        def scanned(name: str = name) -> Any:
            version = ModelVersion.objects.get(model__name=name)
            return version.status != "scanning" and version

        version, why = _wait(arena, scanned, SCAN_TIMEOUT)
        if version is not None and version.status == "ready":
            return
        outcomes.append(f"{route}: {why or (version.status_detail if version else '')}")
    pytest.fail("no custom pyfunc reached sandboxed loading; models carrying code are a legitimate format:\n  "
                + "\n  ".join(outcomes))


# --- Issue 31: the sandbox's init taken over, processes outliving their host, a host spinning after it answered ---

def _processes(*, comm: str = "", namespace: str = "") -> list[int]:
    """Processes of this machine (host-side ``ps``) with that name or in that pid namespace."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if comm and Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                found.append(int(entry))
            elif namespace and os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                found.append(int(entry))
        except OSError:
            continue
    return found


def _status(pid: int) -> str:
    try:
        return " ".join(line.strip() for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith(("Name", "State", "PPid", "NSpid")))
    except OSError:
        return f"{pid}: gone"


def test_a_model_that_attacks_the_sandbox_init_leaves_nothing_behind(ready_arena: Arena, settings: Any,
                                                                     capfd: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    """Issue 31's attack, uploaded, trusted, deployed and scored through the real entry points: the model opens
    /proc/1/mem for writing and tries pidfd_getfd on pid 1, clears its parent-death signal, forks into a new
    session, maps past the memory limit, and spins after answering. It finds itself alone as pid 1 (nothing to take
    over), every call that would reach another process refused, the mapping refused; the host that spins is stopped
    by the CPU watchdog, and once stopped nothing of it is left on the machine."""
    import errno
    import mmap

    from registry.sandbox import hosts

    arena = ready_arena
    settings.PORTAL_MODEL_HOST_IDLE_CPU_SECONDS = 1.0
    settings.PORTAL_MODEL_HOST_NICE = 19
    control = mmap.mmap(-1, hostile.MAP_BYTES)  # outside a sandbox this machine maps it: the refusal is the limit's
    control.close()
    survivor = ("h" + TOKEN)[:15]
    ev = Evidence("pid-1 takeover")
    name = "hostile-pid1-takeover"
    version = upload(arena, ev, name, "pid1_takeover", tmp_path)
    check_outside(arena, ev, "scan")
    assert version is not None and version.status == "ready", (ev.stages, ev.refusals, ev.problems,
                                                               version and version.status_detail)
    assert deploy(arena, ev, name, version), ev.problems
    check_outside(arena, ev, "deploy")
    version.refresh_from_db()
    columns = _columns(version)
    response = score(arena, name, columns, _rows(columns))
    ev.text("scoring response", response.content)
    assert response.status_code == 200, response.content[:500]
    from registry.models import Deployment

    deployment = Deployment.objects.filter(version=version).latest("pk")
    host = hosts.pool._hosts[f"deployment-{deployment.pk}"]
    namespace = getattr(host._proc, "pid_namespace", "")
    facts = json.loads(response.json()["predictions"][0])
    assert facts["pid"] == 1 and facts["processes"] == [1], facts  # the model is the init, alone: no other to take
    assert facts["pidfd_getfd"] == errno.EPERM and facts["pdeathsig"] == errno.EPERM, facts
    assert facts["fork"] == errno.EPERM and facts["mapped"] == 0, facts
    assert namespace, "the host's pid namespace is known from outside"
    # It runs below the portal's priority and cannot climb back: not by renicing, not by starting a session (an
    # autogroup) of its own. Seen from outside too, while it spins: its nice value and its autogroup's.
    assert facts["nice"] == 19, facts
    assert facts["renice"] == errno.EACCES, facts
    assert facts["setsid"] == errno.EPERM, facts
    init = host._proc.init_pid
    assert int(Path(f"/proc/{init}/stat").read_bytes().rsplit(b")", 1)[1].split()[16]) == 19
    if Path(f"/proc/{init}/autogroup").exists():
        assert Path(f"/proc/{init}/autogroup").read_text().split()[-1] == "19"

    deadline = time.monotonic() + 60  # a second of CPU past its answer, then the watchdog's next look
    while host.running and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not host.running, "the host kept spinning after its answer"
    with host._lock:  # the watchdog holds it while it stops the host
        pass
    assert "kept using CPU" in host.last_error, host.last_error
    hosts.pool.release(host.key)
    left = _processes(namespace=namespace)
    assert left == [], ("processes of the stopped host survive", [_status(pid) for pid in left])
    # The worker's own hosts (deploy, warm-up) ran the same payload: its watchdog stops them too.
    deadline = time.monotonic() + 60
    while _processes(comm=survivor) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes(comm=survivor) == [], "a process of the payload is still running"

    check_outside(arena, ev, "score")
    out, err = capfd.readouterr()
    ev.text("web process stdout/stderr", out + err)
    ev.text("worker log", arena.new_worker_log())
    ev.text("web process log records", arena.new_log_lines())
    for label, value in arena.secrets.items():
        places = [where for where, text in ev.texts if value and value in text]
        if places:
            ev.problems.append(f"{label} is out, in: {sorted(set(places))}")
    assert not ev.problems, "\n  ".join(ev.problems)


# --- The in-process ONNX path and availability (issue 31, items 2-4) ---------------------------------------------
# Kept apart from the cases above: an ONNX file carries no code, so these attack what onnxruntime does with data
# (read a tensor from another file; loop or allocate as an input value says) and the web process's capacity (a
# model host that never answers). Same arena: the real upload, worker, deployment and scoring entry point.

def _register(arena: Arena, name: str) -> None:
    response = arena.api.post("/api/v1/models/", {"name": name, "team": "acme"}, format="json")
    assert response.status_code == 201, response.content


def _upload_ready(arena: Arena, name: str, filename: str, data: bytes) -> Any:
    """Upload, trust when the portal asks an approver to, and wait for the scan; the version."""
    from registry.models import ModelVersion

    _register(arena, name)
    response = arena.api.post(f"/api/v1/models/{name}/versions/", {"file": SimpleUploadedFile(filename, data)},
                              format="multipart")
    assert response.status_code == 201, response.content
    number = response.json()["number"]
    if ModelVersion.objects.get(model__name=name, number=number).trust_state == "pending":
        trust = arena.approver_api.post(f"/api/v1/models/{name}/versions/{number}/trust",
                                        {"trust": True, "reason": "hostile-upload suite"}, format="json")
        assert trust.status_code == 200, trust.content
    version, why = _wait(arena, lambda: (v := ModelVersion.objects.get(model__name=name, number=number)).status
                         != "scanning" and v, SCAN_TIMEOUT)
    assert version and version.status == "ready", (why, version and version.status_detail)
    return version


def _deployed(arena: Arena, name: str, version: Any) -> Any:
    from registry.models import Deployment

    response = arena.api.post(f"/api/v1/models/{name}/versions/{version.number}/deploy", {"environment": "dev"},
                              format="json")
    assert response.status_code == 202, response.content
    uid = response.json()["id"]
    deployment, why = _wait(arena, lambda: (d := Deployment.objects.get(uid=uid)).status in ("live", "failed")
                            and d, DEPLOY_TIMEOUT)
    assert deployment, why
    return deployment


def _warm_benign(arena: Arena) -> None:
    """Each test starts with this process's serving cache emptied (tests/registry/conftest.py): the benign
    neighbour's serving form is loaded again on its first request, a cold start (a model host's start-up, seconds on
    a loaded machine) that is not serving during an attack. Loaded here, before the attack, as a server would have it."""
    assert score(arena, "benign", arena.benign_columns, arena.benign_rows).status_code == 200


def _benign_answers(arena: Arena, *, within: float) -> list[float]:
    """Score the benign neighbour a few times; each must be a 200 within ``within`` seconds. The durations."""
    durations = []
    for _ in range(3):
        started = time.monotonic()
        response = score(arena, "benign", arena.benign_columns, arena.benign_rows)
        durations.append(time.monotonic() - started)
        assert response.status_code == 200, response.content
    assert max(durations) < within, durations
    return durations


def test_onnx_forged_serving_form_reading_a_sibling_blob_is_refused(ready_arena: Arena) -> None:
    """A trusted pyfunc's prepare-serving answer writes an ONNX graph whose ``sparse_initializer`` reads, as external
    data, the benign model's artifact: the forged file is made to hash into the victim's blob folder, so onnxruntime,
    handed its path, would read the victim as a tensor. The deployment is refused naming why, nothing is kept, and
    no credentialed process opens a session on it."""
    import hashlib

    from registry import storage
    from registry.models import Blob, ModelVersion

    arena = ready_arena
    _warm_benign(arena)
    victim = ModelVersion.objects.get(model__name="benign", number=1).artifact
    assert victim is not None
    forged = hostile.onnx_reading_sibling(victim.sha256, min(victim.size // 4, 64), blob_prefix=victim.sha256[:4])
    forged_sha = hashlib.sha256(forged).hexdigest()
    assert storage.storage_name(forged_sha).rsplit("/", 1)[0] == victim.storage_name.rsplit("/", 1)[0]

    version = _upload_ready(arena, "onnx-forged-serving-form", "model.zip", hostile.forging_pyfunc_zip(forged))
    deployment = _deployed(arena, "onnx-forged-serving-form", version)
    assert deployment.status == "failed", deployment.log
    assert "graph.sparse_initializer[0].values" in deployment.error, deployment.error
    assert "keeps its data in another file" in deployment.error, deployment.error
    assert not any("Serving form ready" in entry["message"] for entry in deployment.log), deployment.log
    assert not Blob.objects.filter(sha256=forged_sha).exists()  # the forged form was never kept
    assert not storage.artifact_storage().exists(storage.storage_name(forged_sha))
    response = score(arena, "onnx-forged-serving-form", hostile.COLUMNS, [[0.0, 0.0]])
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_deployed", response.content
    with storage.verified_local_path(victim) as path:
        head = path.read_bytes()[:16]
    for text in (deployment.error, json.dumps(deployment.log), response.content.decode()):
        assert head.hex() not in text and repr(head)[2:-1] not in text
    _benign_answers(arena, within=5)


def test_onnx_upload_with_external_data_in_a_subgraph_or_function_is_refused(ready_arena: Arena) -> None:
    """A bare ONNX upload whose external data hides in an ``If`` branch or a model-local function's body (onnx's
    graph-initializer check does not look there): refused at upload, naming the tensor and where it stands."""
    from registry.models import ModelVersion

    arena = ready_arena
    victim = ModelVersion.objects.get(model__name="benign", number=1).artifact
    assert victim is not None
    cases = {"onnx-external-in-if": (hostile.onnx_external_in_subgraph(victim.sha256), ".g.node[0]"),
             "onnx-external-in-function": (hostile.onnx_external_in_function(victim.sha256), "functions[0]")}
    for name, (data, where) in cases.items():
        _register(arena, name)
        response = arena.api.post(f"/api/v1/models/{name}/versions/",
                                  {"file": SimpleUploadedFile("model.onnx", data)}, format="multipart")
        assert response.status_code == 422, (name, response.status_code, response.content[:500])
        error = response.json()["error"]
        assert "keeps its data in another file" in error["message"] and where in error["message"], error
        assert "onnx_external_data" in json.dumps(error), error
        assert not ModelVersion.objects.filter(model__name=name).exists()


@pytest.mark.parametrize("build, operator", [(hostile.onnx_loop, "Loop"),
                                             (hostile.onnx_constant_of_shape, "ConstantOfShape")],
                         ids=["Loop sized by an input value", "ConstantOfShape sized by an input value"])
def test_onnx_graphs_sized_by_input_values_are_served_by_the_sandbox_and_end_by_the_deadline(
        ready_arena: Arena, settings: Any, build: Callable[[], bytes], operator: str) -> None:
    """No approval is needed for an ONNX upload, and its example is zeros: the scan and the warm-up pass. The
    deployment sends it to a sandboxed model host, saying why in its log; a request that asks for a billion
    iterations (or 4 GB) ends by the scoring deadline, the web process does not grow, and the neighbour answers."""
    import resource

    arena = ready_arena
    _warm_benign(arena)
    name = f"onnx-{operator.lower()}"
    version = _upload_ready(arena, name, "model.onnx", build())
    deployment = _deployed(arena, name, version)
    assert deployment.status == "live", deployment.error
    assert deployment.serving_kind == "native", deployment.serving_kind
    log = " ".join(entry["message"] for entry in deployment.log)
    assert "Serving from a sandboxed model host" in log and operator in log, log
    # An ordinary request first, under the default deadline: it starts the host (its first answer imports pandas).
    assert score(arena, name, hostile.ONNX_COLUMNS, [[0.0, 0.0], [1.0, 2.0]]).status_code == 200
    settings.PORTAL_SCORING_TIMEOUT_SECONDS = 2

    grown_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    response = score(arena, name, hostile.ONNX_COLUMNS, [[1e9, 0.0]])
    took = time.monotonic() - started
    assert response.status_code >= 500, response.content
    body = response.json()
    assert body["error_code"] and body["error"]["code"] in ("model_unavailable", "model_error"), body
    assert took < 2 + 0.001 + 3, took  # the deadline (2 s, plus 1 s per 1,000 rows), and the host's stop
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - grown_before) / 1024
    assert grown_mb < 100, grown_mb
    _benign_answers(arena, within=5)


def test_a_model_host_that_never_answers_does_not_take_the_others_down(ready_arena: Arena, settings: Any) -> None:
    """Two requests hold a host that never answers: a third to it is answered 503 at once by the bulkhead (with
    Retry-After and MLflow's error_code); the benign model keeps answering meanwhile; the two held requests end by
    the deadline with a 503 whose text is true (the host did not answer; other models were served)."""
    import threading

    arena = ready_arena
    settings.PORTAL_SCORING_TIMEOUT_SECONDS = 3
    settings.PORTAL_SERVE_IN_FLIGHT_HOSTED = 2  # read when this process loads the deployment, on its first request
    name = "hanging-host"
    version = _upload_ready(arena, name, "model.zip", hostile.hanging_pyfunc_zip())
    deployment = _deployed(arena, name, version)
    assert deployment.status == "live", deployment.error
    trigger = [[hostile.TRIGGER, 1.0]]
    held: list[tuple[float, Any]] = []

    def hold() -> None:
        client = EntryPointClient(HTTP_AUTHORIZATION=arena.scorer.defaults["HTTP_AUTHORIZATION"])  # type: ignore[union-attr]
        started = time.monotonic()
        response = client.post(f"/api/v1/serve/{name}/dev/invocations", content_type="application/json",
                               data=json.dumps({"dataframe_split": {"columns": hostile.COLUMNS, "data": trigger}}))
        held.append((time.monotonic() - started, response))
        from django.db import connections

        connections.close_all()  # this thread's own: the database is dropped at the end of the module

    # The host starts on its first request (a cold start, bounded by the sandbox's own start-up timeout, not by the
    # scoring deadline): an ordinary request starts it, then the hostile ones find it running.
    assert score(arena, name, hostile.COLUMNS, [[1.0, 2.0]]).status_code == 200
    # The benign neighbour may be served by a host of its own too (when its ONNX form is not proven): started here,
    # so what is timed below is serving during the hang, not its cold start.
    _warm_benign(arena)
    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.8)  # both are in the host's hands (or queued on it) now
    started = time.monotonic()
    busy = score(arena, name, hostile.COLUMNS, trigger)
    assert time.monotonic() - started < 0.5
    assert busy.status_code == 503 and busy["Retry-After"] == "1", busy.content
    assert busy.json()["error_code"] == "TEMPORARILY_UNAVAILABLE" and busy.json()["error"]["code"] == "model_busy"
    assert "2 requests in progress" in busy.json()["message"], busy.content
    durations = _benign_answers(arena, within=1.5)
    for thread in threads:
        thread.join(timeout=20)
    assert len(held) == 2
    for took, response in held:
        assert response.status_code == 503, response.content
        assert took < 2 * 3 + 2, took  # at most the wait for the host's lock and then its answer, each ≤ 3 s
        message = response.json()["message"]
        assert "did not answer within 3 s" in message or "restarting" in message or "still busy" in message, message
    print(f"benign during the hang: {[round(d, 3) for d in durations]} s; held requests ended after "
          f"{[round(t, 2) for t, _ in held]} s")
