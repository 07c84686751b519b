"""The prediction log and late ground truth."""

from __future__ import annotations

from django.db import models


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
    """Ground truth for a prediction, arriving hours or days later (kept even before the prediction is flushed)."""

    prediction_id = models.CharField(max_length=32, unique=True)
    actual = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)
    submitted_by = models.CharField(max_length=150, blank=True)
