"""seed_demo: the contract's team and users, idempotent, and never by accident on a real deployment."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import override_settings

from portal.audit.verify import verify_chain
from portal.models import AuditEvent, Team

pytestmark = pytest.mark.django_db

EXPECTED = {"ds": "data_scientist", "approver1": "approver", "approver2": "approver",
            "compliance": "compliance_officer", "admin": "admin"}


def test_seed_demo_refuses_when_debug_is_off() -> None:
    with pytest.raises(CommandError, match="--force"):
        call_command("seed_demo")


@override_settings(PORTAL_DEBUG=True, PORTAL_DEMO_PASSWORD="another-demo-pass-1")
def test_seed_demo_creates_the_contracts_users_and_model_once() -> None:
    call_command("seed_demo")
    events_after_first = AuditEvent.objects.count()
    call_command("seed_demo")
    assert AuditEvent.objects.count() == events_after_first, "a second run changes nothing"
    team = Team.objects.get(slug="demo")
    for username, role in EXPECTED.items():
        user = get_user_model().objects.get(username=username)
        assert list(user.groups.values_list("name", flat=True)) == [role]
        assert team.members.filter(pk=user.pk).exists()
        assert user.check_password("another-demo-pass-1")
    assert verify_chain().ok and events_after_first > 0
    from registry.models import RegisteredModel

    model = RegisteredModel.objects.get(name="breast-cancer")
    assert model.team == team
    assert [(v.number, v.status, v.reference is not None) for v in model.versions.order_by("number")] == [
        (1, "ready", True), (2, "ready", True)]
    [promotion] = model.promotions.all()
    assert (promotion.version.number, promotion.target, promotion.status) == (2, "stage", "pending")
    assert promotion.requested_by.username == "ds", [g for g in promotion.gates if g["blocks"]]
    # v2 scores below v1 (the demo keeps that contradiction for approvers to see): the metrics gate, and only
    # it, blocks the request
    assert [g["name"] for g in promotion.gates if g["blocks"]] == ["metrics"], promotion.gates


def test_seed_demo_runs_with_force_even_when_debug_is_off() -> None:
    call_command("seed_demo", "--force", "--users-only")
    assert get_user_model().objects.filter(username="admin", is_staff=True).exists()
