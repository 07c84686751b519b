from __future__ import annotations

from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Model registry"

    def ready(self) -> None:
        # lazy: AppConfig.ready() runs once the app registry is loaded; these register checks, hooks and listeners
        from portal.management.commands.seed_demo import SEED_HOOKS
        from portal.views import register_sandbox_check, register_sandbox_detail
        from registry import checks  # noqa: F401 - registers the sandbox's start-up check
        from registry.demo import seed
        from registry.deployments import tasks as deployment_tasks  # noqa: F401 - enqueues deployments (receiver)
        from registry.edge import tasks as edge_tasks  # noqa: F401 - enqueues package builds (signal receiver)
        from registry.mlflow_sync import tasks as mlflow_sync_tasks  # noqa: F401 - enqueues sync jobs (receiver)
        from registry.mlflow_sync import services as mlflow_sync  # noqa: F401 - sets MLflow aliases on deployments
        from registry.promotions import services as promotions  # noqa: F401 - listens to the deployments' events
        from registry.sandbox import cgroups_status, unavailable_reason
        from registry.versions import tasks as version_tasks  # noqa: F401 - enqueues scans and explanations (receiver)

        if seed not in SEED_HOOKS:
            SEED_HOOKS.append(seed)
        register_sandbox_check(unavailable_reason)  # /readyz reports the sandbox the registry owns
        register_sandbox_detail(cgroups_status)  # and whether its sandboxes get cgroups here
