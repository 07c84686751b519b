"""Who and what caused the work being done now: one request id from the click to the worker.

The request middleware fills it for a web request; a Celery task restores it from its arguments
(see ``portal.tasks.with_request_context``). The audit trail and the log lines read it from here, so a
service never has to thread it by hand.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")


@dataclass(frozen=True)
class RequestContext:
    request_id: str = ""
    ip: str | None = None
    user_agent: str = ""

    def as_task_kwargs(self) -> dict[str, object]:
        return asdict(self)


_current: ContextVar[RequestContext] = ContextVar(
    "portal_request_context", default=RequestContext()  # noqa: B039 - frozen, so sharing it is safe
)


def current() -> RequestContext:
    return _current.get()


def new_request_id(incoming: str | None = None) -> str:
    """Keep a caller's X-Request-ID when it is a sane token (so proxies can correlate), else mint one."""
    if incoming and _SAFE_REQUEST_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex


@contextlib.contextmanager
def bound(ctx: RequestContext) -> Iterator[RequestContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


class RequestContextLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get().request_id or "-"
        return True
