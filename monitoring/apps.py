from __future__ import annotations

from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "monitoring"
    verbose_name = "Monitoring"

    def import_models(self) -> None:
        """The app's models: monitoring.models, then the experiments' own module (the app registry loads both, so
        that monitoring.models needs no import of a feature that imports it)."""
        super().import_models()
        from monitoring.experiments import models  # noqa: F401 - registers Experiment and ExperimentUnit

    def ready(self) -> None:
        # lazy: AppConfig.ready() runs once the app registry is loaded; these register checks, hooks and listeners
        # The registry defines the hook and monitoring fills it (imports point monitoring → registry only).
        from monitoring.datasets.services import training_sets_record, training_sets_resolve
        from monitoring.evidence import ground_truth, live_evidence, live_predictions
        from monitoring import tasks  # noqa: F401 - enqueues subject access reports (signal receiver)
        from monitoring.datasets import retraining  # noqa: F401 - answers finished snapshots (signal receiver)
        from monitoring.datasets import tasks as dataset_tasks  # noqa: F401 - enqueues snapshot cuts (receiver)
        from monitoring.experiments import units  # noqa: F401 - records experiment units as minutes roll up
        from monitoring.experiments.evidence import promotion_experiment
        from monitoring.flush import write_batches
        from registry.hooks import (register_prediction_log_writer, register_promotion_experiment,
                                    register_training_sets)
        from registry.promotions.services import (register_ground_truth_reader, register_live_evidence,
                                                   register_traffic_counter)

        register_live_evidence(live_evidence)
        register_traffic_counter(live_predictions)  # the promotion gate's minimum of live traffic
        register_ground_truth_reader(ground_truth)  # the promotion gate's accuracy on ground truth
        register_promotion_experiment(promotion_experiment)  # the promotion page shows the experiment behind it
        register_prediction_log_writer(write_batches)  # batch jobs log their predictions
        register_training_sets(training_sets_resolve, training_sets_record)  # lineage: versions' trained_on
