from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group
from django.db.models import QuerySet
from django.http import HttpRequest

from portal.audit.actions import AuditAction
from portal.audit.record import audit_record, target_of
from portal.models import ApiToken, AuditEvent, Membership, Team, TeamWebhook, WebhookDelivery


class AuditedAdminMixin:
    """Every change made through the admin is an audit event, written inside the admin's own transaction
    (Django calls these hooks from within ``changeform_view``'s and ``delete_view``'s atomic blocks)."""

    def log_addition(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        audit_record(AuditAction.ADMIN_ADD, actor=request.user, target=target_of(obj),
                     metadata={"change": str(message)[:2000]})
        return super().log_addition(request, obj, message)  # type: ignore[misc]

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        audit_record(AuditAction.ADMIN_CHANGE, actor=request.user, target=target_of(obj),
                     metadata={"change": str(message)[:2000]})
        return super().log_change(request, obj, message)  # type: ignore[misc]

    def log_deletions(self, request: HttpRequest, queryset: QuerySet[Any]) -> Any:
        for obj in queryset:
            audit_record(AuditAction.ADMIN_DELETE, actor=request.user, target=target_of(obj))
        return super().log_deletions(request, queryset)  # type: ignore[misc]


class MembershipInline(admin.TabularInline):  # type: ignore[type-arg]
    model = Membership
    extra = 1


@admin.register(Team)
class TeamAdmin(AuditedAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["slug", "name", "created_at"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]


@admin.register(ApiToken)
class ApiTokenAdmin(AuditedAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["user", "name", "prefix", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = ["user", "name", "prefix", "key_hash", "created_at", "last_used_at", "expires_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Read-only: the trail is append-only, here as everywhere."""

    list_display = ["seq", "timestamp", "actor_username", "action", "target_type", "target_id", "outcome"]
    list_filter = ["outcome"]
    search_fields = ["actor_username", "action", "target_id", "request_id"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


User = get_user_model()
admin.site.unregister(User)
admin.site.unregister(Group)


@admin.register(User)
class AuditedUserAdmin(AuditedAdminMixin, UserAdmin):  # type: ignore[type-arg]
    pass


@admin.register(Group)
class AuditedGroupAdmin(AuditedAdminMixin, GroupAdmin):
    pass


admin.site.site_header = "MLOps portal administration"


@admin.register(TeamWebhook)
class TeamWebhookAdmin(AuditedAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """The URL field's validator refuses internal targets here too; deliveries check again after resolution."""

    list_display = ["team", "url", "active", "created_at"]
    list_filter = ["active"]


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["webhook", "event", "status", "attempts", "response_status", "created_at"]
    list_filter = ["status", "event"]
    readonly_fields = ["uid", "webhook", "event", "payload", "status", "attempts", "response_status", "error",
                       "created_at", "last_attempt_at", "delivered_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

