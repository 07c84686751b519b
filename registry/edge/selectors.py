"""Reads of edge packages and device tokens, always through the user's team scope."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from portal.permissions import get_object_for_user
from registry.models import EdgeDeviceToken, EdgePackage, RegisteredModel

PACKAGE_RELATED = ("model__team", "version", "blob", "requested_by")


def package_list(*, model: RegisteredModel) -> QuerySet[EdgePackage]:
    return EdgePackage.objects.filter(model=model).select_related(*PACKAGE_RELATED).order_by("-created_at")


def package_get(*, user: Any, uid: str, action: str = "view_models") -> EdgePackage:
    return get_object_for_user(user, EdgePackage.objects.select_related(*PACKAGE_RELATED), action=action, uid=uid)


def token_list(*, model: RegisteredModel) -> QuerySet[EdgeDeviceToken]:
    return EdgeDeviceToken.objects.filter(model=model).select_related("model__team", "created_by")


def token_get(*, user: Any, uid: str, action: str = "view_models") -> EdgeDeviceToken:
    return get_object_for_user(user, EdgeDeviceToken.objects.select_related("model__team", "created_by"),
                               action=action, uid=uid)


def package_data(package: EdgePackage) -> dict[str, Any]:
    """What the API and the page's live view show of a package."""
    return {
        "id": str(package.uid), "model": package.model.name, "version": package.version.number,
        "status": package.status, "progress": package.progress, "log": package.log, "error": package.error,
        "int8_requested": package.int8_requested, "forms": package.forms, "int8_note": package.int8_note,
        "sha256": package.blob.sha256 if package.blob_id and package.blob else None,
        "size": package.blob.size if package.blob_id and package.blob else None,
        "key_fingerprint": (package.manifest or {}).get("key_fingerprint"),
        "requested_by": package.requested_by.get_username() if package.requested_by_id and package.requested_by
        else None,
        "created_at": package.created_at.isoformat(),
        "finished_at": package.finished_at.isoformat() if package.finished_at else None,
    }


def token_data(token: EdgeDeviceToken) -> dict[str, Any]:
    return {"id": str(token.uid), "model": token.model.name, "environment": token.environment, "name": token.name,
            "prefix": token.prefix, "active": token.is_active, "created_at": token.created_at.isoformat(),
            "created_by": token.created_by.get_username() if token.created_by_id and token.created_by else None,
            "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None,
            "last_report_at": token.last_report_at.isoformat() if token.last_report_at else None,
            "records_received": token.records_received}
