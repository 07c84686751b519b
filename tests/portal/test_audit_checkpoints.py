"""Signed chain-head checkpoints kept outside the database catch what the chain alone cannot: a cut-off tail, a
chain rebuilt from some event on, and checkpoints removed or forged in the store.

Each attack runs as a database superuser behind the append-only trigger's back (PostgreSQL), as an auditor would
test it; each must be named in the verdict, with what and where, by ``verify_audit``, the API and the page, and the
verdict is itself an audit event.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.core.management import call_command
from django.db import connection
from django.test import Client

from portal.audit.actions import AuditAction
from portal.audit.checkpoints import audit_checkpoint_create, audit_checkpoint_send, checkpoint_name, checkpoint_storage
from portal.audit.record import Target, audit_record, canonical_json, chain_hash
from portal.audit.verify import document_from_row, verify_audit_trail, verify_chain
from portal.models import AuditChainHead, AuditEvent
from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.django_db
VERIFIER = ROOT / "scripts" / "verify_export.py"


def _write(n: int) -> None:
    for i in range(n):
        audit_record(AuditAction.TEAM_CREATE, actor=None, target=Target("team", f"t{i}"), after={"i": i})


def _as_superuser(*statements: tuple[str, list[Any]]) -> None:
    """What a database superuser can do: switch the append-only trigger off, change rows, switch it back on."""
    assert connection.vendor == "postgresql", "the tamper tests need PostgreSQL (CI runs them there)"
    with connection.cursor() as cur:
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cur.execute("ALTER TABLE portal_auditevent DISABLE TRIGGER portal_auditevent_append_only")
        for sql, params in statements:
            cur.execute(sql, params)
        cur.execute("ALTER TABLE portal_auditevent ENABLE TRIGGER portal_auditevent_append_only")


def _reset_head_to_newest() -> None:
    newest = AuditEvent.objects.order_by("-seq").values("seq", "hash").first()
    assert newest is not None
    AuditChainHead.objects.filter(pk=1).update(seq=newest["seq"], hash=newest["hash"])


def _kinds(verdict: Any) -> dict[str, Any]:
    return {f.kind: f for f in verdict.findings}


def _store_path(name: str) -> Path:
    return Path(checkpoint_storage().path(name))


def test_an_untouched_chain_with_checkpoints_verifies_everywhere(personas: dict[str, Any], api_as: Any,
                                                                capsys: Any) -> None:
    _write(3)
    first = audit_checkpoint_create(reason="scheduled")
    _write(4)
    second = audit_checkpoint_create(reason="scheduled")
    assert first is not None and second is not None
    assert (first.number, first.seq, second.number, second.seq) == (1, 3, 2, 8)  # event 4 records checkpoint #1
    assert second.body["previous"] == first.digest and first.body["previous"] == "0" * 64
    stored = json.loads(_store_path(checkpoint_name(2)).read_bytes())
    assert stored["checkpoint"]["head_hash"] == AuditEvent.objects.get(seq=8).hash
    recorded = AuditEvent.objects.filter(action="audit.checkpoint").order_by("seq")
    assert [e.metadata["number"] for e in recorded] == [1, 2] and recorded[1].metadata["sha256"] == second.digest

    verdict = verify_audit_trail()
    assert verdict.ok and verdict.findings == () and verdict.checkpoints == 2
    assert verdict.newest is not None and verdict.newest["number"] == 2

    call_command("verify_audit")
    assert "newest checkpoint #2 at event #8" in capsys.readouterr().out
    body = api_as(personas["compliance"]).get("/api/v1/audit/verify").json()
    assert body["ok"] is True and body["problems"] == [] and body["newest_checkpoint"]["number"] == 2
    page = Client()
    page.force_login(personas["compliance"])
    followed = page.post("/audit/verify", follow=True).content.decode()
    assert "The chain holds" in followed and "checkpoint #2" in followed
    verifications = AuditEvent.objects.filter(action="audit.verify")
    assert verifications.count() == 3 and all(e.outcome == "success" for e in verifications)


def test_an_idle_chain_is_not_checkpointed_again_by_beat() -> None:
    _write(2)
    assert audit_checkpoint_create(reason="scheduled") is not None
    assert audit_checkpoint_create(reason="scheduled") is None, "only the checkpoint's own event since"
    _write(1)
    again = audit_checkpoint_create(reason="scheduled")
    assert again is not None and again.number == 2
    assert audit_checkpoint_create(reason="export") is not None, "an export always checkpoints"


def test_a_cut_off_tail_with_the_head_reset_is_named(personas: dict[str, Any], api_as: Any, capsys: Any) -> None:
    """(a) The issue's attack: the three newest events deleted, the head row set to the new last event."""
    client = api_as(personas["compliance"])
    _write(5 - AuditEvent.objects.count())  # the client's token is event 1
    audit_checkpoint_create(reason="scheduled")  # checkpoint #1 at event 5; event 6 records it
    _write(2)  # events 7, 8
    checkpoint = audit_checkpoint_create(reason="scheduled")  # checkpoint #2 at event 8
    assert checkpoint is not None and checkpoint.seq == 8
    _as_superuser(("DELETE FROM portal_auditevent WHERE seq > %s", [6]))
    _reset_head_to_newest()
    assert verify_chain().ok, "the chain alone cannot see it: this is what the checkpoints are for"

    verdict = verify_audit_trail()
    assert not verdict.ok
    found = _kinds(verdict)
    assert set(found) == {"events_missing", "head_went_backwards"}
    assert found["events_missing"].seq == 7 and found["events_missing"].checkpoint == 2
    assert "events #7–#8 are missing" in found["events_missing"].message
    assert "chain now ends at #6" in found["events_missing"].message
    assert "it says #6" in found["head_went_backwards"].message
    assert verdict.first_bad == 7

    with pytest.raises(SystemExit) as exit_info:
        call_command("verify_audit")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "BROKEN (events_missing): events #7–#8 are missing" in err and "BROKEN (head_went_backwards)" in err
    # The command's own verdict is event #7 now; event #8 is still missing below checkpoint #2.
    body = client.get("/api/v1/audit/verify").json()
    assert body["ok"] is False and body["first_bad"] == 8
    assert {p["kind"] for p in body["problems"]} == {"events_missing", "head_went_backwards"}
    recorded = AuditEvent.objects.filter(action="audit.verify").latest("seq")
    assert recorded.outcome == "failure" and recorded.metadata["source"] == "api"
    assert {p["kind"] for p in recorded.metadata["problems"]} == {"events_missing", "head_went_backwards"}


def test_a_middle_event_deleted_and_the_rest_rechained_is_named_with_where() -> None:
    """(b) Event 5 removed and every event after it renumbered and re-hashed: a chain that holds on its own."""
    _write(2)
    audit_checkpoint_create(reason="scheduled")  # #1 at event 2 (event 3 records it)
    _write(4)  # events 4-7
    audit_checkpoint_create(reason="scheduled")  # #2 at event 7 (event 8 records it)
    _write(2)  # 9, 10
    _as_superuser(("DELETE FROM portal_auditevent WHERE seq = %s", [5]))
    rows: list[dict[str, Any]] = [dict(r) for r in AuditEvent.objects.filter(seq__gt=5).order_by("seq").values()]
    prev = AuditEvent.objects.get(seq=4).hash
    statements = []
    for row in rows:
        row["seq"] -= 1
        digest = chain_hash(prev, document_from_row(row))
        statements.append(("UPDATE portal_auditevent SET seq = %s, prev_hash = %s, hash = %s WHERE id = %s",
                           [row["seq"], prev, digest, row["id"]]))
        prev = digest
    _as_superuser(*statements)
    _reset_head_to_newest()
    assert verify_chain().ok and verify_chain().events == 9

    verdict = verify_audit_trail()
    found = _kinds(verdict)
    assert set(found) == {"chain_rewritten"}, verdict.reason
    rewritten = found["chain_rewritten"]
    assert rewritten.checkpoint == 2 and rewritten.seq == 3
    assert "changed between events #3 and #7" in rewritten.message
    assert "after checkpoint #1 (event #2) still agrees" in rewritten.message


def test_a_deleted_checkpoint_file_is_named(capsys: Any) -> None:
    """(c) A checkpoint removed from the store: the middle one leaves a gap, the newest one is missed by the trail."""
    for _ in range(3):
        _write(1)
        audit_checkpoint_create(reason="scheduled")
    _store_path(checkpoint_name(2)).unlink()
    verdict = verify_audit_trail()
    found = _kinds(verdict)
    assert set(found) == {"checkpoint_missing"} and found["checkpoint_missing"].checkpoint == 2
    assert "checkpoint #2 (checkpoints/000000000002.json, recorded in the trail at event #4) is missing" in \
        found["checkpoint_missing"].message

    _store_path(checkpoint_name(3)).unlink()
    missing = sorted(f.checkpoint or 0 for f in verify_audit_trail().findings if f.kind == "checkpoint_missing")
    assert missing == [2, 3], "the newest file is missed too: the trail recorded it"
    # The next checkpoint keeps the gap visible instead of taking the deleted numbers again.
    following = audit_checkpoint_create(reason="scheduled")
    assert following is not None and following.number == 4
    with pytest.raises(SystemExit):
        call_command("verify_audit")
    assert "BROKEN (checkpoint_missing): checkpoint #3" in capsys.readouterr().err


def test_a_checkpoint_signed_by_another_key_is_named() -> None:
    """(d) Checkpoint #2 replaced by one claiming a shorter chain, signed with a key of the attacker's."""
    for _ in range(3):
        _write(2)
        audit_checkpoint_create(reason="scheduled")
    path = _store_path(checkpoint_name(2))
    document = json.loads(path.read_bytes())
    body = {**document["checkpoint"], "seq": 1, "head_hash": AuditEvent.objects.get(seq=1).hash}
    forged = Ed25519PrivateKey.generate().sign(canonical_json(body).encode())
    path.write_text(json.dumps({"checkpoint": body, "signature": base64.b64encode(forged).decode()}))

    found = _kinds(verify_audit_trail())
    assert {"checkpoint_bad_signature", "checkpoint_replaced", "checkpoint_broken_link"} == set(found)
    assert found["checkpoint_bad_signature"].checkpoint == 2
    assert "checkpoint #2 (checkpoints/000000000002.json) is not signed by the audit signing key" in \
        found["checkpoint_bad_signature"].message
    assert "differs from the one the trail recorded at event #" in found["checkpoint_replaced"].message


def test_beat_writes_checkpoints_and_its_daily_check_names_what_they_show() -> None:
    from portal.tasks import audit_chain_verify_task, audit_checkpoint_task

    _write(4)
    written = audit_checkpoint_task()
    assert written is not None and written["number"] == 1 and written["seq"] == 4
    assert audit_checkpoint_task() is None, "nothing new since"
    assert audit_chain_verify_task()["ok"] is True
    _as_superuser(("DELETE FROM portal_auditevent WHERE seq > %s", [2]))
    _reset_head_to_newest()
    verdict = audit_chain_verify_task()
    assert verdict["ok"] is False
    assert {p["kind"] for p in verdict["problems"]} == {"events_missing", "head_went_backwards"}
    recorded = AuditEvent.objects.filter(action="audit.verify").latest("seq")
    assert recorded.outcome == "failure" and recorded.metadata["source"] == "beat"


def test_an_unreachable_store_fails_the_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    from portal.audit import checkpoints as audit_checkpoints

    _write(1)

    def down() -> Any:
        raise ConnectionError("S3 is down")

    monkeypatch.setattr(audit_checkpoints, "load_checkpoints", down)
    verdict = verify_audit_trail()
    assert not verdict.ok and [f.kind for f in verdict.findings] == ["store_unreachable"]
    assert "S3 is down" in verdict.reason


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_checkpoints_go_to_the_compliance_webhook_signed(settings: Any, monkeypatch: pytest.MonkeyPatch,
                                                          django_capture_on_commit_callbacks: Any) -> None:
    """The compliance team's receiver (a local stand-in for the outside world) gets each checkpoint as stored."""
    from portal import tasks
    from portal.webhooks import sign

    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.received.clear()
    settings.PORTAL_AUDIT_CHECKPOINT_WEBHOOK_URL = f"http://127.0.0.1:{server.server_address[1]}/checkpoints"
    settings.PORTAL_AUDIT_CHECKPOINT_WEBHOOK_SECRET = "compliance-shared-secret"
    queued: list[str] = []
    monkeypatch.setattr(tasks.audit_checkpoint_send_task, "delay", queued.append)
    try:
        _write(1)
        with django_capture_on_commit_callbacks(execute=True):
            checkpoint = audit_checkpoint_create(reason="scheduled")
        assert checkpoint is not None and queued == [checkpoint.name]
        assert audit_checkpoint_send(name=checkpoint.name) == 204
    finally:
        server.shutdown()
    headers, body = _Receiver.received[0]
    assert body == _store_path(checkpoint.name).read_bytes()
    assert json.loads(body)["checkpoint"]["number"] == 1 and headers["X-Portal-Event"] == "audit.checkpoint"
    assert headers["X-Portal-Signature"] == sign("compliance-shared-secret", headers["X-Portal-Timestamp"], body)


# --- Exports and the offline verifier ----------------------------------------------------------------------------

def _verify(export: Path, key: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(VERIFIER), str(export), "--public-key", str(key), *extra], cwd="/",
                          env=clean_env(), capture_output=True, text=True, timeout=120)


def _export(client: Any, path: Path) -> dict[str, Any]:
    response = client.get("/api/v1/audit/export", {"format": "jsonl"})
    assert response.status_code == 200
    path.write_bytes(b"".join(response.streaming_content))
    with zipfile.ZipFile(path) as archive:
        return dict(json.loads(archive.read("manifest.json")))


def test_an_export_checkpoints_and_the_verifier_tells_complete_from_cut_off(
        transactional_db: None, personas: dict[str, Any], api_as: Any, tmp_path: Path,
        private_checkpoint_store: Path) -> None:
    client = api_as(personas["compliance"])
    key = tmp_path / "key.pem"
    key.write_bytes(client.get("/api/v1/audit/public-key").content)
    _write(6)
    manifest = _export(client, tmp_path / "first.zip")
    export_event = AuditEvent.objects.get(action="audit.export")
    assert manifest["checkpoint"]["seq"] == export_event.seq, "the checkpoint covers the export's own event"
    assert manifest["chain_head"]["seq"] == export_event.seq + 1, "and the export holds the checkpoint's event"
    folder = private_checkpoint_store / "checkpoints"

    result = _verify(tmp_path / "first.zip", key, "--checkpoints", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reaches the newest checkpoint before it (#1" in result.stdout

    # The tail is cut off behind the triggers' back and the head reset; a later export verifies on its own...
    _as_superuser(("DELETE FROM portal_auditevent WHERE seq > %s", [3]))
    _reset_head_to_newest()
    _export(client, tmp_path / "second.zip")
    assert _verify(tmp_path / "second.zip", key).returncode == 0
    # ...but not against the checkpoints: the trail went backwards between the two exports' checkpoints.
    result = _verify(tmp_path / "second.zip", key, "--checkpoints", str(folder))
    assert result.returncode == 1 and "INVALID: the trail went backwards between checkpoint #1" in result.stdout

    # The second export's own checkpoint left out of the folder (deleted from the store): said so.
    only_first = tmp_path / "only-first"
    only_first.mkdir()
    (only_first / "000000000001.json").write_bytes((folder / "000000000001.json").read_bytes())
    result = _verify(tmp_path / "second.zip", key, "--checkpoints", str(only_first))
    assert result.returncode == 1 and "checkpoint #2, written at this export, is not among" in result.stdout

    other = tmp_path / "forged"
    other.mkdir()
    forged = json.loads((only_first / "000000000001.json").read_bytes())
    forged["signature"] = base64.b64encode(Ed25519PrivateKey.generate().sign(
        canonical_json(forged["checkpoint"]).encode())).decode()
    (other / "000000000001.json").write_text(json.dumps(forged))
    result = _verify(tmp_path / "first.zip", key, "--checkpoints", str(other))
    assert result.returncode == 1 and "checkpoint #1 (000000000001.json) is not signed by this public key" in \
        result.stdout


def test_the_verifier_says_when_an_export_stops_short_of_a_checkpoint(
        personas: dict[str, Any], api_as: Any, tmp_path: Path, private_checkpoint_store: Path) -> None:
    client = api_as(personas["compliance"])
    key = tmp_path / "key.pem"
    key.write_bytes(client.get("/api/v1/audit/public-key").content)
    _write(3)
    manifest = _export(client, tmp_path / "export.zip")
    folder = private_checkpoint_store / "checkpoints"
    # A checkpoint written (by beat) before the export, further along than the export reaches: the export was made
    # from a trail whose newest events had gone.
    body = json.loads((folder / "000000000001.json").read_bytes())["checkpoint"]
    later = {**body, "number": 0, "seq": manifest["chain_head"]["seq"] + 5, "time": "2000-01-01T00:00:00.000000Z"}
    assert later["seq"] > manifest["chain_head"]["seq"]
    from portal.audit.signing import signing_key

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "a.json").write_text(json.dumps({"checkpoint": later, "signature": base64.b64encode(
        signing_key().sign(canonical_json(later).encode())).decode()}))
    manifest_without = dict(manifest, checkpoint=None)
    from importlib import util

    spec = util.spec_from_file_location("verify_export", VERIFIER)
    assert spec is not None and spec.loader is not None
    verifier = util.module_from_spec(spec)
    spec.loader.exec_module(verifier)
    checkpoints = verifier.load_checkpoints(str(alone), key.read_bytes())
    with pytest.raises(verifier.Invalid, match=r"INCOMPLETE: the export reaches event #\d+, but checkpoint #0"):
        verifier.check_against_checkpoints(manifest_without, {}, checkpoints)


def _corrupt_member(source: Path, dest: Path, member: str) -> Path:
    """The ZIP with the start of one member's compressed data overwritten: an invalid deflate block."""
    raw = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = archive.getinfo(member)
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start:start + 8] = b"\xff" * 8
    dest.write_bytes(bytes(raw))
    return dest


@pytest.mark.parametrize("member", ["audit-events.jsonl", "manifest.json"])
def test_a_zip_corrupted_inside_a_compressed_member_is_invalid_not_a_traceback(
        personas: dict[str, Any], api_as: Any, tmp_path: Path, member: str) -> None:
    client = api_as(personas["compliance"])
    key = tmp_path / "key.pem"
    key.write_bytes(client.get("/api/v1/audit/public-key").content)
    _write(20)
    _export(client, tmp_path / "export.zip")
    corrupt = _corrupt_member(tmp_path / "export.zip", tmp_path / "corrupt.zip", member)
    with zipfile.ZipFile(corrupt) as archive, pytest.raises(zlib.error):
        archive.read(member)  # what the verifier used to die of
    result = _verify(corrupt, key)
    assert result.returncode == 1 and result.stdout.startswith("INVALID: "), result.stdout + result.stderr
    assert "zlib.error: Error -3 while decompressing data: invalid block type" in result.stdout
    assert "Traceback" not in result.stderr
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes((tmp_path / "export.zip").read_bytes()[:-40])
    result = _verify(truncated, key)
    assert result.returncode == 1 and result.stdout.startswith("INVALID: ") and not result.stderr


def test_the_public_key_and_an_unrelated_file_in_the_folder_are_refused(personas: dict[str, Any], api_as: Any,
                                                                       tmp_path: Path) -> None:
    client = api_as(personas["compliance"])
    key = tmp_path / "key.pem"
    key.write_bytes(client.get("/api/v1/audit/public-key").content)
    _write(1)
    _export(client, tmp_path / "export.zip")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _verify(tmp_path / "export.zip", key, "--checkpoints", str(empty))
    assert result.returncode == 1 and "no checkpoint files" in result.stdout
    (empty / "junk.json").write_text("{not json")
    result = _verify(tmp_path / "export.zip", key, "--checkpoints", str(empty))
    assert result.returncode == 1 and "junk.json is not readable" in result.stdout
    assert _verify(tmp_path / "export.zip", key, "--checkpoints", str(tmp_path / "nope")).returncode == 2


def test_checkpoint_files_are_signed_with_the_export_key() -> None:
    from portal.audit.signing import public_key_pem

    _write(1)
    checkpoint = audit_checkpoint_create(reason="scheduled")
    assert checkpoint is not None
    public = serialization.load_pem_public_key(public_key_pem().encode())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(base64.b64decode(checkpoint.signature), canonical_json(checkpoint.body).encode())
