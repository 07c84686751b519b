"""Scoring requests reach the same view through the lean WSGI handler, with the same checks and headers."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

pytestmark = pytest.mark.django_db


def _call(path: str, *, host: str = "localhost", body: bytes = b"{}", auth: str = "") -> tuple[str, dict[str, str], bytes]:
    from portal.wsgi import application

    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "SERVER_NAME": "localhost", "SERVER_PORT": "80",
               "HTTP_HOST": host, "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
               "CONTENT_TYPE": "application/json", "wsgi.url_scheme": "http", "REMOTE_ADDR": "127.0.0.1",
               "wsgi.errors": io.StringIO(), "SCRIPT_NAME": ""}
    if auth:
        environ["HTTP_AUTHORIZATION"] = auth
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        captured["status"], captured["headers"] = status, dict(headers)

    content = b"".join(application(environ, start_response))
    return captured["status"], captured["headers"], content


def test_scoring_goes_through_the_lean_handler_with_ids_and_security_headers() -> None:
    status, headers, content = _call("/api/v1/serve/churn/dev/invocations")
    assert status.startswith("401") and json.loads(content)["error"]["code"] == "not_authenticated"
    assert len(headers["X-Request-ID"]) == 32 and "Content-Security-Policy" in headers
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_the_lean_path_still_refuses_unknown_hosts() -> None:
    status, _headers, content = _call("/api/v1/serve/churn/dev/invocations", host="evil.example")
    assert status.startswith("400") and b"host" in content


def test_other_paths_keep_the_full_stack() -> None:
    status, headers, _content = _call("/api/v1/tokens/")
    assert status.startswith("401") and "Vary" in headers


def test_an_unexpected_failure_on_the_lean_path_answers_the_contracts_json_500(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean handler resolves with its own URL configuration; its error handlers must be the portal's."""
    from registry.serving import views

    def broken(*_args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(views, "_invocations", broken)
    status, headers, content = _call("/api/v1/serve/churn/dev/invocations")
    assert status.startswith("500") and headers["Content-Type"].startswith("application/json")
    assert json.loads(content)["error"]["code"] == "server_error" and b"boom" not in content
