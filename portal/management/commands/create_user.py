"""Create a user with roles and teams from the command line: the first administrator of a new installation (where
there is nobody yet to do it in the browser), or an account from a provisioning script.

    python manage.py create_user alice --role admin --team platform
    docker compose exec web python manage.py create_user alice --role admin --team platform

The password is asked twice on a terminal, or read from standard input with ``--password-stdin`` (never from the
command line, where it would land in the shell's history and the process list). Every change is audited, with no
actor (the command line), like the other management commands.
"""

from __future__ import annotations

import getpass
import sys
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from portal import services
from portal.models import Team
from portal.roles import ROLES, sync_roles


class Command(BaseCommand):
    help = "Create a user with the given roles, a member of the given teams (created when missing)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--email", default="")
        parser.add_argument("--role", action="append", default=[], choices=sorted(ROLES),
                            help="a role (repeat for several)")
        parser.add_argument("--team", action="append", default=[],
                            help="a team slug the user joins (repeat for several); a missing team is created")
        parser.add_argument("--password-stdin", action="store_true",
                            help="read the password from the first line of standard input")

    def handle(self, *args: Any, username: str, email: str, role: list[str], team: list[str],
               password_stdin: bool, **options: Any) -> None:
        if not role:
            raise CommandError(f"Give at least one --role ({', '.join(sorted(ROLES))}).")
        password = self._password(password_stdin)
        sync_roles()
        try:
            with transaction.atomic():
                user = services.user_create(username=username, password=password, email=email, actor=None)
                services.user_set_roles(user=user, roles=role, actor=None)
                for slug in team:
                    found = Team.objects.filter(slug=slug).first() or services.team_create(
                        slug=slug, name=slug.replace("-", " ").title(), actor=None)
                    services.membership_add(team=found, user=user, actor=None)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        teams = f", member of {', '.join(team)}" if team else ""
        self.stdout.write(f"Created {username} ({', '.join(role)}{teams}).")

    @staticmethod
    def _password(from_stdin: bool) -> str:
        if from_stdin:
            password = sys.stdin.readline().rstrip("\n")
        elif sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Password (again): ") != password:
                raise CommandError("The two passwords differ.")
        else:
            raise CommandError("No terminal to ask the password on: pass it on standard input with --password-stdin.")
        if not password:
            raise CommandError("The password is empty.")
        return password
