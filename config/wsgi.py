"""The WSGI entry point. Scoring requests go through the scoring application; everything else through the full stack.

``/api/v1/serve/<model>/<env>/invocations`` (and an endpoint's ``/api/v1/serve/endpoints/<name>/<env>/invocations``)
uses none of sessions, authentication middleware, messages, CSRF or
lockouts (it authenticates bearer tokens itself). It is answered by ``registry.serving.wsgi.ScoringApplication``,
which calls the scoring view's ``score`` without Django's request handler. What that application does not take (a
query string, a redirect to HTTPS...) goes to a second Django handler built with only the request-id, security and
security-header middleware.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from django.core.handlers.wsgi import WSGIHandler
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
_full = get_wsgi_application()  # sets Django up before the scoring application's imports

from registry.serving.wsgi import SCORING_PATH, ScoringApplication  # noqa: E402 - needs Django set up

LEAN_MIDDLEWARE = [
    "portal.middleware.RequestContextMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "portal.middleware.SecurityHeadersMiddleware",
]


class LeanHandler(WSGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        from django.conf import settings

        # Built once, at import time in each worker, before any request thread exists.
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = LEAN_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full


_lean = LeanHandler()
_scoring = ScoringApplication(fallback=_lean)


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if SCORING_PATH.match(environ.get("PATH_INFO", "")):
        return _scoring(environ, start_response)
    return _full(environ, start_response)
