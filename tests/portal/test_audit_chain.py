"""The audit trail is append-only and hash-chained; tampering and concurrent writers are caught or prevented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction

from portal.audit.actions import AuditAction
from portal.audit.record import GENESIS_HASH, Target, audit_record, chain_hash
from portal.audit.verify import document_from_row, verify_chain
from portal.models import AppendOnlyError, AuditChainHead, AuditEvent

ROOT = Path(__file__).resolve().parents[2]


def _write(n: int, **kwargs: Any) -> list[AuditEvent]:
    return [audit_record(AuditAction.TEAM_CREATE, actor=None, target=Target("team", str(i)),
                         after={"i": i, "float": 0.1 * i, "text": "naïve ✓"}, **kwargs) for i in range(n)]


def _behind_the_triggers_back(sql: str) -> None:
    """What an attacker with table-owner rights could do: switch the trigger off, change rows, switch it back on."""
    with connection.cursor() as cur:
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cur.execute("ALTER TABLE portal_auditevent DISABLE TRIGGER portal_auditevent_append_only")
        cur.execute(sql)
        cur.execute("ALTER TABLE portal_auditevent ENABLE TRIGGER portal_auditevent_append_only")


@pytest.mark.django_db
def test_each_event_links_to_the_previous_and_hashes_its_canonical_document() -> None:
    events = _write(3)
    assert [e.seq for e in events] == [1, 2, 3]
    assert events[0].prev_hash == GENESIS_HASH
    assert events[1].prev_hash == events[0].hash and events[2].prev_hash == events[1].hash
    row = AuditEvent.objects.filter(seq=2).values().get()
    assert chain_hash(row["prev_hash"], document_from_row(row)) == row["hash"]
    head = AuditChainHead.objects.get(pk=1)
    assert (head.seq, head.hash) == (3, events[2].hash)
    assert verify_chain().ok


@pytest.mark.django_db
def test_the_model_refuses_updates_and_deletes() -> None:
    (event,) = _write(1)
    event.action = "forged"
    with pytest.raises(AppendOnlyError):
        event.save()
    with pytest.raises(AppendOnlyError):
        event.delete()
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.filter(pk=event.pk).update(action="forged")
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.all().delete()


@pytest.mark.django_db
def test_the_database_refuses_raw_updates_and_deletes() -> None:
    (event,) = _write(1)
    for sql in ("UPDATE portal_auditevent SET action = 'forged' WHERE id = %s",
                "DELETE FROM portal_auditevent WHERE id = %s"):
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cur:
            cur.execute(sql, [event.pk])
    assert AuditEvent.objects.get(pk=event.pk).action == "team.create"


@pytest.mark.django_db
def test_deleting_a_user_keeps_their_events_and_the_chain(make_user: Any) -> None:
    user = make_user("leaver", None)
    audit_record(AuditAction.AUTH_LOGIN, actor=user)
    user.delete()
    event = AuditEvent.objects.get(action="auth.login")
    assert event.actor_id is None and event.actor_username == "leaver"
    assert verify_chain().ok


@pytest.mark.django_db
def test_a_row_changed_behind_the_triggers_back_is_named_by_verify_audit(capsys: Any) -> None:
    _write(5)
    assert connection.vendor == "postgresql", "the tamper test needs PostgreSQL (CI runs it there)"
    _behind_the_triggers_back("UPDATE portal_auditevent SET after = '{\"i\": 99}' WHERE seq = 3")
    verdict = verify_chain()
    assert (verdict.ok, verdict.first_bad, verdict.events) == (False, 3, 2)
    with pytest.raises(SystemExit) as exit_info:
        call_command("verify_audit")
    assert exit_info.value.code == 1
    assert "event #3" in capsys.readouterr().err


@pytest.mark.django_db
def test_removing_the_newest_events_is_caught_by_the_head_row() -> None:
    _write(4)
    _behind_the_triggers_back("DELETE FROM portal_auditevent WHERE seq = 4")
    verdict = verify_chain()
    assert not verdict.ok and verdict.first_bad == 4


@pytest.mark.django_db
def test_a_removed_event_in_the_middle_is_caught() -> None:
    _write(4)
    _behind_the_triggers_back("DELETE FROM portal_auditevent WHERE seq = 2")
    verdict = verify_chain()
    assert not verdict.ok and verdict.first_bad == 3


@pytest.mark.django_db
def test_an_event_rolled_back_with_its_change_leaves_no_trace() -> None:
    _write(1)
    with pytest.raises(RuntimeError), transaction.atomic():
        audit_record(AuditAction.TEAM_CREATE, actor=None)
        raise RuntimeError("the change failed")
    assert AuditEvent.objects.count() == 1
    _write(1)
    assert verify_chain().ok and AuditChainHead.objects.get(pk=1).seq == 2


WRITER = """
import os, sys, django
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
django.setup()
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from django.db import transaction
for i in range(int(sys.argv[2])):
    with transaction.atomic():
        audit_record(AuditAction.TEAM_CREATE, actor=None, target=Target("team", f"{sys.argv[1]}-{i}"))
"""


@pytest.mark.django_db(transaction=True)
def test_concurrent_writer_processes_leave_one_unbroken_chain() -> None:
    assert connection.vendor == "postgresql"
    db = settings.DATABASES["default"]
    url = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    env = {**os.environ, "DATABASE_URL": url}
    writers, per_writer = 6, 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, f"w{n}", str(per_writer)], cwd=ROOT, env=env)
             for n in range(writers)]
    assert [p.wait(timeout=120) for p in procs] == [0] * writers
    verdict = verify_chain()
    assert verdict.ok, verdict
    assert verdict.events == writers * per_writer
    per_writer_counts = {f"w{n}": AuditEvent.objects.filter(target_id__startswith=f"w{n}-").count()
                         for n in range(writers)}
    assert set(per_writer_counts.values()) == {per_writer}


def test_the_fast_verifier_agrees_on_values_orjson_writes_differently(db: None) -> None:
    """Floats in exponent form, control characters and huge integers: orjson's bytes differ from the canonical
    json.dumps, so the PostgreSQL fast path must fall back to the standard recomputation, not cry tampering."""
    from portal.audit.actions import AuditAction
    from portal.audit.record import audit_record
    from portal.audit.verify import _rows, verify_chain

    audit_record(AuditAction.AUDIT_VERIFY, actor=None, metadata={"tiny": 1e-05, "huge": 1e16, "big": 2**70,
                                                                 "ctl": "a\x01b\x7f", "uni": "é\u2028✓"})
    audit_record(AuditAction.AUDIT_VERIFY, actor=None, after={"nested": [{"z": 1.5, "a": None}]})
    fast, slow = verify_chain(), verify_chain(_rows())
    assert fast.ok and slow.ok and fast.head == slow.head and fast.events == slow.events == 2
