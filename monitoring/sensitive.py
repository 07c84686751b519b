"""Sensitive input columns (personal or health data, marked on the version): encrypted at rest in the prediction
log, masked for roles without ``view_sensitive``, and every read of raw payloads is an audit event.

The flusher encrypts the marked columns of each row before it is written, off the request path. A value becomes
the string ``"enc:" + Fernet token``; MultiFernet makes key rotation a matter of putting a new key first in
``PORTAL_PAYLOAD_KEYS`` (old rows stay readable; ``rotate_payload_keys`` re-encrypts them under the new key).
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

from monitoring.models import PredictionLog
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.permissions import has_capability, require_capability
from registry.models import ModelVersion

PREFIX = "enc:"
MASK = "•••"


@functools.lru_cache(maxsize=4)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(k.encode()) for k in keys])


def fernet() -> MultiFernet:
    return _fernet(tuple(settings.PORTAL_PAYLOAD_KEYS))


def encrypt_value(value: Any) -> str:
    return PREFIX + fernet().encrypt(orjson.dumps(value)).decode()


def decrypt_value(value: Any) -> Any:
    if not (isinstance(value, str) and value.startswith(PREFIX)):
        return value
    try:
        return orjson.loads(fernet().decrypt(value[len(PREFIX):].encode()))
    except InvalidToken:
        return "(cannot be decrypted with the configured keys)"


@functools.lru_cache(maxsize=1024)
def sensitive_positions(model_name: str, version: int) -> tuple[int, ...]:
    """Positions in a logged input row (the signature's order) of the version's sensitive columns."""
    row = ModelVersion.objects.filter(model__name=model_name, number=version).values(
        "signature", "sensitive_columns").first()
    if not row or not row["sensitive_columns"]:
        return ()
    names = [c.get("name") for c in (row["signature"] or {}).get("inputs", []) if isinstance(c, dict)]
    return tuple(i for i, name in enumerate(names) if name in row["sensitive_columns"])


def protect_row(inputs: Any, positions: tuple[int, ...]) -> Any:
    if not positions or not isinstance(inputs, list):
        return inputs
    return [encrypt_value(v) if i in positions else v for i, v in enumerate(inputs)]


def reveal_row(inputs: Any, *, may_see: bool) -> Any:
    if not isinstance(inputs, list):
        return inputs
    return [(decrypt_value(v) if may_see else MASK) if isinstance(v, str) and v.startswith(PREFIX) else v
            for v in inputs]


def rotate_payload_keys(batch: int = 2000) -> int:
    """Re-encrypt every sensitive value under the first key; returns how many rows changed."""
    changed = 0
    qs = PredictionLog.objects.filter(inputs__isnull=False).only("id", "inputs").order_by("pk")
    for row in qs.iterator(chunk_size=batch):
        if not isinstance(row.inputs, list):
            continue
        new = [PREFIX + fernet().rotate(v[len(PREFIX):].encode()).decode()
               if isinstance(v, str) and v.startswith(PREFIX) else v for v in row.inputs]
        if new != row.inputs:
            PredictionLog.objects.filter(pk=row.pk).update(inputs=new)
            changed += 1
    return changed


def recent_predictions(*, model: Any, environment: str, actor: Any, limit: int = 50) -> dict[str, Any]:
    """The latest logged predictions with their inputs by column name, sensitive values masked unless ``actor``
    may see them. Reading raw payloads is an audit event (HIPAA's "who looked at what")."""
    from django.db import transaction


    require_capability(actor, "view_monitoring")
    may_see = has_capability(actor, "view_sensitive")
    rows = list(PredictionLog.objects.filter(model_name=model.name, environment=environment).order_by(
        "-created_at")[:limit])
    signatures = {v.number: ([c.get("name") for c in (v.signature or {}).get("inputs", []) if isinstance(c, dict)],
                             v.sensitive_columns or {})
                  for v in ModelVersion.objects.filter(model=model, number__in={r.version for r in rows})}
    items = []
    masked = 0
    for r in rows:
        names, sensitive = signatures.get(r.version, ([], {}))
        values = reveal_row(r.inputs, may_see=may_see)
        masked += sum(1 for v in values or [] if v == MASK)
        items.append({"id": r.id, "at": r.created_at, "version": r.version, "role": r.role,
                      "latency_ms": r.latency_ms, "output": r.output, "error": r.error,
                      "subject": r.subject_hash[:12] if r.subject_hash else "",
                      "inputs": None if values is None else [
                          {"name": names[i] if i < len(names) else str(i), "value": v,
                           "sensitive": sensitive.get(names[i]) if i < len(names) else None}
                          for i, v in enumerate(values)]})
    with transaction.atomic():
        audit_record(AuditAction.PREDICTION_PAYLOAD_VIEW, actor=actor,
                     target=Target("environment", f"{model.name}/{environment}", f"{model.name} {environment}",
                                   model.team.slug),
                     metadata={"rows": len(items), "sensitive_values_shown": may_see,
                               "masked_values": masked,
                               "ids": [items[0]["id"], items[-1]["id"]] if items else []})
    return {"predictions": items, "masked": not may_see}
