from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand

from portal.audit import verify_chain


class Command(BaseCommand):
    help = "Recompute the audit trail's hash chain. Exit 0 when it holds, 1 naming the first bad event."

    def handle(self, *args: Any, **options: Any) -> None:
        verdict = verify_chain()
        if verdict.ok:
            self.stdout.write(f"OK: {verdict.events} events, head {verdict.head}")
            return
        self.stderr.write(f"BROKEN at event #{verdict.first_bad}: {verdict.reason} "
                          f"({verdict.events} events verified before it)")
        sys.exit(1)
