"""Prediction-log ingestion on Redis Streams (issue 24): any number of flushers, each record in the log exactly once
when a flusher is SIGKILLed mid-batch, the old list still drained after an upgrade, and the lag and the MAXLEN alarm
visible on /metrics, the portfolio page, in the log and in the alert rules."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.db.models import Count
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from monitoring import flush
from monitoring.models import PredictionLog
from registry.models import PredictionOutbox
from registry.serving import buffer
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.skipif(not os.environ.get("CELERY_BROKER_URL", "redis://").startswith("redis"),
                                reason="the stream buffer needs Redis")

# A flusher process: the flusher's own entry point in a loop. A victim stops in the middle of its first batch read from
# a stream and says so in its marker file: "before-commit" with the rows copied in an open transaction, "before-ack"
# with the rows committed and the entries not yet acknowledged.
FLUSHER = r"""
import os, pathlib, time
import django
django.setup()
from monitoring import flush
mode, marker, stop = os.environ["FLUSHER_MODE"], pathlib.Path(os.environ["FLUSHER_MARKER"]), pathlib.Path(os.environ["FLUSHER_STOP"])
if mode == "before-commit":
    copy = flush._copy_direct
    def stalled(out):
        copied = copy(out)  # inside write_batches' transaction
        marker.write_text(str(out.getvalue().count("\n")))
        time.sleep(600)
        return copied
    flush._copy_direct = stalled
elif mode == "before-ack":
    def stalled_ack(client, key, ids):
        marker.write_text(str(len(ids)))
        time.sleep(600)
    flush._ack = stalled_ack
while not stop.exists():
    if not flush.flush_predictions():
        time.sleep(0.05)
"""


def _batch(prediction_id: str, i: int) -> dict[str, Any]:
    return {"model": "ingest", "environment": "prod", "version": 1, "role": "champion", "ts": time.time(),
            "latency_ms": 1.0, "request_id": "", "error": "", "ids": [prediction_id], "inputs": [[i, 0.5, 2.0]],
            "outputs": [i % 2], "subjects": None}


def _clear(client: Any) -> None:
    keys = buffer.stream_keys()
    client.delete(flush.FAN_OUT_KEY, *keys, *(flush.flushed_key(k) for k in keys))


def _metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = Client().get("/metrics")
    assert response.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(response.content.decode()) for s in f.samples
            if s.name.startswith("portal_prediction_ingest")}


@pytest.mark.django_db(transaction=True)
def test_a_flusher_killed_mid_batch_loses_and_doubles_nothing(settings: Any, tmp_path: Path) -> None:
    client = buffer.redis_client()
    _clear(client)
    db = settings.DATABASES["default"]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PORTAL_PREDICTION_CLAIM_SECONDS": "1",
           "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
           "FLUSHER_STOP": str(tmp_path / "stop")}
    expected = [f"live{i:027d}" for i in range(5000)]
    for i, prediction_id in enumerate(expected[:3000]):  # the scoring path's own write
        buffer.emit(_batch(prediction_id, i))
    twice = _batch("twice000000000000000000000000", 0)  # its XADD timed out after Redis took it: outbox too
    buffer.emit(twice)
    PredictionOutbox.objects.create(payload=twice)
    expected += ["twice000000000000000000000000"]

    def start(mode: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", FLUSHER], cwd=ROOT, start_new_session=True,
                                env={**env, "FLUSHER_MODE": mode, "FLUSHER_MARKER": str(tmp_path / mode)})

    victims = [start("before-commit"), start("before-ack")]
    processes = list(victims)
    try:
        wait_for(lambda: all((tmp_path / m).exists() for m in ("before-commit", "before-ack")), timeout=60,
                 what="both victims in the middle of a batch")
        in_victims = sum(int((tmp_path / m).read_text()) for m in ("before-commit", "before-ack"))
        assert in_victims >= 2
        processes += [start("healthy"), start("healthy")]
        for i, prediction_id in enumerate(expected[3000:5000], 3000):  # traffic goes on while they flush
            buffer.emit(_batch(prediction_id, i))
        for victim in victims:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=10)
        wait_for(lambda: not flush._waiting_in_redis(client) and not PredictionOutbox.objects.exists(), timeout=90,
                 what="the two healthy flushers to drain the buffer and take over the victims' batches")
    finally:
        (tmp_path / "stop").touch()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    logged = PredictionLog.objects.filter(model_name="ingest")
    assert logged.count() == len(expected) == len(set(expected))
    assert set(logged.values_list("id", flat=True)) == set(expected)
    assert not logged.values("id").annotate(n=Count("id")).filter(n__gt=1).exists()
    pending = sum(client.xpending(k, buffer.STREAM_GROUP)["pending"] for k in buffer.stream_keys())
    assert pending == 0
    metrics = _metrics()
    assert metrics[("portal_prediction_ingest_pending", (("buffer", "stream"),))] == 0
    assert metrics[("portal_prediction_ingest_lost_total", ())] == 0


def test_the_buffer_raises_the_alarm_before_it_trims_and_counts_what_it_trimmed(
        settings: Any, personas: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    settings.PORTAL_PREDICTION_STREAMS = 1
    settings.PORTAL_PREDICTION_BUFFER_MAXLEN = 1000
    settings.PORTAL_PREDICTION_BUFFER_ALARM = 0.5
    client = buffer.redis_client()
    _clear(client)
    for i in range(600):
        buffer.emit(_batch(f"alarm{i:026d}", i))
    caplog.set_level(logging.ERROR, logger="monitoring.ingest")
    from monitoring.ingest import raise_alarms

    raise_alarms(client)
    assert "Prediction buffer alarm" in caplog.text and "60 % of its MAXLEN 1000" in caplog.text
    metrics = _metrics()
    assert metrics[("portal_prediction_ingest_pending", (("buffer", "stream"),))] == 600
    assert metrics[("portal_prediction_ingest_fill_ratio", ())] == 0.6
    assert metrics[("portal_prediction_ingest_oldest_age_seconds", (("buffer", "stream"),))] >= 0
    viewer = Client()
    viewer.force_login(personas["viewer"])
    page = viewer.get("/monitoring/").content.decode()
    assert 'data-testid="ingest-lag" data-state="alert"' in page and '<span data-testid="ingest-pending">600<' in page

    for i in range(600, 1600):  # nothing flushes: XADD's MAXLEN ~ trims the oldest, unwritten
        buffer.emit(_batch(f"alarm{i:026d}", i))
    lost = _metrics()[("portal_prediction_ingest_lost_total", ())]
    assert 0 < lost <= 600
    caplog.clear()
    written = flush.flush_predictions()
    assert written == 1600 - lost and PredictionLog.objects.filter(model_name="ingest").count() == written
    assert f"{lost:.0f} records were trimmed from the streams before a flusher wrote them" in caplog.text
    after = _metrics()
    assert after[("portal_prediction_ingest_pending", (("buffer", "stream"),))] == 0
    assert after[("portal_prediction_ingest_lost_total", ())] == lost
    assert 'data-state="alert"' in viewer.get("/monitoring/").content.decode()  # the loss stays visible
    _clear(client)

    # The alert rules watch exactly these series.
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prediction-ingest-rules.yaml").read_text())
    names = {name for name, _labels in after} | {n.removesuffix("_total") for n, _labels in after}
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert exprs and all(any(n in e for n in names) for e in exprs)
    used = {word for e in exprs for word in e.replace("(", " ").replace(")", " ").replace("[", " ").split()
            if word.startswith("portal_prediction_ingest")}
    assert used <= names, used - names
