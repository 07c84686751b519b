"""No container engine runs here, so the compose file and Dockerfile are checked against the settings instead."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import clean_env

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ("worker-scan", "worker-deploy", "worker-score", "worker-monitor")
APP_SERVICES = ("web", *WORKERS, "beat", "migrate")


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_services_with_health_checks_and_volumes() -> None:
    services = _compose()["services"]
    assert {"web", *WORKERS, "beat", "postgres", "redis"} <= set(services)
    for name in ("web", *WORKERS, "postgres", "redis"):
        assert "healthcheck" in services[name], name
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert any("/data" in v for v in services["redis"]["volumes"])
    assert "gunicorn" in services["web"]["command"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "portal", "beat"]


def test_each_queue_has_its_own_worker_service() -> None:
    from django.conf import settings

    services = _compose()["services"]
    consumed = []
    for name in WORKERS:
        command = services[name]["command"]
        assert command[:4] == ["celery", "-A", "portal", "worker"], name
        consumed += command[command.index("-Q") + 1].split(",")
    assert sorted(consumed) == sorted(settings.PORTAL_CELERY_QUEUES)


def test_every_app_service_gets_what_the_settings_require(tmp_path: Path) -> None:
    compose = _compose()
    postgres_env = compose["services"]["postgres"]["environment"]
    for name in APP_SERVICES:
        service = compose["services"][name]
        env = service["environment"]
        assert "PORTAL_SECRET_KEY_FILE" in env and "PORTAL_SECRET_KEY" not in env, "secrets come from files"
        secret_name = env["PORTAL_SECRET_KEY_FILE"].rsplit("/", 1)[-1]
        assert secret_name in service["secrets"] and secret_name in compose["secrets"]
        assert env["DATABASE_URL"].startswith("postgres://")
        user, password, host, db = re.match(r"postgres://(\w+):(\w+)@(\w+):5432/(\w+)", env["DATABASE_URL"]).groups()
        assert (user, password, db) == (postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"],
                                        postgres_env["POSTGRES_DB"]) and host == "postgres"
        assert env["CELERY_BROKER_URL"].startswith("redis://redis:")
        assert {"postgres", "redis"} <= set(service["depends_on"])
    # The same values must satisfy the settings module, including check --deploy.
    env = dict(compose["services"]["web"]["environment"])
    secrets = {"PORTAL_SECRET_KEY": "compose-check-secret-key-abcdefghijklmnopqrstuvwxyz-0123456789",
               "PORTAL_PAYLOAD_KEYS": "NH4Yxr2bIzZf21P0Yo8BK1qjWifarquKp4AmIWPb1M4=",
               "PORTAL_SUBJECT_HASH_KEY": "compose-check-subject-hash-key-0123456789abcdef",
               "PORTAL_AUDIT_SIGNING_KEY": "-----BEGIN PRIVATE KEY-----\n"
                                            "MC4CAQAwBQYDK2VwBCIEIAxg0LrD3ZcITDl5pc8XWLWbYIvYvhVevwpMSOYI4mkk\n"
                                            "-----END PRIVATE KEY-----\n"}
    for name, value in secrets.items():
        assert f"{name}_FILE" in env and name not in env, f"{name} comes from a secret file"
        assert env[f"{name}_FILE"].rsplit("/", 1)[-1] in compose["services"]["web"]["secrets"]
        (tmp_path / name).write_text(value)
        env[f"{name}_FILE"] = str(tmp_path / name)
    env.update(PORTAL_VAR_DIR=str(tmp_path / "var"))
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "DEBUG"], cwd=ROOT,
                            env=clean_env(**{k: str(v) for k, v in env.items()}),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_dockerfile_is_multi_stage_and_runs_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM .+ AS (\w+)$", dockerfile, flags=re.MULTILINE)
    assert stages == ["build", "runtime"]
    user_lines = re.findall(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert user_lines and user_lines[-1] not in ("root", "0")
    for name in ("web", *WORKERS, "beat"):
        assert _compose()["services"][name].get("user") in (None, "portal", "10001")
