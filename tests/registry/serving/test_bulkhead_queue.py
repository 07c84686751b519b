"""The bulkhead's short queue (issue 31): a version whose slots are all taken makes a request wait briefly only
while it is making progress; a version whose slots are held by requests that never finish refuses at once."""

from __future__ import annotations

import threading
import time
from typing import Any

from registry.serving.runtime import LoadedModel


def _loaded(settings: Any, slots: int, queue_ms: int) -> LoadedModel:
    settings.PORTAL_SERVE_IN_FLIGHT_HOSTED = slots
    settings.PORTAL_SERVE_QUEUE_MS = queue_ms
    return LoadedModel(version_number=1, columns=["a"], predict_fn=lambda m, t: m, kind="native")


def test_a_busy_but_healthy_version_queues_the_excess_briefly(settings: Any) -> None:
    loaded = _loaded(settings, slots=2, queue_ms=500)
    assert loaded.enter() and loaded.enter()
    loaded.leave()  # a request finished: the version is making progress
    assert loaded.enter()
    threading.Timer(0.1, loaded.leave).start()  # a slot frees 0.1 s from now
    started = time.monotonic()
    assert loaded.enter(), "a request that finds the slots taken while the model progresses waits for one"
    assert 0.05 < time.monotonic() - started < 0.45
    started = time.monotonic()
    assert not loaded.enter(), "none frees within the queue's bound: refused"
    assert 0.45 < time.monotonic() - started < 1.0


def test_a_version_whose_requests_never_finish_is_refused_at_once(settings: Any) -> None:
    loaded = _loaded(settings, slots=2, queue_ms=500)
    assert loaded.enter() and loaded.enter()  # both held by requests that never come back: no progress at all
    started = time.monotonic()
    assert not loaded.enter()
    assert time.monotonic() - started < 0.05
    loaded.last_exit = time.monotonic() - LoadedModel.PROGRESS_SECONDS - 0.01  # last progress is a second old
    started = time.monotonic()
    assert not loaded.enter()
    assert time.monotonic() - started < 0.05


def test_no_queue_when_it_is_switched_off(settings: Any) -> None:
    loaded = _loaded(settings, slots=1, queue_ms=0)
    assert loaded.enter()
    loaded.leave()
    assert loaded.enter()
    started = time.monotonic()
    assert not loaded.enter()
    assert time.monotonic() - started < 0.05
