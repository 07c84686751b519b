"""The same boundary in containers: hostile uploads through the model-host service.

Where the portal's containers may not create namespaces (compose, Kubernetes), ``PORTAL_MODEL_HOST_URL`` sends every
sandboxed load and every model host to the model-host service, a container of its own with no credential and no way
out. Here that container is stood in for by bubblewrap (``modelhost.py``: read-only image, no ``var/``, no secrets, no
network, non-root, no user namespaces inside, so the service confines each model with ``confine.py`` as it does in a
real container), and the portal's web process (this test process) and a real Celery worker reach it over its socket.

The cases are a subset of ``test_hostile_uploads.py``'s, through the same real entry points and checked the same way
(upload, scan, deploy, score, batch; no canary outside, no secret in any answer or log, the benign neighbour keeps
answering), chosen for what differs in this mode: files the service's own user could write, secrets the portal's
processes hold, process creation (seccomp without namespaces) and killing, and a plain pickle gadget.
"""

from __future__ import annotations

import re

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from tests.conftest import needs_sandbox
from tests.registry import modelhost
from tests.registry.versions.test_hostile_uploads import CASES, Arena, judge_case, open_arena
from tests.registry.versions.test_hostile_uploads import ready_arena as ready_arena  # the fixture, over this module's arena

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow, needs_sandbox(), pytest.mark.real_sandbox]

REMOTE_CASES = [  # the whole list takes 10 s to 90 s a case (a minute and a half each on a loaded machine)
    "drop a .pth into site-packages",
    "secrets back through an exception at load",
    "fork bomb",
    "kill every process in sight",
    "plain pickle writing a file through numpy.memmap",
]
assert set(REMOTE_CASES) <= set(CASES)


@pytest.fixture(scope="module")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from django.conf import settings

    sock_dir = tmp_path_factory.mktemp("modelhost")
    proc = modelhost.start(sock_dir, var_dir=Path(settings.VAR_DIR), log=sock_dir / "service.log")
    try:
        yield sock_dir
    finally:
        modelhost.stop(proc)


@pytest.fixture(scope="module")
def arena(service_dir: Path, django_db_setup: None, django_db_blocker: Any) -> Iterator[Arena]:
    service = f"unix:{service_dir / 'modelhost.sock'}"
    from registry.sandbox import hosts, remote

    hosts.pool.stop_all()  # hosts an earlier module started with bubblewrap
    remote._ping = (0.0, None)
    with override_settings(PORTAL_MODEL_HOST_URL=service):
        try:
            with open_arena(django_db_blocker, worker_env={"PORTAL_MODEL_HOST_URL": service}) as opened:
                yield opened
        finally:
            hosts.pool.stop_all()
            remote._ping = (0.0, None)


def test_models_are_loaded_in_the_service_not_here(ready_arena: Arena, service_dir: Path) -> None:
    """The benign neighbour's checks at upload and its conversion at deployment ran in the service; no sandbox
    process was started by this process or the worker (bubblewrap's own command line never appears among their
    children)."""
    import subprocess

    log = (service_dir / "service.log").read_text()
    # prepare-serving gets the model alone, or a bundle of the model and the reference rows it is proven on
    assert "Ran smoke for model.joblib: status 0" in log and re.search(
        r"Ran prepare-serving for (bundle|model\.joblib): status 0", log), log
    children = subprocess.run(["ps", "-ww", "-eo", "ppid=,args="], capture_output=True,  # -ww: whole command lines
                              text=True).stdout.splitlines()
    ours = {str(p.pid) for p in ready_arena.workers} | {str(__import__("os").getpid())}
    assert not [c for c in children if c.split(None, 1)[0] in ours and "bwrap" in c
                and "registry.sandbox.service" not in c]  # but the stand-in for the service's own container


@pytest.mark.parametrize("case", REMOTE_CASES, ids=REMOTE_CASES)
def test_a_hostile_upload_gets_nowhere_through_the_service(case: str, ready_arena: Arena,
                                                          capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    judge_case(ready_arena, case, capfd, tmp_path)
