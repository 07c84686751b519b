"""The scoring routes (a model's, and an endpoint's in front of several) as a WSGI application of their own, without
Django's request handler.

Django's handler costs a scoring request more than its model does: the middleware chain, URL resolving, the
response object's header bookkeeping. This application does only what that path needs, with the same parts: a
``WSGIRequest`` (so ``ALLOWED_HOSTS``, the body size limit and the proxy's scheme are Django's own checks), the
request id and client context, the scoring view's ``score``, and the security headers that the lean handler's
middleware would add, read off that middleware once. Database connections are looked after by the same
``request_started`` / ``request_finished`` signals Django sends. Exceptions go through Django's own
``response_for_exception`` (the contract's JSON 400/500, logged, ``got_request_exception`` sent).

Anything unusual is handed to ``fallback`` (the lean Django handler) before a byte of the body is read: a query
string, a NUL in the path, or a plain-HTTP request that ``SECURE_SSL_REDIRECT`` must redirect.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from django.conf import settings
from django.core import signals
from django.core.handlers.exception import response_for_exception
from django.core.handlers.wsgi import WSGIRequest
from django.http import HttpRequest, HttpResponse
from django.middleware.security import SecurityMiddleware
from django.utils.log import log_response

from portal import context
from portal.middleware import add_security_headers, request_context
from registry.serving import endpoints, views

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
SCORING_PATH = re.compile(r"^/api/v1/serve/(?:(endpoints)/)?([^/]+)/([^/]+)/invocations$")
STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}


def security_headers(secure: bool) -> tuple[tuple[str, str], ...]:
    """What ``SecurityMiddleware`` and ``SecurityHeadersMiddleware`` put on an API answer (read once, when the
    application is built, as that middleware reads its settings)."""
    request = HttpRequest()
    request.path = "/api/v1/serve/"
    request.is_secure = lambda: secure  # type: ignore[method-assign]
    response = HttpResponse(content_type="application/json")
    SecurityMiddleware(lambda _request: response).process_response(request, response)
    add_security_headers(request, response)
    return tuple((key, value) for key, value in response.items() if key != "Content-Type")


class ScoringApplication:
    def __init__(self, fallback: WSGIApp) -> None:
        self.fallback = fallback
        self.redirect_to_https = settings.SECURE_SSL_REDIRECT
        self.headers = {secure: security_headers(secure) for secure in (False, True)}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = WSGIRequest(environ)
        match = SCORING_PATH.match(request.path_info)
        if (match is None or environ.get("QUERY_STRING") or "\x00" in request.path_info
                or (self.redirect_to_https and not request.is_secure())):
            return self.fallback(environ, start_response)
        signals.request_started.send(sender=self.__class__, environ=environ)
        try:
            ctx = request_context(request)
            with context.bound(ctx):
                try:
                    endpoint, name, env = match.groups()
                    answer = (endpoints.score if endpoint else views.score)(request, name, env)
                except Exception as exc:  # what Django's handler does with it: logged, signalled, handler400/500
                    return self._send(start_response, request, ctx, response_for_exception(request, exc))
                if answer.status >= 400:
                    response = answer.as_response()
                    log_response("%s: %s", response.reason_phrase, request.path, response=response, request=request)
                    return self._send(start_response, request, ctx, response)
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer.body))),
                                      *answer.headers.items(), *self.headers[request.is_secure()],
                                      ("X-Request-ID", ctx.request_id)])
            return [answer.body]
        finally:
            signals.request_finished.send(sender=self.__class__)

    def _send(self, start_response: Callable[..., Any], request: WSGIRequest, ctx: context.RequestContext,
              response: HttpResponse) -> list[bytes]:
        headers = [*response.items(), *((key, value) for key, value in self.headers[request.is_secure()]
                                        if key not in response), ("X-Request-ID", ctx.request_id)]
        body = response.content
        if "Content-Length" not in response:
            headers.append(("Content-Length", str(len(body))))
        start_response(STATUS_LINES.get(response.status_code, f"{response.status_code} {response.reason_phrase}"),
                       headers)
        return [body]
