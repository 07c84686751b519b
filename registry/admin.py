from __future__ import annotations

from django.contrib import admin

from portal.admin import AuditedAdminMixin
from registry.models import PromotionPolicy


@admin.register(PromotionPolicy)
class PromotionPolicyAdmin(AuditedAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["environment", "team", "model", "approvals_required", "metric_tolerance"]
    list_filter = ["environment"]
