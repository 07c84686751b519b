"""The WSGI entry point. Scoring requests go through a lean handler; everything else through the full stack.

``/api/v1/serve/<model>/<env>/invocations`` uses none of sessions, authentication middleware, messages, CSRF or
lockouts (it authenticates bearer tokens itself), so it gets a second Django handler built with only the
request-id, security and security-header middleware, and a URL configuration holding only that route
(``registry.serving.urls``): the same view, less work per request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from django.core.handlers.wsgi import WSGIHandler
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

LEAN_MIDDLEWARE = [
    "portal.middleware.RequestContextMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "portal.middleware.SecurityHeadersMiddleware",
]
SCORING_PATH = re.compile(r"^/api/v1/serve/[^/]+/[^/]+/invocations$")
SCORING_URLCONF = "registry.serving.urls"


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

    def resolve_request(self, request: Any) -> Any:
        request.urlconf = SCORING_URLCONF
        return super().resolve_request(request)


_full = get_wsgi_application()
_lean = LeanHandler()


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if SCORING_PATH.match(environ.get("PATH_INFO", "")):
        return _lean(environ, start_response)
    return _full(environ, start_response)
