from __future__ import annotations

from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Model registry"

    def ready(self) -> None:
        from registry import checks  # noqa: F401 - registers the sandbox's start-up check

        from portal.management.commands.seed_demo import SEED_HOOKS
        from registry.demo import seed

        if seed not in SEED_HOOKS:
            SEED_HOOKS.append(seed)
