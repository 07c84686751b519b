"""gunicorn's threaded worker, with one change: a thread that has answered a keep-alive request answers that
connection's next request itself when it arrives within ``LINGER_SECONDS``, instead of handing the socket back to
the main thread's poller and the next request to another pool thread. A connection whose next request did not come
within the linger goes back to the poller and is not lingered on for its next 1, 2, 4 ... 64 requests (reset by a
request that does come in time): on a loaded machine, where clients are slow to send again, lingering would add
its wait to every request instead of saving two hand-offs.

Why: with gthread each request on a kept-alive connection costs two hand-offs between threads (the main thread
wakes on the readable socket and submits it to the pool; the pool thread wakes, answers, and registers the socket
with the poller again), each a wake-up and a GIL transfer. On the scoring path, where the model itself takes tens
of microseconds, those hand-offs were most of what the threaded worker cost against a sync worker at 8 connections
(``bench/serving.py``). Threads are kept, so a request waiting on a slow model host still holds one thread, not
the worker. A thread lingers at most ``LINGER_SECONDS`` on a quiet connection and answers at most
``MAX_INLINE_REQUESTS`` in a row, so a busy connection cannot keep a thread from the others for long.
"""

from __future__ import annotations

import select
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

LINGER_SECONDS = 0.002
MAX_INLINE_REQUESTS = 64
MAX_SKIP = 64


class LingeringThreadWorker(ThreadWorker):  # type: ignore[misc]
    def handle(self, conn: Any) -> tuple[bool, Any]:
        for _ in range(MAX_INLINE_REQUESTS):
            keepalive, conn = super().handle(conn)
            if not keepalive or not self.alive:
                return keepalive, conn
            left = getattr(conn, "linger_skip_left", 0)
            if left:
                conn.linger_skip_left = left - 1
                return keepalive, conn
            try:
                ready, _, _ = select.select([conn.sock], [], [], LINGER_SECONDS)
            except (OSError, ValueError):  # closed under us: the poller path closes it as before
                return keepalive, conn
            if not ready:
                conn.linger_skip = conn.linger_skip_left = min(MAX_SKIP, max(1, 2 * getattr(conn, "linger_skip", 0)))
                return keepalive, conn
            conn.linger_skip = 0
        return True, conn
