"""Density: many deployed models per serving process, beside one model, in one run.

    BENCH_BROKER_URL=redis://127.0.0.1:6379/3 .venv/bin/python bench/density.py [--models 300] [--requests 3000]
        [--tight-mb 8]

One process, the production scoring entry point (``config.wsgi.application``: the lean WSGI path, bearer-token
auth, rate counting and prediction logging to Redis on), PostgreSQL (a database of its own, ``portal_bench_density``
on DATABASE_URL's server, dropped and re-created) and Redis (BENCH_BROKER_URL). ``--models`` logistic regressions
(20 features, each trained on its own random data, converted to ONNX by skl2onnx in this process) are "deployed" in
``dev`` the fast way: the bench writes the deployment rows itself (versions ready, deployments live, serving kind
``onnx``, each ONNX file in the artifact store) instead of running the sandboxed scan and the deployment worker for
each, which would take most of an hour on two cores; serving then loads each form exactly as it loads a deployed one.

Figures, one model beside ``--models`` models, requests spread uniformly at random over the models:

- warm p50 / p99 of a 1-row request (every model loaded);
- cold-load p50: the serving form's load as the deployment page shows it (``ColdLoad``), one per model;
- resident memory per loaded model: the process's RSS growth over loading them all, divided by their number
  (and the portal's own estimate, the mean of ``LoadedModel.resident_bytes``);
- with ``--tight-mb``: the same random requests under a budget that holds only part of the models (the least
  recently used are evicted and load again): p50 / p99 of every request, evictions, and the share that waited for a
  cold load;
- an endpoint (``/api/v1/serve/endpoints/front/dev/invocations``: a header rule, a field rule and a share rule in
  front of the default) beside the default model's own route: what routing costs a request.

Prints the load average before and after: the figures are only as quiet as the machine was.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SERVER = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres").rsplit("/", 1)[0]
DB_NAME = "portal_bench_density"
DB_URL = f"{SERVER}/{DB_NAME}"
FEATURES = 20


def configure() -> None:
    from bench.serving import bench_keys

    for key in [k for k in os.environ if k.startswith(("PORTAL_", "DJANGO_"))]:
        del os.environ[key]
    os.environ.update(DATABASE_URL=DB_URL, CELERY_BROKER_URL=os.environ.get(
        "BENCH_BROKER_URL", "redis://127.0.0.1:6379/3"), PORTAL_DEBUG="0",
        PORTAL_SECRET_KEY="bench-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",  # noqa: S106
        PORTAL_ALLOWED_HOSTS="testserver", PORTAL_SECURE_SSL_REDIRECT="0", PORTAL_SECURE_COOKIES="0",
        PORTAL_VAR_DIR=str(ROOT / "var" / "bench" / "density"), PORTAL_LOG_LEVEL="WARNING",
        PORTAL_SERVE_RATE_LIMIT="0", DJANGO_SETTINGS_MODULE="config.settings", **bench_keys())


def fresh_database() -> None:
    import psycopg2

    admin = psycopg2.connect(f"{SERVER}/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {DB_NAME}")
    admin.close()
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=os.environ,
                   check=True)


def onnx_models(n: int) -> list[bytes]:
    import numpy as np
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    made = []
    for i in range(n):
        rng = np.random.default_rng(i)
        X = rng.normal(size=(200, FEATURES)).astype(np.float32)
        y = (X @ rng.normal(size=FEATURES) > 0).astype(int)
        made.append(to_onnx(LogisticRegression(max_iter=200).fit(X, y), X[:1], target_opset=17,
                            options={"zipmap": False}).SerializeToString())
    return made


def deploy(graphs: list[bytes]) -> tuple[str, list[str]]:
    """The models deployed in dev (rows written directly: see the module's docstring); a data scientist's token."""
    import hashlib

    from django.contrib.auth.models import Group
    from django.core.files.base import ContentFile

    from portal import services as portal_services
    from portal.models import Membership, Team
    from portal.roles import DATA_SCIENTIST, sync_roles
    from registry import storage
    from registry.models import Deployment, EnvironmentState, ModelVersion, RegisteredModel

    sync_roles()
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user("bench", "bench@example.invalid", "bench-pass-123456")
    user.groups.add(Group.objects.get(name=DATA_SCIENTIST))
    team, _ = Team.objects.get_or_create(slug="bench", defaults={"name": "Bench"})
    Membership.objects.create(team=team, user=user)
    names = []
    signature = {"inputs": [{"name": "X", "type": "float", "shape": [-1, FEATURES]}],
                 "outputs": [{"type": "long"}]}
    for i, graph in enumerate(graphs):
        digest = hashlib.sha256(graph).hexdigest()
        blob = storage.blob_put(ContentFile(graph), sha256=digest, size=len(graph))
        model = RegisteredModel.objects.create(name=f"m{i:04d}", team=team, created_by=user)
        version = ModelVersion.objects.create(
            model=model, number=1, status="ready", artifact=blob, artifact_sha256=digest, artifact_size=len(graph),
            format="onnx", signature=signature, uploaded_by=user)
        deployment = Deployment.objects.create(model=model, version=version, environment="dev", status="live",
                                               progress=100, requested_by=user, serving_kind="onnx",
                                               serving_blob=blob)
        EnvironmentState.objects.create(model=model, environment="dev", champion=deployment, generation=1)
        names.append(model.name)
    _token, plaintext = portal_services.token_create(user=user, name="bench", actor=user)
    return plaintext, names


class Caller:
    """Requests through the production WSGI entry point, in this process."""

    def __init__(self, token: str) -> None:
        from config.wsgi import application

        self.app = application
        self.token = token

    def post(self, path: str, body: bytes, **headers: str) -> tuple[int, bytes]:
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "testserver",
                   "SERVER_PORT": "80", "HTTP_HOST": "testserver", "wsgi.url_scheme": "http",
                   "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
                   "CONTENT_TYPE": "application/json", "HTTP_AUTHORIZATION": f"Bearer {self.token}",
                   "REMOTE_ADDR": "127.0.0.1", **{f"HTTP_{k.upper()}": v for k, v in headers.items()}}
        captured: dict[str, Any] = {}

        def start_response(status: str, response_headers: list[Any], exc_info: Any = None) -> None:
            captured["status"] = status

        content = b"".join(self.app(environ, start_response))
        return int(captured["status"].split()[0]), content


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def timed(caller: Caller, paths: list[str], body: bytes, **headers: str) -> list[float]:
    seconds = []
    for path in paths:
        began = time.perf_counter()
        status, content = caller.post(path, body, **headers)
        seconds.append(time.perf_counter() - began)
        if status != 200:
            raise SystemExit(f"{path}: {status} {content[:300]!r}")
    return seconds


def figures(name: str, caller: Caller, names: list[str], body: bytes, requests: int, rng: Any) -> dict[str, Any]:
    from django.conf import settings

    from registry.models import ColdLoad
    from registry.serving import runtime

    settings.PORTAL_SERVE_MEMORY_MB = 1 << 20
    runtime.cache.clear()
    ColdLoad.objects.all().delete()
    before = rss_bytes()
    timed(caller, [f"/api/v1/serve/{n}/dev/invocations" for n in names], body)  # every form's cold load
    grown = rss_bytes() - before
    estimates = [m.resident_bytes() for m in runtime.cache._models.values()]
    cold = list(ColdLoad.objects.values_list("seconds", flat=True))
    if len(names) == 1:  # one model has one cold load: load it again, as often as the many-model run loads
        for _ in range(29):
            runtime.cache.clear()
            timed(caller, [f"/api/v1/serve/{names[0]}/dev/invocations"], body)
        cold = list(ColdLoad.objects.values_list("seconds", flat=True))
    picks = [names[int(i)] for i in rng.integers(len(names), size=requests)]
    warm = timed(caller, [f"/api/v1/serve/{n}/dev/invocations" for n in picks], body)
    return {"name": name, "models": len(names), "warm_p50": percentile(warm, 50), "warm_p99": percentile(warm, 99),
            "cold_p50": statistics.median(cold), "cold_loads": len(cold), "rss_per_model": grown / len(names),
            "estimate_per_model": statistics.mean(estimates), "loaded": len(runtime.cache._models)}


def tight(caller: Caller, names: list[str], body: bytes, requests: int, rng: Any, megabytes: int) -> dict[str, Any]:
    from django.conf import settings

    from registry.models import ColdLoad
    from registry.serving import runtime

    runtime.cache.clear()
    settings.PORTAL_SERVE_MEMORY_MB = megabytes
    ColdLoad.objects.all().delete()
    evictions = runtime.cache.evictions
    picks = [names[int(i)] for i in rng.integers(len(names), size=requests)]
    every = timed(caller, [f"/api/v1/serve/{n}/dev/invocations" for n in picks], body)
    return {"p50": percentile(every, 50), "p99": percentile(every, 99), "evictions": runtime.cache.evictions - evictions,
            "cold_share": ColdLoad.objects.count() / requests, "loaded": len(runtime.cache._models)}


def endpoint_overhead(caller: Caller, default: str, others: list[str], requests: int) -> tuple[float, float, float]:
    from django.contrib.auth import get_user_model

    from portal.models import Team
    from registry.endpoints import services as endpoints

    user = get_user_model().objects.get(username="bench")
    endpoints.endpoint_create(team=Team.objects.get(slug="bench"), name="front", environment="dev",
                              default_model=default, actor=user, rules=endpoints.rules_from_data([
                                  {"kind": "header_equals", "key": "X-Tenant", "values": ["gold"], "model": others[0]},
                                  {"kind": "share", "percent": 10, "model": others[1]}]))
    fields = endpoints.endpoint_create(team=Team.objects.get(slug="bench"), name="fields", environment="dev",
                                       default_model=default, actor=user, rules=endpoints.rules_from_data([
                                           {"kind": "field_in", "key": "region", "values": ["eu", "uk"],
                                            "model": others[0]}]))
    assert fields.pk
    row = [0.1] * FEATURES
    body = json.dumps({"instances": [row]}).encode()
    named = json.dumps({"dataframe_split": {"columns": [*(f"f{i}" for i in range(FEATURES)), "region"],
                                            "data": [[*row, "us"]]}}).encode()
    from registry.serving.endpoints import _bucket

    key = next(k for k in (f"customer-{i}" for i in range(100)) if _bucket(k) >= 10)  # the default answers it
    direct: list[float] = []
    routed: list[float] = []
    by_field: list[float] = []
    for _ in range(3):  # interleaved, so a load change on the machine falls on all three alike
        direct += timed(caller, [f"/api/v1/serve/{default}/dev/invocations"] * (requests // 3), body)
        routed += timed(caller, ["/api/v1/serve/endpoints/front/dev/invocations"] * (requests // 3), body,
                        X_ROUTING_KEY=key)
        by_field += timed(caller, ["/api/v1/serve/endpoints/fields/dev/invocations"] * (requests // 3), named)
    return percentile(direct, 50), percentile(routed, 50), percentile(by_field, 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=300)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--tight-mb", type=int, default=8, help="the budget of the tight run (0: skip it)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    configure()
    fresh_database()
    import django

    django.setup()
    import numpy as np

    began = time.perf_counter()
    graphs = onnx_models(args.models)
    token, names = deploy(graphs)
    print(f"{args.models} models converted and deployed in {time.perf_counter() - began:.1f} s", flush=True)
    caller = Caller(token)
    body = json.dumps({"instances": [[0.1] * FEATURES]}).encode()
    rng = np.random.default_rng(38)
    one = figures("one model", caller, names[:1], body, args.requests, rng)
    many = figures(f"{args.models} models", caller, names, body, args.requests, rng)
    print()
    print(f"{'':<22}{'warm p50':>10}{'warm p99':>10}{'cold p50':>10}{'RSS/model':>11}{'estimate':>10}")
    for row in (one, many):
        print(f"{row['name']:<22}{row['warm_p50'] * 1000:>8.2f}ms{row['warm_p99'] * 1000:>8.2f}ms"
              f"{row['cold_p50'] * 1000:>8.2f}ms{row['rss_per_model'] / 1024:>8.0f} KB"
              f"{row['estimate_per_model'] / 1024:>7.0f} KB")
    print(f"ratios, {args.models} models / one: warm p50 {many['warm_p50'] / one['warm_p50']:.2f}, warm p99 "
          f"{many['warm_p99'] / one['warm_p99']:.2f}, cold p50 {many['cold_p50'] / one['cold_p50']:.2f}")
    if args.tight_mb:
        t = tight(caller, names, body, args.requests, rng, args.tight_mb)
        print(f"budget {args.tight_mb} MB, {args.models} models: p50 {t['p50'] * 1000:.2f} ms, p99 "
              f"{t['p99'] * 1000:.2f} ms, {t['evictions']} evictions, {t['cold_share']:.0%} of requests waited for a "
              f"cold load, {t['loaded']} forms loaded at the end")
    from django.conf import settings

    settings.PORTAL_SERVE_MEMORY_MB = 1 << 20
    direct, routed, by_field = endpoint_overhead(caller, names[0], names[1:3], min(args.requests, 3000))
    print(f"endpoint routing, 1-row requests: model route p50 {direct * 1000:.3f} ms, endpoint (header and share "
          f"rules) {routed * 1000:.3f} ms ({routed / direct:.2f}x), endpoint (a field rule) {by_field * 1000:.3f} ms "
          f"({by_field / direct:.2f}x)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
