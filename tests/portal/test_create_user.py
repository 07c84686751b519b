"""``manage.py create_user``: the first administrator of a new installation (compose, Kubernetes), audited, whole or
not at all."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from portal.models import AuditEvent, Team

pytestmark = pytest.mark.django_db


def _create(monkeypatch: pytest.MonkeyPatch, password: str, *args: str) -> str:
    monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
    out = io.StringIO()
    call_command("create_user", *args, "--password-stdin", stdout=out)
    return out.getvalue()


def test_the_first_administrator_is_created_with_roles_and_team_and_audited(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _create(monkeypatch, "a long first password 42", "alice", "--role", "admin", "--role", "approver",
                  "--team", "platform")
    assert "Created alice (admin, approver, member of platform)" in out
    alice = get_user_model().objects.get(username="alice")
    assert alice.check_password("a long first password 42")
    assert sorted(alice.groups.values_list("name", flat=True)) == ["admin", "approver"]
    assert Team.objects.get(slug="platform").memberships.filter(user=alice).exists()
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"user.create", "user.role_change", "team.create", "team.member_add"} <= actions


def test_a_refused_password_leaves_no_user_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CommandError, match=r"too short|too common"):
        _create(monkeypatch, "abc", "bob", "--role", "viewer", "--team", "ops")
    assert not get_user_model().objects.filter(username="bob").exists()
    assert not Team.objects.filter(slug="ops").exists() and not AuditEvent.objects.exists()


def test_no_role_and_no_terminal_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CommandError, match="at least one --role"):
        call_command("create_user", "carol")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(CommandError, match="--password-stdin"):
        call_command("create_user", "carol", "--role", "viewer")
