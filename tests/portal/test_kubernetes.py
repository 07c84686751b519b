"""The Kubernetes manifests (deploy/k8s): rendered offline by kustomize (Debian's kubectl) and validated against the
Kubernetes API schemas by kubernetes-validate, then checked against what the settings and the queues need."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import manage, require_tool, settings_variables
from tests.registry import modelhost

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.32.0"  # the oldest release the manifests must load on (Debian's kubectl is 1.32)


def _render(overlay: str) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl")  # renders the manifests offline
    result = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _render(request.param)


def _by(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def test_every_resource_validates_against_the_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for doc in rendered:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_each_queue_has_its_own_worker_and_web_and_score_autoscale(rendered: list[dict[str, Any]]) -> None:
    from django.conf import settings

    deployments = _by(rendered, "Deployment")
    consumed = []
    for name, doc in deployments.items():
        command = _containers(doc)[0]["command"]
        if command[:4] == ["celery", "-A", "config", "worker"]:
            consumed += command[command.index("-Q") + 1].split(",")
            assert "--prefetch-multiplier" in command and "livenessProbe" in _containers(doc)[0], name
    assert sorted(consumed) == sorted(settings.PORTAL_CELERY_QUEUES)
    beat = deployments["portal-beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    targets = {h["spec"]["scaleTargetRef"]["name"] for h in _by(rendered, "HorizontalPodAutoscaler").values()}
    assert targets == {"portal-web", "portal-worker-score", "portal-worker-monitor"} and targets <= set(deployments)
    migrate = _by(rendered, "Job")["portal-migrate"]
    assert _containers(migrate)[0]["command"] == ["python", "manage.py", "migrate", "--noinput"]


def test_web_probes_resources_and_security(rendered: list[dict[str, Any]]) -> None:
    web = _containers(_by(rendered, "Deployment")["portal-web"])[0]
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config = _by(rendered, "ConfigMap")["portal-config"]["data"]
    probe_host = web["readinessProbe"]["httpGet"]["httpHeaders"][0]["value"]
    assert probe_host in config["PORTAL_ALLOWED_HOSTS"].split(","), "Django would answer the probes 400"
    selector = _by(rendered, "Service")["portal-web"]["spec"]["selector"]
    assert selector.items() <= _by(rendered, "Deployment")["portal-web"]["spec"]["template"]["metadata"][
        "labels"].items()
    for doc in [*_by(rendered, "Deployment").values(), *_by(rendered, "Job").values()]:
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        for container in pod["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            if doc["metadata"]["name"] != "portal-modelhost":  # it gets nothing of the portal's (test below)
                assert container["envFrom"] == [{"configMapRef": {"name": "portal-config"}}]


def test_secrets_arrive_as_files_and_the_config_names_only_variables_the_portal_reads(
        rendered: list[dict[str, Any]]) -> None:
    config = _by(rendered, "ConfigMap")["portal-config"]["data"]
    for secret in ("PORTAL_SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL", "PORTAL_METRICS_TOKEN",
                   "PORTAL_PAYLOAD_KEYS", "PORTAL_SUBJECT_HASH_KEY", "PORTAL_AUDIT_SIGNING_KEY"):
        assert secret not in config and config[f"{secret}_FILE"].startswith("/run/secrets/portal/")
    read = settings_variables()
    outside = {"MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "HF_HUB_OFFLINE", "HOME"}
    unknown = sorted(k for k in config if k.removesuffix("_FILE") not in read | outside)
    assert not unknown, f"the ConfigMap sets variables nothing reads (typos?): {unknown}"
    mounted = {v["name"]: v for v in _by(rendered, "Deployment")["portal-web"]["spec"]["template"]["spec"]["volumes"]}
    assert mounted["secrets"]["secret"]["secretName"] == "portal-secrets"


def test_the_settings_start_with_the_manifests_values(tmp_path: Path) -> None:
    """The prod ConfigMap, with its secret files, passes `check --deploy` (as test_compose does for compose)."""
    config = dict(_by(_render("prod"), "ConfigMap")["portal-config"]["data"])
    secrets = {"secret_key": "k8s-check-secret-key-abcdefghijklmnopqrstuvwxyz-0123456789-abcdef",
               "database_url": "postgres://portal:secret@postgres:5432/portal",
               "broker_url": "redis://redis:6379/0", "metrics_token": "metrics-token-0123456789abcdef",
               "payload_keys": "NH4Yxr2bIzZf21P0Yo8BK1qjWifarquKp4AmIWPb1M4=",
               "subject_hash_key": "k8s-check-subject-hash-key-0123456789abcdef",
               "audit_signing_key": "-----BEGIN PRIVATE KEY-----\n"
                                            "MC4CAQAwBQYDK2VwBCIEIAxg0LrD3ZcITDl5pc8XWLWbYIvYvhVevwpMSOYI4mkk\n"
                                            "-----END PRIVATE KEY-----"}
    for name, value in secrets.items():
        (tmp_path / name).write_text(value + "\n")
    env = {k: v.replace("/run/secrets/portal", str(tmp_path)) for k, v in config.items() if k != "PORTAL_VAR_DIR"}
    env.update(HOME=str(tmp_path))
    assert env["PORTAL_MODEL_HOST_URL"] == "tcp://portal-modelhost:7070"
    with modelhost.answering(tmp_path) as url:  # stands in for the cluster's portal-modelhost Service
        result = manage("check", "--deploy", "--fail-level", "DEBUG", env_vars={**env, "PORTAL_MODEL_HOST_URL": url},
                        tmp_path=tmp_path / "var")
    assert result.returncode == 0, result.stderr
    # Without the keys' secret files the portal does not start (issue 21 item 6).
    (tmp_path / "payload_keys").unlink()
    result = manage("check", env_vars=env, tmp_path=tmp_path / "var")
    assert result.returncode != 0 and "payload_keys" in result.stderr


def test_the_scan_worker_is_off_the_network() -> None:
    docs = _render("prod")
    policy = _by(docs, "NetworkPolicy")["portal-worker-scan-isolated"]
    scan_labels = _by(docs, "Deployment")["portal-worker-scan"]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= scan_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and policy["spec"]["ingress"] == []
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert ports == {53, 5432, 6379, 7070}, "DNS, PostgreSQL, Redis and the model hosts only: no HTTP, no model hubs"
    to_hosts = [rule for rule in policy["spec"]["egress"] if any(p["port"] == 7070 for p in rule["ports"])]
    assert to_hosts[0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "modelhost"


def test_the_model_host_pods_hold_no_credential_and_reach_nothing() -> None:
    docs = _render("prod")
    deployment = _by(docs, "Deployment")["portal-modelhost"]
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert all("secret" not in volume and "configMap" not in volume for volume in pod["volumes"])
    (container,) = pod["containers"]
    assert "envFrom" not in container
    assert not [e["name"] for e in container.get("env", []) if re.search(r"SECRET|KEY|DATABASE|BROKER|TOKEN|URL",
                                                                         e["name"])]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]
    assert "registry.sandbox.service" in container["command"]
    assert "--ping" in container["readinessProbe"]["exec"]["command"]
    service = _by(docs, "Service")["portal-modelhost"]
    assert service["spec"]["selector"].items() <= labels.items()
    config = _by(docs, "ConfigMap")["portal-config"]["data"]
    assert config["PORTAL_MODEL_HOST_URL"] == f"tcp://portal-modelhost:{service['spec']['ports'][0]['port']}"
    assert config["PORTAL_SANDBOX_REQUIRED"] == "1", "a portal pod that cannot reach the model hosts is not ready"
    policy = _by(docs, "NetworkPolicy")["portal-modelhost-isolated"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == [], "no way out, not even DNS"
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == [7070]
    allowed = {e["key"]: set(e["values"]) for e in rule["from"][0]["podSelector"]["matchExpressions"]}
    assert allowed["app.kubernetes.io/component"] == {"web", "worker-scan", "worker-deploy", "worker-score"}
    assert allowed["app.kubernetes.io/name"] == {"mlops-portal"}
