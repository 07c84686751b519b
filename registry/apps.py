from __future__ import annotations

from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Model registry"

    def ready(self) -> None:
        from registry import checks  # noqa: F401 - registers the sandbox's start-up check

        from portal.management.commands.seed_demo import SEED_HOOKS
        from portal.views import register_sandbox_check
        from registry.demo import seed
        from registry.sandbox import unavailable_reason

        if seed not in SEED_HOOKS:
            SEED_HOOKS.append(seed)
        register_sandbox_check(unavailable_reason)  # /readyz reports the sandbox the registry owns
