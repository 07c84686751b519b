"""The experiment a promotion request was opened by, for the promotion page and API (registered into
``registry.hooks`` when monitoring starts: the registry never imports monitoring)."""

from __future__ import annotations

from typing import Any

from django.urls import reverse

from monitoring.experiments.models import Experiment, Verdict
from monitoring.experiments.selectors import experiment_json


def promotion_experiment(promotion: Any) -> dict[str, Any] | None:
    experiment = (Experiment.objects.select_related("model__team", "promotion", "started_by")
                  .filter(promotion=promotion).order_by("-started_at").first())
    if experiment is None:
        return None
    return {**experiment_json(experiment), "verdict_label": Verdict(experiment.verdict).label,
            "url": reverse("monitoring:experiment", args=[experiment.uid]),
            "started_display": f"{experiment.started_at:%Y-%m-%d %H:%M}"}
