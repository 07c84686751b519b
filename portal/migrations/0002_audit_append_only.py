"""The audit trail's genesis head row, and database triggers that refuse UPDATE and DELETE on audit events.

The single exception: clearing ``actor_id`` when the user it points at is deleted (ON DELETE SET NULL), with every
other column unchanged. The hash covers the copied ``actor_username``, not the link.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

PG_INSTALL = """
CREATE OR REPLACE FUNCTION portal_audit_append_only() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'UPDATE' AND OLD.actor_id IS NOT NULL AND NEW.actor_id IS NULL
     AND (to_jsonb(NEW) - 'actor_id') = (to_jsonb(OLD) - 'actor_id') THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION 'audit events are append-only: % of event #% refused', TG_OP, OLD.seq
    USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS portal_auditevent_append_only ON portal_auditevent;
CREATE TRIGGER portal_auditevent_append_only BEFORE UPDATE OR DELETE ON portal_auditevent
  FOR EACH ROW EXECUTE FUNCTION portal_audit_append_only();
"""
PG_REMOVE = """
DROP TRIGGER IF EXISTS portal_auditevent_append_only ON portal_auditevent;
DROP FUNCTION IF EXISTS portal_audit_append_only();
"""


def install(apps: Any, schema_editor: Any) -> None:
    AuditChainHead = apps.get_model("portal", "AuditChainHead")
    AuditChainHead.objects.get_or_create(pk=1, defaults={"seq": 0, "hash": "0" * 64})
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_INSTALL, params=None)
    elif vendor == "sqlite":
        AuditEvent = apps.get_model("portal", "AuditEvent")
        columns = [f.column for f in AuditEvent._meta.concrete_fields if f.column != "actor_id"]
        unchanged = " AND ".join(f'NEW."{c}" IS OLD."{c}"' for c in columns)
        schema_editor.execute(
            "CREATE TRIGGER IF NOT EXISTS portal_auditevent_no_delete BEFORE DELETE ON portal_auditevent "
            "BEGIN SELECT RAISE(ABORT, 'audit events are append-only: DELETE refused'); END;"
        )
        schema_editor.execute(
            "CREATE TRIGGER IF NOT EXISTS portal_auditevent_no_update BEFORE UPDATE ON portal_auditevent "
            f"WHEN NOT (OLD.actor_id IS NOT NULL AND NEW.actor_id IS NULL AND {unchanged}) "
            "BEGIN SELECT RAISE(ABORT, 'audit events are append-only: UPDATE refused'); END;"
        )


def remove(apps: Any, schema_editor: Any) -> None:
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_REMOVE)
    elif vendor == "sqlite":
        schema_editor.execute("DROP TRIGGER IF EXISTS portal_auditevent_no_delete;")
        schema_editor.execute("DROP TRIGGER IF EXISTS portal_auditevent_no_update;")


class Migration(migrations.Migration):
    dependencies = [("portal", "0001_initial")]
    operations = [migrations.RunPython(install, remove)]
