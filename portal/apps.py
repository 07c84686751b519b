from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Portal"

    def ready(self) -> None:
        # lazy: AppConfig.ready() runs once the app registry is loaded; these register checks, hooks and listeners
        import portal.checks  # registers the start-up check of the keys production must set
        import portal.schema  # noqa: F401 - registers the OpenAPI extension for bearer tokens
        from portal import tasks  # noqa: F401 - enqueues webhook deliveries and checkpoint sends (signal receivers)
        from portal.roles import sync_roles

        # Roles are configuration, not data: keep the groups in step with portal.roles after every migrate.
        post_migrate.connect(sync_roles, sender=self, dispatch_uid="portal.sync_roles")
