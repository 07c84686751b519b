from __future__ import annotations

from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Model registry"

    def ready(self) -> None:
        # lazy: AppConfig.ready() runs once the app registry is loaded; these register checks, hooks and listeners
        from portal.management.commands.seed_demo import SEED_HOOKS
        from portal.views import register_sandbox_check
        from registry import checks  # noqa: F401 - registers the sandbox's start-up check
        from registry.demo import seed
        from registry.mlflow_sync import services as mlflow_sync  # noqa: F401 - sets MLflow aliases on deployments
        from registry.promotions import services as promotions  # noqa: F401 - listens to the deployments' events
        from registry.sandbox import unavailable_reason

        if seed not in SEED_HOOKS:
            SEED_HOOKS.append(seed)
        register_sandbox_check(unavailable_reason)  # /readyz reports the sandbox the registry owns
