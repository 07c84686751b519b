"""Scoring requests through the production entry point: the scoring WSGI application and, for what it hands on, the
lean Django handler, with the same checks and headers."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from tests.conftest import assert_error_shape, call_entry_point

pytestmark = pytest.mark.django_db


def _call(path: str, *, host: str = "localhost", body: bytes = b"{}", auth: str = "", query: str = "",
          request_id: str = "", forwarded_proto: str = "", app: Any = None) -> tuple[str, dict[str, str], bytes]:
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "SERVER_NAME": "localhost", "SERVER_PORT": "80",
               "HTTP_HOST": host, "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
               "CONTENT_TYPE": "application/json", "wsgi.url_scheme": "http", "REMOTE_ADDR": "127.0.0.1",
               "wsgi.errors": io.StringIO(), "SCRIPT_NAME": "", "QUERY_STRING": query}
    for key, value in (("HTTP_AUTHORIZATION", auth), ("HTTP_X_REQUEST_ID", request_id),
                       ("HTTP_X_FORWARDED_PROTO", forwarded_proto)):
        if value:
            environ[key] = value
    status, headers, content = call_entry_point(environ, app)
    return status, dict(headers), content


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
    """An unexpected failure while scoring answers the contract's JSON 500 (the portal's handler500), not an HTML
    page."""
    from registry.serving import views

    def broken(*_args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(views, "_invocations", broken)
    status, headers, content = _call("/api/v1/serve/churn/dev/invocations")
    assert status.startswith("500") and headers["Content-Type"].startswith("application/json")
    assert json.loads(content)["error"]["code"] == "server_error" and b"boom" not in content


def test_the_scoring_application_sends_the_headers_the_lean_handlers_middleware_would() -> None:
    """A query string sends the request to the lean Django handler instead: both answers carry the same headers."""
    fast_status, fast, _ = _call("/api/v1/serve/churn/dev/invocations")
    lean_status, lean, _ = _call("/api/v1/serve/churn/dev/invocations", query="debug=1")
    assert fast_status == lean_status and fast_status.startswith("401")
    volatile = {"X-Request-ID", "Content-Length"}
    assert {k: v for k, v in fast.items() if k not in volatile} == {k: v for k, v in lean.items() if k not in volatile}


def test_a_callers_request_id_is_kept_and_a_bad_one_replaced() -> None:
    _status, headers, _ = _call("/api/v1/serve/churn/dev/invocations", request_id="trace-1234abcd")
    assert headers["X-Request-ID"] == "trace-1234abcd"
    _status, headers, _ = _call("/api/v1/serve/churn/dev/invocations", request_id="<script>")
    assert headers["X-Request-ID"] != "<script>" and len(headers["X-Request-ID"]) == 32


def _rebuilt_entry_point() -> Any:
    """The entry point as a worker starting now builds it: the middleware and the scoring application read the
    security settings once, when built."""
    from config.wsgi import LeanHandler
    from registry.serving.wsgi import ScoringApplication

    return ScoringApplication(fallback=LeanHandler())


def test_plain_http_is_redirected_when_https_is_required(settings: Any) -> None:
    settings.SECURE_SSL_REDIRECT = True
    status, headers, _ = _call("/api/v1/serve/churn/dev/invocations", app=_rebuilt_entry_point())
    assert status.startswith("301") and headers["Location"].startswith("https://localhost/api/v1/serve/")


def test_https_behind_the_proxy_gets_hsts_from_the_scoring_application(settings: Any) -> None:
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 3600
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    status, headers, _ = _call("/api/v1/serve/churn/dev/invocations", forwarded_proto="https",
                               app=_rebuilt_entry_point())
    assert status.startswith("401") and headers["Strict-Transport-Security"].startswith("max-age=3600")


def test_a_body_over_the_limit_is_a_json_400(serving: Any, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = serving.post("/api/v1/serve/churn/dev/invocations", json.dumps({"instances": [[0.5] * 30] * 40}),
                            content_type="application/json")
    assert_error_shape(response, 400, "bad_request")


def test_a_good_request_is_answered_with_its_length_ids_and_headers(serving: Any) -> None:
    from tests.registry.conftest import rows

    columns, data = rows(2)
    response = serving.post("/api/v1/serve/churn/dev/invocations",
                            json.dumps({"dataframe_split": {"columns": columns, "data": data}}),
                            content_type="application/json")
    assert response.status_code == 200 and int(response["Content-Length"]) == len(response.content)
    answer = response.json()
    assert len(answer["predictions"]) == 2 and len(answer["prediction_ids"]) == 2
    assert response["Cache-Control"] == "no-store" and response["X-Content-Type-Options"] == "nosniff"
