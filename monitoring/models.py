"""The prediction log and late ground truth."""

from __future__ import annotations

import uuid
from typing import ClassVar

from django.conf import settings
from django.db import models
from django.utils import timezone


class PredictionLog(models.Model):
    """One prediction (one row scored). The id is the one returned to the caller, so a flush can be repeated
    without duplicates."""

    id = models.CharField(primary_key=True, max_length=32)
    model_name = models.CharField(max_length=100)
    version = models.PositiveIntegerField()
    environment = models.CharField(max_length=8)
    role = models.CharField(max_length=12)  # champion | canary | shadow | batch
    created_at = models.DateTimeField(db_index=True)
    latency_ms = models.FloatField()
    inputs = models.JSONField(null=True)
    output = models.JSONField(null=True)
    subject_hash = models.CharField(max_length=64, blank=True, db_index=True)
    request_id = models.CharField(max_length=64, blank=True)
    error = models.TextField(blank=True)
    shadow_of = models.CharField(max_length=32, blank=True, help_text="For a shadow prediction: the id of the "
                                 "champion's prediction for the same row.")

    class Meta:
        indexes = [models.Index(fields=["model_name", "environment", "created_at"], name="predlog_model_env_time")]


class Feedback(models.Model):
    """Ground truth for a prediction, arriving hours or days later; only for a prediction already in the log, of the
    model and environment it was sent for (``monitoring.feedback``)."""

    prediction_id = models.CharField(max_length=32, unique=True)
    actual = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)
    submitted_by = models.CharField(max_length=150, blank=True)


class Granularity(models.TextChoices):
    MINUTE = "minute", "Minute"
    HOUR = "hour", "Hour"
    DAY = "day", "Day"


class Rollup(models.Model):
    """What the predictions of one time bucket add up to, for one model, environment, version and role.

    Everything in it is additive (counts, sums, histograms on fixed bins, confusion counts), so buckets merge by
    adding and a recomputed minute corrects its hour and day by the difference (``monitoring.rollups``).
    """

    model_name = models.CharField(max_length=100)
    environment = models.CharField(max_length=8)
    version = models.PositiveIntegerField()
    role = models.CharField(max_length=12)
    granularity = models.CharField(max_length=6, choices=Granularity.choices)
    start = models.DateTimeField()
    count = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    labelled = models.BigIntegerField(default=0)
    data = models.JSONField(default=dict)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model_name", "environment", "granularity", "start", "version",
                                                       "role"], name="rollup_unique_bucket")]
        indexes = [models.Index(fields=["model_name", "environment", "granularity", "start"],
                                name="rollup_model_env_gran_start")]


class RollupDirty(models.Model):
    """A minute whose predictions or ground truth changed since it was last rolled up. Marked in the transaction that
    writes the change, one row per writer and minute (append-only: concurrent writers never wait on each other's
    mark); roll-up deletes exactly the rows it read, so a mark made meanwhile survives it."""

    model_name = models.CharField(max_length=100)
    environment = models.CharField(max_length=8)
    minute = models.DateTimeField()
    marked_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["model_name", "environment", "minute"], name="rollup_dirty_minute")]


class MonitoringSettings(models.Model):
    """Per-model thresholds for drift and alerts; a model without a row uses ``DEFAULT_THRESHOLDS``."""

    model = models.OneToOneField("registry.RegisteredModel", on_delete=models.CASCADE, related_name="monitoring")
    thresholds = models.JSONField(default=dict, blank=True)
    target_column = models.CharField(max_length=200, blank=True, help_text=(
        "The reference data's column of true values, for prediction drift; empty: the one reference column that is "
        "not a model input."))
    updated_at = models.DateTimeField(auto_now=True)


class AlertStatus(models.TextChoices):
    FIRING = "firing", "Firing"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    RESOLVED = "resolved", "Resolved"


class Alert(models.Model):
    """One occurrence of a rule's condition, from first seen until resolved. At most one open alert per rule and
    subject (model, environment, kind, feature): the condition holding again a minute later is the same alert."""

    team_path: ClassVar[str] = "model__team"  # whose team sees it (portal.permissions.scope_to_teams)

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model = models.ForeignKey("registry.RegisteredModel", on_delete=models.CASCADE, related_name="alerts")
    environment = models.CharField(max_length=8)
    kind = models.CharField(max_length=16)  # drift | prediction_drift | accuracy | latency | error_rate
    subject = models.CharField(max_length=200, blank=True)  # the feature, for drift
    severity = models.CharField(max_length=8)  # warning | alert
    status = models.CharField(max_length=12, choices=AlertStatus.choices, default=AlertStatus.FIRING)
    value = models.FloatField()
    threshold = models.FloatField()
    message = models.TextField()
    opened_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    acknowledged_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                        related_name="+")
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+")
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolution = models.TextField(blank=True)

    class Meta:
        ordering = ["-opened_at"]
        constraints = [models.UniqueConstraint(fields=["model", "environment", "kind", "subject"],
                                               condition=~models.Q(status="resolved"), name="alert_one_open")]

    def __str__(self) -> str:
        what = f"{self.kind} {self.subject}".strip()
        return f"{self.model.name} {self.environment}: {what}"


# The experiments feature keeps its model in its own folder; importing it here makes it part of this app.
from monitoring.experiments.models import Experiment  # noqa: E402

__all__ = ["Alert", "AlertStatus", "Experiment", "Feedback", "Granularity", "MonitoringSettings", "PredictionLog",
           "Rollup", "RollupDirty"]
