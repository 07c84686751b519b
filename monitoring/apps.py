from __future__ import annotations

from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "monitoring"
    verbose_name = "Monitoring"

    def ready(self) -> None:
        # lazy: AppConfig.ready() runs once the app registry is loaded; these register checks, hooks and listeners
        # The registry defines the hook and monitoring fills it (imports point monitoring → registry only).
        from monitoring.evidence import live_evidence, live_predictions
        from monitoring.flush import write_batches
        from registry.hooks import register_prediction_log_writer
        from registry.promotions.services import register_live_evidence, register_traffic_counter

        register_live_evidence(live_evidence)
        register_traffic_counter(live_predictions)
        register_prediction_log_writer(write_batches)  # batch jobs log their predictions
