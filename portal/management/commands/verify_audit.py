from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand

from portal.audit.verify import audit_chain_verify


class Command(BaseCommand):
    help = ("Recompute the audit trail's hash chain and compare it with the signed checkpoints kept outside the "
            "database. Exit 0 when both hold, 1 naming each problem (the verdict is itself an audit event).")

    def handle(self, *args: Any, **options: Any) -> None:
        verdict = audit_chain_verify(actor=None, source="manage.py verify_audit")
        newest = verdict.newest
        anchored = (f"; newest checkpoint #{newest['number']} at event #{newest['seq']} ({newest['time']})"
                    if newest else "; no checkpoint yet")
        if verdict.ok:
            self.stdout.write(f"OK: {verdict.events} events, head {verdict.head}{anchored}")
            return
        if not verdict.chain.ok:
            self.stderr.write(f"BROKEN at event #{verdict.chain.first_bad}: {verdict.chain.reason} "
                              f"({verdict.chain.events} events verified before it)")
        for finding in verdict.findings:
            self.stderr.write(f"BROKEN ({finding.kind}): {finding.message}")
        sys.exit(1)
