"""Schemathesis over our own OpenAPI schema, in process (WSGI), signed in with an admin's token on a world with a
model that has versions, a deployment, a promotion and an alert: no 5xx, and no answer that contradicts the schema
(status code, content type, body).

The examples are derandomised so that CI runs the same cases every time; raise PORTAL_FUZZ_EXAMPLES to dig deeper.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from monitoring.models import Alert
from portal import services as portal_services
from registry.models import ModelVersion
from registry.promotions import services as promotions
from tests.registry.conftest import deploy_now, fresh_serving_cache, two_versions  # noqa: F401 - fixtures

EXAMPLES = int(os.environ.get("PORTAL_FUZZ_EXAMPLES", "25"))


@pytest.fixture(autouse=True)
def keep_the_test_connection(db: None) -> Iterator[None]:
    """As Django's test client does: the WSGI handler must not close the test's connection (and its transaction)
    when a request ends."""
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)
    try:
        yield
    finally:
        for signal in (request_started, request_finished):
            signal.connect(close_old_connections)


@pytest.fixture
def admin_token(two_versions: list[ModelVersion], personas: dict[str, Any]) -> str:  # noqa: F811
    v1 = two_versions[0]
    deploy_now(v1, personas["ds"])
    promotions.promotion_request(version=v1, target="stage", reason="fuzzing", actor=personas["ds"])
    Alert.objects.create(model=v1.model, environment="dev", kind="error_rate", subject="", severity="alert",
                         value=0.5, threshold=0.05, message="error rate 50%")
    return portal_services.token_create(user=personas["admin"], name="fuzz", actor=personas["admin"])[1]


def test_the_api_answers_within_its_schema(admin_token: str) -> None:
    """Every operation of the schema, each with its own generated cases, in one world (made once: it takes seconds).
    The failures of all operations are reported together."""
    from config.wsgi import application  # the real entry point: scoring goes through its lean handler

    api_schema = schemathesis.openapi.from_wsgi("/api/schema/", application)
    headers = {"Authorization": f"Bearer {admin_token}"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures: list[str] = []
    operations, calls = 0, [0]
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def answers_within_the_schema(case: Any) -> None:
            calls[0] += 1
            case.call_and_validate(headers=headers, checks=checks)

        try:
            answers_within_the_schema()
        except Exception as exc:  # every operation's failure is collected and reported together
            failures.append(f"{operation.label}: {exc}")
    assert operations >= 45 and calls[0] >= 5 * operations, (operations, calls)
    assert not failures, "\n\n".join(failures)
