"""No container engine runs here: the compose file is rendered by ``docker-compose config`` (Debian's package, which
.ci/run installs) and checked against the settings, and the Dockerfile is read."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import clean_env, require_tool
from tests.registry import modelhost

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ("worker-scan", "worker-deploy", "worker-score", "worker-monitor")
APP_SERVICES = ("web", *WORKERS, "beat", "migrate")


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _config(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` with exactly ``variables`` (no .env of a developer's, none of this shell's)."""
    binary = require_tool("docker-compose")  # renders the compose file
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTAL_", "COMPOSE_"))}
    return subprocess.run([binary, "--project-directory", str(ROOT), "--env-file", str(env_file),
                           "-f", str(ROOT / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, timeout=60, env=env)


def _rendered(tmp_path: Path, **variables: str) -> dict[str, Any]:
    result = _config(tmp_path, PORTAL_SECRETS_DIR="./secrets", **variables)
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout))


def _settings_env(tmp_path: Path, service_env: dict[str, Any]) -> dict[str, str]:
    """A service's environment as the settings module sees it in the container: its secrets as files."""
    secrets = {"PORTAL_SECRET_KEY": "compose-check-secret-key-abcdefghijklmnopqrstuvwxyz-0123456789",
               "PORTAL_PAYLOAD_KEYS": "NH4Yxr2bIzZf21P0Yo8BK1qjWifarquKp4AmIWPb1M4=",
               "PORTAL_SUBJECT_HASH_KEY": "compose-check-subject-hash-key-0123456789abcdef",
               "PORTAL_AUDIT_SIGNING_KEY": "-----BEGIN PRIVATE KEY-----\n"
                                            "MC4CAQAwBQYDK2VwBCIEIAxg0LrD3ZcITDl5pc8XWLWbYIvYvhVevwpMSOYI4mkk\n"
                                            "-----END PRIVATE KEY-----\n"}
    env = {k: str(v) for k, v in service_env.items()}
    for name, value in secrets.items():
        assert f"{name}_FILE" in env and name not in env, f"{name} comes from a secret file"
        (tmp_path / name).write_text(value)
        env[f"{name}_FILE"] = str(tmp_path / name)
    env.update(PORTAL_VAR_DIR=str(tmp_path / "var"), DJANGO_SETTINGS_MODULE="config.settings")  # as the image sets
    return clean_env(**env)


def test_compose_has_the_services_with_health_checks_and_volumes() -> None:
    services = _compose()["services"]
    assert {"web", *WORKERS, "beat", "postgres", "redis"} <= set(services)
    for name in ("web", *WORKERS, "postgres", "redis"):
        assert "healthcheck" in services[name], name
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert any("/data" in v for v in services["redis"]["volumes"])
    assert "gunicorn" in services["web"]["command"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "config", "beat"]


def test_each_queue_has_its_own_worker_service() -> None:
    from django.conf import settings

    services = _compose()["services"]
    consumed = []
    for name in WORKERS:
        command = services[name]["command"]
        assert command[:4] == ["celery", "-A", "config", "worker"], name
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
    for name, value in compose["secrets"].items():
        assert value["file"].startswith("${PORTAL_SECRETS_DIR:?"), name


def test_config_stops_until_the_secrets_are_made_and_the_script_makes_them(tmp_path: Path) -> None:
    result = _config(tmp_path)
    assert result.returncode != 0
    assert "run scripts/compose-secrets first" in result.stderr
    work = tmp_path / "checkout"
    work.mkdir()
    script = subprocess.run(["sh", str(ROOT / "scripts" / "compose-secrets")], cwd=work, capture_output=True,
                            text=True, timeout=60)
    assert script.returncode == 0, script.stderr
    made = {p.name: p.read_bytes() for p in (work / "secrets").iterdir()}
    assert set(made) == {"secret_key", "payload_keys", "subject_hash_key", "audit_signing_key"}
    assert all(value.strip() for value in made.values())
    assert all((work / "secrets" / name).stat().st_mode & 0o077 == 0 for name in made)
    assert b"BEGIN PRIVATE KEY" in made["audit_signing_key"]
    assert "PORTAL_SECRETS_DIR=./secrets" in (work / ".env").read_text()
    again = subprocess.run(["sh", str(ROOT / "scripts" / "compose-secrets")], cwd=work, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and "kept" in again.stdout
    assert {p.name: p.read_bytes() for p in (work / "secrets").iterdir()} == made, "keys must never be regenerated"
    assert (work / ".env").read_text().count("PORTAL_SECRETS_DIR=") == 1


_FIRST_PAGE = ("import django; django.setup(); from django.test import Client; "
               "r = Client(HTTP_HOST='localhost:8000').get('/login/'); print(r.status_code, r.get('Location', ''))")


@pytest.mark.parametrize("tls", [False, True], ids=["plain HTTP", "behind a TLS proxy"])
def test_the_web_service_answers_plain_http_unless_a_tls_proxy_is_configured(tmp_path: Path, tls: bool) -> None:
    variables = {"PORTAL_TLS": "1", "PORTAL_PUBLIC_ORIGIN": "https://portal.example.com"} if tls else {}
    web = _rendered(tmp_path, **variables)["services"]["web"]
    env = _settings_env(tmp_path, web["environment"])
    static = subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)  # as the image's build does
    assert static.returncode == 0, static.stderr
    page = subprocess.run([sys.executable, "-c", _FIRST_PAGE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert page.returncode == 0, page.stderr
    status, _, location = page.stdout.strip().partition(" ")
    if tls:
        assert status == "301" and location.startswith("https://"), page.stdout
        # Behind the proxy, every production setting holds, including Django's own deployment checks (with a
        # model-host service to answer the sandbox check, as the compose file's `modelhost` does).
        with modelhost.answering(tmp_path) as url:
            check = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "DEBUG"],
                                   cwd=ROOT, env={**env, "PORTAL_MODEL_HOST_URL": url},
                                   capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stderr
    else:
        assert status == "200", f"docker compose up must give a portal one can open on http://localhost:8000: {page.stdout}"
        assert env["PORTAL_CSRF_TRUSTED_ORIGINS"] == "http://localhost:8000"


def test_gunicorn_timeout_and_each_worker_checks_its_own_health(tmp_path: Path) -> None:
    services = _rendered(tmp_path)["services"]
    web = services["web"]["command"]
    assert web[web.index("--timeout") + 1] == "120", "as under make run and on Kubernetes"
    for name in WORKERS:
        command = services[name]["command"]
        assert command[command.index("--hostname") + 1] == "celery@%h", name
        test = " ".join(services[name]["healthcheck"]["test"])
        assert re.search(r"-d celery@\$\$?HOSTNAME\b", test), f"{name}: its own node, not whichever worker answers first"


def test_the_model_host_service_holds_no_credential_and_reaches_nothing(tmp_path: Path) -> None:
    compose = _rendered(tmp_path)
    services, networks = compose["services"], compose["networks"]
    host = services["modelhost"]
    assert "registry.sandbox.service" in host["command"]
    assert not host.get("secrets") and not host.get("volumes") and not host.get("env_file")
    assert not any(re.search(r"SECRET|KEY|DATABASE|BROKER|PASSWORD|TOKEN|URL", k) for k in host.get("environment", {}))
    assert host["read_only"] is True and host["cap_drop"] == ["ALL"]
    assert host["user"] == "65534:65534" and "no-new-privileges:true" in host["security_opt"]
    assert host.get("mem_limit") and host.get("pids_limit")
    assert set(host["networks"]) == {"models"} and networks["models"].get("internal") is True
    for name in ("postgres", "redis"):
        assert "models" not in services[name].get("networks", {"default": None}), f"{name} must be out of its reach"
    for name in ("web", *WORKERS):
        assert services[name]["environment"]["PORTAL_MODEL_HOST_URL"] == "tcp://modelhost:7070", name
        assert services[name]["environment"]["PORTAL_SANDBOX_REQUIRED"] == "1", name
        assert "models" in services[name]["networks"], name
        assert services[name]["depends_on"]["modelhost"]["condition"] == "service_healthy", name
    assert "--ping" in host["healthcheck"]["test"]


def test_the_dockerfile_is_multi_stage_and_runs_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM .+ AS (\w+)$", dockerfile, flags=re.MULTILINE)
    assert stages == ["build", "runtime"]
    user_lines = re.findall(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert user_lines and user_lines[-1] not in ("root", "0")
    for name in ("web", *WORKERS, "beat"):
        assert _compose()["services"][name].get("user") in (None, "portal", "10001")
