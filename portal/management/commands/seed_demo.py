"""Demo team and users for a first look (idempotent). Refuses to run with DEBUG off unless --force."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from portal import services
from portal.models import Team
from portal.roles import ADMIN, APPROVER, COMPLIANCE_OFFICER, DATA_SCIENTIST

DEMO_USERS: list[tuple[str, str, bool]] = [
    ("ds", DATA_SCIENTIST, False),
    ("approver1", APPROVER, False),
    ("approver2", APPROVER, False),
    ("compliance", COMPLIANCE_OFFICER, False),
    ("admin", ADMIN, True),
]

SEED_HOOKS: list[Any] = []
"""Other apps append callables ``hook(team, users, stdout)`` to seed their own demo data (registry: a model)."""


class Command(BaseCommand):
    help = "Create the demo team and users (and, through hooks, demo models). Safe to run repeatedly."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="Seed even though DEBUG is off.")
        parser.add_argument("--users-only", action="store_true", help="Only the team and users, no demo models.")

    def handle(self, *args: Any, force: bool = False, users_only: bool = False, **options: Any) -> None:
        if not settings.PORTAL_DEBUG and not force:
            raise CommandError("DEBUG is off: this looks like a real deployment. Pass --force to seed demo users anyway.")
        password = settings.PORTAL_DEMO_PASSWORD
        User = get_user_model()
        with transaction.atomic():
            team = Team.objects.filter(slug="demo").first() or services.team_create(
                slug="demo", name="Demo team", description="Created by seed_demo.", actor=None)
            users = {}
            for username, role, is_admin in DEMO_USERS:
                user = User.objects.filter(username=username).first()
                if user is None:
                    user = services.user_create(username=username, password=password, actor=None,
                                                email=f"{username}@example.invalid", validate_password=False)
                if is_admin and not (user.is_staff and user.is_superuser):
                    user.is_staff = user.is_superuser = True
                    user.save(update_fields=["is_staff", "is_superuser"])
                services.user_set_roles(user=user, roles=[role], actor=None)
                services.membership_add(team=team, user=user, actor=None)
                users[username] = user
        for hook in [] if users_only else SEED_HOOKS:
            hook(team=team, users=users, stdout=self.stdout)
        self.stdout.write(self.style.SUCCESS(
            "Demo ready: team 'demo'; users " + ", ".join(u for u, _, _ in DEMO_USERS)
            + " (password from PORTAL_DEMO_PASSWORD)."))
