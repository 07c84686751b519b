"""An A/B experiment: the champion against a canary challenger in one environment, on one metric of ground truth.

Imported by ``monitoring.models`` so the monitoring app owns the table (its migrations hold it)."""

from __future__ import annotations

import uuid
from typing import ClassVar

from django.conf import settings
from django.db import models
from django.utils import timezone


class Metric(models.TextChoices):
    ACCURACY = "accuracy", "Accuracy (share of correct predictions)"
    LOG_LOSS = "log_loss", "Log loss (of a predicted probability)"
    MAE = "mae", "Mean absolute error"
    OUTCOME = "outcome", "Business outcome (the value sent as ground truth, e.g. converted 0/1 or revenue)"


# Whether a larger value of the metric is better.
HIGHER_IS_BETTER = {Metric.ACCURACY: True, Metric.LOG_LOSS: False, Metric.MAE: False, Metric.OUTCOME: True}


class ExperimentStatus(models.TextChoices):
    RUNNING = "running", "Running"
    ENDED = "ended", "Ended"


class Verdict(models.TextChoices):
    RUNNING = "running", "Running"
    CHALLENGER_WINS = "challenger_wins", "Challenger wins"
    CHAMPION_HOLDS = "champion_holds", "Champion holds"
    NO_DIFFERENCE = "no_difference", "No difference at this size"
    GUARDRAIL = "guardrail", "Stopped by a guardrail"
    INVALID = "invalid", "Invalid (sample ratio mismatch)"
    STOPPED = "stopped", "Stopped by a person"


class Experiment(models.Model):
    """Champion and challenger are the environment's champion and canary deployments when the experiment starts;
    the arms are read from the rollups by (version, role). At most one experiment runs per model and environment."""

    team_path: ClassVar[str] = "model__team"  # whose team sees it (portal.permissions.scope_to_teams)

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model = models.ForeignKey("registry.RegisteredModel", on_delete=models.CASCADE, related_name="experiments")
    environment = models.CharField(max_length=8)
    name = models.CharField(max_length=200, blank=True)
    champion = models.ForeignKey("registry.Deployment", on_delete=models.PROTECT, related_name="+")
    challenger = models.ForeignKey("registry.Deployment", on_delete=models.PROTECT, related_name="+")
    champion_version = models.PositiveIntegerField()
    challenger_version = models.PositiveIntegerField()
    traffic_percent = models.PositiveSmallIntegerField(help_text="The challenger's share of requests.")
    metric = models.CharField(max_length=10, choices=Metric.choices)
    mde = models.FloatField(help_text="Minimum detectable effect, in the metric's units (absolute).")
    alpha = models.FloatField(default=0.05)
    baseline_mean = models.FloatField(null=True, blank=True)
    baseline_sd = models.FloatField()
    tau2 = models.FloatField(help_text="The mSPRT's mixing variance, chosen at planning for power at the MDE.")
    planned_sample = models.PositiveIntegerField(help_text="Outcomes per arm (the smaller) for 80 % power at the MDE.")
    fixed_horizon_sample = models.PositiveIntegerField()
    guardrails = models.JSONField(default=dict, blank=True)
    segment_column = models.CharField(max_length=200, blank=True, help_text=(
        "A categorical input column to analyse per segment (its categories), or empty."))
    status = models.CharField(max_length=8, choices=ExperimentStatus.choices, default=ExperimentStatus.RUNNING)
    verdict = models.CharField(max_length=16, choices=Verdict.choices, default=Verdict.RUNNING)
    verdict_sentence = models.TextField(blank=True)
    analysis = models.JSONField(default=dict, blank=True)
    analysed_at = models.DateTimeField(null=True, blank=True)
    promotion = models.ForeignKey("registry.PromotionRequest", null=True, blank=True, on_delete=models.SET_NULL,
                                  related_name="+")
    started_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        constraints = [models.UniqueConstraint(fields=["model", "environment"], condition=models.Q(status="running"),
                                               name="experiment_one_running")]

    def __str__(self) -> str:
        return f"{self.model.name} {self.environment}: v{self.champion_version} vs v{self.challenger_version}"

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[Metric(self.metric)]


class ExperimentUnit(models.Model):
    """One unit (a routing key or subject, hashed as the log keeps it) assigned to an arm, first seen at
    ``first_seen``: the sample-ratio check counts these, not requests, so a user sending fifty requests counts once.
    Written by the roll-up of the minutes that hold the unit's predictions (``monitoring.experiments.units``);
    requests with neither key nor subject are counted from the rollups instead (each request is its own unit)."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="units")
    unit_hash = models.CharField(max_length=64)
    arm = models.CharField(max_length=10)  # champion | challenger
    first_seen = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["experiment", "unit_hash"], name="experiment_unit_once")]
        indexes = [models.Index(fields=["experiment", "arm", "first_seen"], name="experiment_unit_arm_seen")]
