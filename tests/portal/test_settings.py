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
}


def test_check_deploy_is_clean_with_production_values(tmp_path: Path) -> None:
    result = manage("check", "--deploy", "--fail-level", "DEBUG", env_vars=PRODUCTION_ENV, tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_without_a_secret_key_refuses_to_start(tmp_path: Path) -> None:
    values = {k: v for k, v in PRODUCTION_ENV.items() if k != "PORTAL_SECRET_KEY"}
    result = manage("check", env_vars=values, tmp_path=tmp_path)
    assert result.returncode != 0 and "PORTAL_SECRET_KEY" in result.stderr
    assert "Traceback" not in result.stderr, "a setting to fix is said in one line"


def test_the_migrations_check_needs_no_secrets(tmp_path: Path) -> None:
    """CI's "models match migrations" check runs on a bare checkout, without the production secret."""
    result = manage("makemigrations", "--check", "--dry-run", env_vars={}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "No changes detected" in result.stdout


@pytest.mark.parametrize("name,value,expected", [
    ("PORTAL_DEBUG", "maybe", "is not a boolean"),
    ("PORTAL_SESSION_IDLE_MINUTES", "ten", "is not a whole number"),
    ("PORTAL_SESSION_IDLE_MINUTES", "0", "below its minimum"),
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
    "registry.tasks.deployment_run": "deploy",
    "registry.tasks.deployments_reap": "deploy",
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
    "portal.tasks.webhook_deliver": "celery",
    "portal.tasks.send_email": "celery",
    "portal.tasks.audit_chain_verify": "celery",
    "portal.tasks.audit_checkpoint": "celery",
    "portal.tasks.audit_checkpoint_send": "celery",
}
ROUTE_SCRIPT = """
import json, django
django.setup()
from portal.celery import app
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
                                                       DJANGO_SETTINGS_MODULE="portal.settings",
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
