"""The web server is started the same way everywhere (issue 31): gunicorn's gthread workers, so a request waiting on
a slow model host holds one thread and the worker keeps serving pages and other models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from portal.webserver import web_command

ROOT = Path(__file__).resolve().parents[2]


def _options(command: list[str]) -> dict[str, str]:
    return {flag: command[i + 1] for i, flag in enumerate(command[:-1])
            if flag in ("--workers", "--worker-class", "--threads", "--timeout")}


def test_make_run_the_dockerfile_compose_and_kubernetes_start_the_same_web_server(monkeypatch: Any) -> None:
    monkeypatch.delenv("PORTAL_WEB_WORKERS", raising=False)
    monkeypatch.delenv("PORTAL_WEB_THREADS", raising=False)
    runstack = _options(web_command("python", "127.0.0.1:8000"))
    assert runstack["--worker-class"] == "portal.webworker.LingeringThreadWorker", runstack
    assert int(runstack["--threads"]) >= 8, runstack
    dockerfile = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert dockerfile is not None
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["web"]["command"]
    k8s = next(doc for doc in yaml.safe_load_all((ROOT / "deploy/k8s/base/web.yaml").read_text())
               if doc and doc.get("kind") == "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    for where, command in (("Dockerfile", json.loads(dockerfile.group(1))), ("docker-compose.yml", compose),
                           ("deploy/k8s/base/web.yaml", k8s)):
        options = _options(command)
        for flag in ("--workers", "--worker-class", "--threads"):
            assert options.get(flag) == runstack[flag], (where, flag, options)


def test_threads_and_workers_follow_the_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("PORTAL_WEB_WORKERS", "3")
    monkeypatch.setenv("PORTAL_WEB_THREADS", "4")
    options = _options(web_command("python", "127.0.0.1:8000"))
    assert (options["--workers"], options["--threads"], options["--worker-class"]) == ("3", "4", "portal.webworker.LingeringThreadWorker")
