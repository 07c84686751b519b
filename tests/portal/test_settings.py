"""Settings come from the environment, fail fast on nonsense, and pass `check --deploy` with production values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from portal import env
from tests.conftest import clean_env, manage, settings_variables

ROOT = Path(__file__).resolve().parents[2]

PRODUCTION_ENV = {
    "PORTAL_DEBUG": "0",
    "PORTAL_SECRET_KEY": "production-like-secret-key-9f8e7d6c5b4a3210-zyxwvutsrqponmlkjihgfedcba",
    "PORTAL_ALLOWED_HOSTS": "portal.example.com",
    "DATABASE_URL": "postgres://portal:secret@db.example.com:5432/portal",
    "CELERY_BROKER_URL": "redis://redis.example.com:6379/0",
    "PORTAL_PAYLOAD_KEYS": "NH4Yxr2bIzZf21P0Yo8BK1qjWifarquKp4AmIWPb1M4=",
    "PORTAL_SUBJECT_HASH_KEY": "production-like-subject-hash-key-0123456789abcdef",
    "PORTAL_AUDIT_SIGNING_KEY": "-----BEGIN PRIVATE KEY-----\n"
                                "MC4CAQAwBQYDK2VwBCIEIAxg0LrD3ZcITDl5pc8XWLWbYIvYvhVevwpMSOYI4mkk\n"
                                "-----END PRIVATE KEY-----\n",
}
KEYS = ("PORTAL_PAYLOAD_KEYS", "PORTAL_SUBJECT_HASH_KEY", "PORTAL_AUDIT_SIGNING_KEY")


def test_check_deploy_is_clean_with_production_values(tmp_path: Path) -> None:
    result = manage("check", "--deploy", "--fail-level", "DEBUG", env_vars=PRODUCTION_ENV, tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_without_a_secret_key_refuses_to_start(tmp_path: Path) -> None:
    values = {k: v for k, v in PRODUCTION_ENV.items() if k != "PORTAL_SECRET_KEY"}
    result = manage("check", env_vars=values, tmp_path=tmp_path)
    assert result.returncode != 0 and "PORTAL_SECRET_KEY" in result.stderr
    assert "Traceback" not in result.stderr, "a setting to fix is said in one line"


@pytest.mark.parametrize("missing", [*[(k,) for k in KEYS], KEYS])
def test_production_refuses_to_start_without_each_key_it_would_otherwise_derive(tmp_path: Path,
                                                                                 missing: tuple[str, ...]) -> None:
    """Issue 21 item 6: derived payload and subject-hash keys die with a rotated secret key; a generated signing key
    differs per pod. `check` and `migrate` (the deployment's first step) stop, naming each key that is missing."""
    values = {k: v for k, v in PRODUCTION_ENV.items() if k not in missing}
    for command in (("check",), ("check", "--deploy"), ("migrate",)):
        local = {"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"} if command[0] == "migrate" else {}
        result = manage(*command, env_vars={**values, **local}, tmp_path=tmp_path)
        assert result.returncode != 0, (command, result.stdout)
        for name in KEYS:
            assert (f"{name} is not set" in result.stderr) == (name in missing), (command, name, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "db.sqlite3").exists() or "portal_auditevent" not in (tmp_path / "db.sqlite3").read_text(
        errors="ignore"), "migrate stopped before it touched the database"
    demo = manage("check", env_vars={**values, "PORTAL_DEBUG": "1"}, tmp_path=tmp_path / "demo")
    assert demo.returncode == 0 and "is not set" not in demo.stderr, "the demo may still generate them"


def test_keys_may_come_from_files(tmp_path: Path) -> None:
    values = {k: v for k, v in PRODUCTION_ENV.items() if k not in KEYS}
    for name in KEYS:
        (tmp_path / name).write_text(PRODUCTION_ENV[name] + "\n")
        values[f"{name}_FILE"] = str(tmp_path / name)
    result = manage("check", "--deploy", "--fail-level", "DEBUG", env_vars=values, tmp_path=tmp_path / "var")
    assert result.returncode == 0, result.stderr


def test_the_migrations_check_needs_no_secrets(tmp_path: Path) -> None:
    """CI's "models match migrations" check runs on a bare checkout, without the production secret."""
    result = manage("makemigrations", "--check", "--dry-run", env_vars={}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "No changes detected" in result.stdout


@pytest.mark.parametrize("name,value,expected", [
    ("PORTAL_DEBUG", "maybe", "is not a boolean"),
    ("PORTAL_SESSION_IDLE_MINUTES", "ten", "is not a whole number"),
    ("PORTAL_SESSION_IDLE_MINUTES", "0", "below its minimum"),
    ("PORTAL_MODEL_HOST_NICE", "20", "above its maximum"),  # 19 is the lowest priority there is
    ("DATABASE_URL", "mysql://x/y", "expected one of"),
    ("CELERY_BROKER_URL", "kafka://x", "expected one of"),
    ("PORTAL_LOG_LEVEL", "LOUD", "is not one of"),
])
def test_nonsense_stops_the_process_with_the_variables_name(tmp_path: Path, name: str, value: str,
                                                             expected: str) -> None:
    result = manage("check", env_vars={**PRODUCTION_ENV, name: value}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert name in result.stderr and expected in result.stderr


def test_secrets_can_come_from_files(tmp_path: Path) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text(PRODUCTION_ENV["PORTAL_SECRET_KEY"] + "\n")
    values = {k: v for k, v in PRODUCTION_ENV.items() if k != "PORTAL_SECRET_KEY"}
    result = manage("check", "--deploy", "--fail-level", "DEBUG", env_vars={**values,
                     "PORTAL_SECRET_KEY_FILE": str(secret_file)}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr


def test_env_helpers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("X_FLAG", "Yes")
    assert env.env_bool("X_FLAG", False) is True
    monkeypatch.setenv("X_LIST", " a, b ,,c ")
    assert env.env_list("X_LIST", []) == ["a", "b", "c"]
    monkeypatch.setenv("X_NUM", "70")
    with pytest.raises(ImproperlyConfigured, match="above its maximum"):
        env.env_int("X_NUM", 1, maximum=60)
    (tmp_path / "v").write_text("from-file\n")
    monkeypatch.setenv("X_SECRET_FILE", str(tmp_path / "v"))
    assert env.env_str("X_SECRET") == "from-file"
    monkeypatch.setenv("X_SECRET", "direct")
    with pytest.raises(ImproperlyConfigured, match="not both"):
        env.env_str("X_SECRET")
    monkeypatch.delenv("X_SECRET")
    monkeypatch.setenv("X_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ImproperlyConfigured, match="cannot be read"):
        env.env_str("X_SECRET")


def test_the_readme_documents_every_variable_the_settings_read() -> None:
    readme = (ROOT / "README.md").read_text()
    read = settings_variables()
    assert read, "the settings read no variables?"
    missing = sorted(v for v in read if f"`{v}`" not in readme)
    assert not missing, f"README's table lacks: {missing}"


ROUTES = {
    "registry.tasks.version_scan": "scan",
    # the global importance after a scan: a second sandbox run, beside the scans
    "registry.tasks.version_explain": "scan",
    "registry.tasks.deployment_run": "deploy",
    "registry.tasks.deployments_reap": "deploy",
    # an edge package converts and proves the version in the sandbox, as a deployment does
    "registry.tasks.edge_package_build": "deploy",
    "registry.tasks.batch_plan": "score",
    "registry.tasks.batch_chunk": "score",
    "registry.tasks.batch_assemble": "score",
    "registry.tasks.batch_log": "score",
    "registry.tasks.batch_reap": "score",
    "registry.tasks.batch_schedule_fire": "score",
    "monitoring.tasks.flush_predictions": "monitor",
    "monitoring.tasks.rollup": "monitor",
    "monitoring.tasks.evaluate_alerts": "monitor",
    "monitoring.tasks.purge_payloads": "monitor",
    "monitoring.tasks.partitions_maintain": "monitor",
    "monitoring.tasks.experiments_check": "monitor",
    "monitoring.tasks.snapshot_cut": "score",
    "monitoring.tasks.snapshots_reap": "monitor",
    "monitoring.tasks.retraining_evaluate": "monitor",
    # production rows explained by each champion's sandboxed host, hourly
    "monitoring.tasks.attribution_drift": "monitor",
    # a compliance officer's subject access report: each decision explained by its version's sandboxed host
    "monitoring.tasks.subject_report": "score",
    "portal.tasks.webhook_deliver": "celery",
    "portal.tasks.send_email": "celery",
    "portal.tasks.audit_chain_verify": "celery",
    "portal.tasks.audit_checkpoint": "celery",
    "portal.tasks.audit_checkpoint_send": "celery",
    # MLflow sync: the import's download and the alias calls are network I/O; the scan it causes goes to `scan`
    "registry.tasks.mlflow_sync_run": "celery",
    "registry.tasks.mlflow_reconcile": "celery",
    # Blocked promotion requests checked again: reads gates and sends mail, nothing long
    "registry.tasks.promotions_recheck": "celery",
}
ROUTE_SCRIPT = """
import json, django
django.setup()
from config.celery import app
app.loader.import_default_modules()
names = sorted(n for n in app.tasks if not n.startswith("celery."))
routes = {n: app.amqp.router.route({}, n)["queue"].name for n in names}
print(json.dumps({"routes": routes, "consumed": sorted(q.name for q in app.amqp.queues.consume_from.values())
                  if app.amqp.queues.consume_from else sorted(app.amqp.queues)}))
"""


@pytest.mark.parametrize("single_queue", ["", "private-q"])
def test_tasks_are_routed_to_their_queue_unless_one_queue_is_asked_for(tmp_path: Path, single_queue: str) -> None:
    import json

    extra = {"PORTAL_CELERY_QUEUE": single_queue} if single_queue else {}
    result = subprocess.run([sys.executable, "-c", ROUTE_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=clean_env(PORTAL_VAR_DIR=str(tmp_path),
                                                       DJANGO_SETTINGS_MODULE="config.settings",
                                                       **PRODUCTION_ENV, **extra))
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(found["routes"]) == set(ROUTES), "a new task needs its queue here (and in the compose file)"
    if single_queue:
        assert set(found["routes"].values()) == {single_queue}
    else:
        assert found["routes"] == ROUTES
        # A worker started without -Q takes from every queue (what `make run` starts).
        assert found["consumed"] == sorted({"celery", "scan", "deploy", "score", "monitor"})


# --- The demo's var/demo.env: a second terminal works, production still refuses ----------------------------------

SHOW = "from django.conf import settings as s; print(s.PORTAL_DEBUG, s.DEBUG, s.DEMO_ENV_LOADED, s.SECRET_KEY[:8])"


def _shown(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].split()


def _write_demo(folder: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """What `make run` does first, in a process of its own: `python -m portal.demo_env` with PORTAL_DEBUG on."""
    return subprocess.run([sys.executable, "-m", "portal.demo_env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=clean_env(PORTAL_VAR_DIR=str(folder), PORTAL_DEBUG="1", **extra))


def test_make_runs_demo_file_lets_a_bare_second_process_start(tmp_path: Path) -> None:
    written = _write_demo(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'demo.sqlite3'}")
    assert written.returncode == 0, written.stderr
    demo = tmp_path / "demo.env"
    assert demo.stat().st_mode & 0o777 == 0o600
    text = demo.read_text()
    for key in ("PORTAL_DEBUG=1", "PORTAL_SECRET_KEY=", "PORTAL_PAYLOAD_KEYS=", "PORTAL_SUBJECT_HASH_KEY=",
                "PORTAL_AUDIT_SIGNING_KEY_FILE=", "DATABASE_URL=sqlite:///", "PORTAL_URL=http://127.0.0.1:8000"):
        assert key in text, key
    # A second terminal: no variable at all but the var folder (which `make run` and manage.py share by default).
    shown = manage("shell", "-c", SHOW, env_vars={}, tmp_path=tmp_path)
    assert shown.returncode == 0, shown.stderr
    secret = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("PORTAL_SECRET_KEY="))
    assert _shown(shown) == ["True", "False", "True", secret[:8]], "demo mode, production error pages"
    again = _write_demo(tmp_path)
    assert again.returncode == 0 and secret in demo.read_text(), "the secrets are generated once"
    assert "DATABASE_URL" not in demo.read_text(), "a make run without DATABASE_URL is back on the default"
    pages = manage("shell", "-c", SHOW, env_vars={"PORTAL_DEBUG_PAGES": "1"}, tmp_path=tmp_path)
    assert _shown(pages)[:2] == ["True", "True"], "Django's debug pages only when asked for"
    explicit = manage("shell", "-c", SHOW, env_vars={"PORTAL_SECRET_KEY": PRODUCTION_ENV["PORTAL_SECRET_KEY"]},
                      tmp_path=tmp_path)
    assert _shown(explicit)[3] == PRODUCTION_ENV["PORTAL_SECRET_KEY"][:8], "explicit variables win"


def test_production_ignores_or_refuses_a_demo_file(tmp_path: Path) -> None:
    assert _write_demo(tmp_path).returncode == 0
    values = {k: v for k, v in PRODUCTION_ENV.items() if k != "PORTAL_SECRET_KEY"}
    result = manage("check", env_vars=values, tmp_path=tmp_path)  # PORTAL_DEBUG=0, as Kubernetes' config map says
    assert result.returncode != 0 and "PORTAL_SECRET_KEY" in result.stderr, "an explicit PORTAL_DEBUG=0 ignores it"
    demo = tmp_path / "demo.env"
    demo.chmod(0o644)
    loose = manage("check", env_vars={}, tmp_path=tmp_path)
    assert loose.returncode != 0 and "chmod 600" in loose.stderr and "Traceback" not in loose.stderr
    demo.chmod(0o600)
    with demo.open("a") as fh:
        fh.write("PORTAL_SECURE_COOKIES=0\n")
    planted = manage("check", env_vars={}, tmp_path=tmp_path)
    assert planted.returncode != 0 and "may be set here" in planted.stderr
    off = subprocess.run([sys.executable, "-m", "portal.demo_env"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=clean_env(PORTAL_VAR_DIR=str(tmp_path / "prod"), PORTAL_DEBUG="0"))
    assert off.returncode == 0 and not (tmp_path / "prod" / "demo.env").exists(), "nothing written with debug off"
    pages = manage("check", env_vars={**PRODUCTION_ENV, "PORTAL_DEBUG_PAGES": "1"}, tmp_path=tmp_path / "p2")
    assert pages.returncode != 0 and "PORTAL_DEBUG_PAGES" in pages.stderr


def test_an_older_demo_folder_keeps_its_keys(tmp_path: Path) -> None:
    """A demo var folder from before demo.env: its secret key is kept and the payload and subject-hash keys are the
    ones the settings derived from it, so its encrypted payloads and subject hashes stay readable."""
    import base64
    import hashlib

    old = "an-older-demo-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz"
    (tmp_path / "secret_key").write_text(old)
    assert _write_demo(tmp_path).returncode == 0
    values = dict(line.split("=", 1) for line in (tmp_path / "demo.env").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert values["PORTAL_SECRET_KEY"] == old
    assert values["PORTAL_SUBJECT_HASH_KEY"] == hashlib.sha256(("subject-hash:" + old).encode()).hexdigest()
    assert values["PORTAL_PAYLOAD_KEYS"] == base64.urlsafe_b64encode(
        hashlib.sha256(("payload-key:" + old).encode()).digest()).decode()
