"""Re-encrypt every sensitive value of the prediction log under the first of PORTAL_PAYLOAD_KEYS."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction

from monitoring.sensitive import rotate_payload_keys
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record


class Command(BaseCommand):
    help = "After putting a new key first in PORTAL_PAYLOAD_KEYS: re-encrypt stored sensitive values under it."

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            changed = rotate_payload_keys()
            audit_record(AuditAction.PAYLOAD_KEYS_ROTATE, actor=None,
                         target=Target("prediction_log", "sensitive-columns", "sensitive prediction inputs"),
                         after={"rows_reencrypted": changed})
        self.stdout.write(f"Re-encrypted the sensitive values of {changed} predictions under the first key.")
