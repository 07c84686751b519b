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
    # The keyed hash of what the router assigned this request by (its X-Routing-Key, else its first subject id): the
    # unit of an A/B experiment's assignment. Empty when the request had neither (then the request is the unit).
    unit_hash = models.CharField(max_length=64, blank=True, default="")
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


class AttributionDrift(models.Model):
    """One measurement of attribution drift (issue 37): each feature's share of SHAP attribution over recent
    production rows of the serving version, against its share over the reference data (the version's global
    importance), and their distance (total variation: half the sum of the absolute differences, 0 to 1)."""

    model = models.ForeignKey("registry.RegisteredModel", on_delete=models.CASCADE, related_name="+")
    environment = models.CharField(max_length=8)
    version = models.PositiveIntegerField()
    measured_at = models.DateTimeField(default=timezone.now, db_index=True)
    rows = models.PositiveIntegerField(default=0)
    production = models.JSONField(default=dict, blank=True)  # feature -> share of attribution in production
    reference = models.JSONField(default=dict, blank=True)  # feature -> share over the reference data
    distance = models.FloatField(null=True, blank=True)
    method = models.CharField(max_length=100, blank=True)
    approximate = models.BooleanField(default=False)
    error = models.TextField(blank=True)  # why nothing was measured

    class Meta:
        ordering = ["-measured_at"]
        indexes = [models.Index(fields=["model", "environment", "measured_at"], name="attrdrift_model_env_time")]


class SubjectReportStatus(models.TextChoices):
    PENDING = "pending", "Waiting for a worker"
    RUNNING = "running", "Explaining the decisions"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


class SubjectAccessReport(models.Model):
    """A subject access report (GDPR Art. 15) prepared by a worker, since explaining each logged decision runs the
    version's explainer in a sandboxed host (seconds per version). Known by the subject's keyed hash only (the id
    typed is never stored). The report is personal data: kept encrypted with the payload keys (``report``), shown
    only to the officer who asked, deleted with the subject's other data at erasure and once it is older than
    ``KEEP_SECONDS``. Invariant: ``report`` is set exactly when ``status`` is ready."""

    KEEP_SECONDS = 3600

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    subject_hash = models.CharField(max_length=64, db_index=True)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=8, choices=SubjectReportStatus.choices, default=SubjectReportStatus.PENDING)
    decisions_total = models.PositiveIntegerField(default=0)  # decisions to explain
    decisions_done = models.PositiveIntegerField(default=0)  # ...explained (or found unexplainable) so far
    report = models.TextField(blank=True)  # the JSON report, encrypted (monitoring.sensitive.encrypt_value)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"subject access report {str(self.uid)[:8]} ({self.status})"

    @property
    def progress(self) -> int:
        if self.status == SubjectReportStatus.READY:
            return 100
        if not self.decisions_total:
            return 0
        return min(99, int(100 * self.decisions_done / self.decisions_total))

    @property
    def running(self) -> bool:
        return self.status in (SubjectReportStatus.PENDING, SubjectReportStatus.RUNNING)


# The experiments feature keeps its model in its own folder; importing it here makes it part of this app.
# --- Datasets cut from production, retraining and lineage (monitoring.datasets) -------------------------------

class SnapshotStatus(models.TextChoices):
    PENDING = "pending", "Waiting for a worker"
    RUNNING = "running", "Writing"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


class SensitiveTreatment(models.TextChoices):
    DROPPED = "dropped", "Dropped"
    MASKED = "masked", "Masked"
    ENCRYPTED = "encrypted", "Kept encrypted"


class DatasetSnapshot(models.Model):
    """A training set cut from production: the logged inputs of one model and environment (one version or all) in a
    time window, joined with their ground truth, written as Parquet in chunks by a worker.

    Invariants: once ready, its bytes are the blob named by ``sha256`` and never change, except that a GDPR erasure
    may remove a subject's rows; then the file is rewritten, ``sha256`` becomes the new file's and the manifest's
    ``chain`` keeps every earlier hash with the erasure receipt that replaced it. A cut is resumable: ``cursor`` is
    the last (time, id) of the log written to a durable chunk, ``chunks_done`` how many chunks exist.
    """

    team_path: ClassVar[str] = "model__team"

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model = models.ForeignKey("registry.RegisteredModel", on_delete=models.PROTECT, related_name="snapshots")
    environment = models.CharField(max_length=8)
    version = models.PositiveIntegerField(null=True, blank=True, help_text="None: every version in the window.")
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    labelled_only = models.BooleanField(default=False)
    sensitive_treatment = models.JSONField(default=dict, blank=True)  # {column: dropped | masked | encrypted}
    status = models.CharField(max_length=8, choices=SnapshotStatus.choices, default=SnapshotStatus.PENDING)
    rows_expected = models.BigIntegerField(default=0)
    rows_done = models.BigIntegerField(default=0)
    chunks_done = models.PositiveIntegerField(default=0)
    cursor = models.JSONField(null=True, blank=True)  # [created_at ISO, prediction id] of the last row written
    schema = models.JSONField(default=list, blank=True)  # [[column, arrow type], ...], fixed by the first chunk
    stats = models.JSONField(default=dict, blank=True)  # counts accumulated chunk by chunk (labelled, per version)
    erase_subjects = models.JSONField(default=list, blank=True)  # subject hashes erased while the cut was running
    blob = models.ForeignKey("registry.Blob", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    sha256 = models.CharField(max_length=64, blank=True, db_index=True)
    size = models.BigIntegerField(default=0)
    manifest = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        which = f"v{self.version}" if self.version else "all versions"
        return f"{self.model.name} {self.environment} {which} snapshot {str(self.uid)[:8]}"

    @property
    def progress(self) -> int:
        if self.status == SnapshotStatus.READY:
            return 100
        if not self.rows_expected:
            return 0
        return min(99, int(100 * self.rows_done / self.rows_expected))


class DatasetAccessToken(models.Model):
    """A short-lived, read-only token that downloads one snapshot and nothing else (sent to a team's CI with a
    retraining request). Only its SHA-256 is kept."""

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    snapshot = models.ForeignKey(DatasetSnapshot, on_delete=models.CASCADE, related_name="access_tokens")
    prefix = models.CharField(max_length=16)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    last_used_at = models.DateTimeField(null=True, blank=True)

    @property
    def is_active(self) -> bool:
        return timezone.now() < self.expires_at


class RetrainingPolicy(models.Model):
    """When to ask a team's CI to retrain a model serving in one environment, and where to call it."""

    team_path: ClassVar[str] = "model__team"

    model = models.ForeignKey("registry.RegisteredModel", on_delete=models.CASCADE, related_name="retraining_policies")
    environment = models.CharField(max_length=8)
    enabled = models.BooleanField(default=True)
    on_drift = models.BooleanField(default=True, help_text="An open input or prediction drift alert triggers.")
    accuracy_floor = models.FloatField(null=True, blank=True)
    accuracy_window_minutes = models.PositiveIntegerField(default=60)
    accuracy_min_labelled = models.PositiveIntegerField(default=50)
    schedule_hours = models.PositiveIntegerField(null=True, blank=True, help_text="Retrain at least this often.")
    snapshot_days = models.PositiveIntegerField(default=7, help_text="The snapshot covers this many days back.")
    labelled_only = models.BooleanField(default=True)
    webhook = models.ForeignKey("portal.TeamWebhook", null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="+", help_text="The team's CI receiver.")
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "environment"], name="retraining_policy_one")]


class RetrainingStatus(models.TextChoices):
    CUTTING = "cutting", "Cutting the snapshot"
    CALLING = "calling", "Calling CI"
    CALLED = "called", "CI called"
    FAILED = "failed", "Failed"
    DONE = "done", "Done: a version trained on it"
    CLOSED = "closed", "Closed"


OPEN_RETRAINING = (RetrainingStatus.CUTTING, RetrainingStatus.CALLING, RetrainingStatus.CALLED)


class RetrainingRequest(models.Model):
    """One request to retrain: a snapshot cut for it and one signed call to the team's CI. At most one is open per
    model and environment (a partial unique constraint), so a drift alert seen every minute asks once."""

    team_path: ClassVar[str] = "model__team"

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model = models.ForeignKey("registry.RegisteredModel", on_delete=models.CASCADE, related_name="retraining_requests")
    environment = models.CharField(max_length=8)
    policy = models.ForeignKey(RetrainingPolicy, null=True, blank=True, on_delete=models.SET_NULL,
                               related_name="requests")
    trigger = models.CharField(max_length=16)  # drift | accuracy | schedule | manual
    reason = models.TextField()
    alert = models.ForeignKey(Alert, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    snapshot = models.ForeignKey(DatasetSnapshot, null=True, blank=True, on_delete=models.PROTECT,
                                 related_name="retraining_requests")
    delivery = models.ForeignKey("portal.WebhookDelivery", null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="+")
    status = models.CharField(max_length=8, choices=RetrainingStatus.choices, default=RetrainingStatus.CUTTING)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["model", "environment"],
                                               condition=models.Q(status__in=["cutting", "calling", "called"]),
                                               name="retraining_one_open")]

    def __str__(self) -> str:
        return f"{self.model.name} {self.environment} retraining {str(self.uid)[:8]}"


class TrainingLink(models.Model):
    """Lineage: a version was trained on a snapshot (``trained_on`` at registration). The registry never imports
    monitoring; it calls the hook monitoring registers (``registry.hooks``), which writes these rows."""

    version = models.ForeignKey("registry.ModelVersion", on_delete=models.CASCADE, related_name="training_links")
    snapshot = models.ForeignKey(DatasetSnapshot, on_delete=models.PROTECT, related_name="training_links")
    snapshot_sha256 = models.CharField(max_length=64)  # the content the version was trained on
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["version", "snapshot"], name="training_link_once")]


class ErasedDataFlag(models.Model):
    """A version trained on a snapshot from which an erasure removed rows: "trained on erased data" until a
    compliance officer records a decision (retrain requested, or kept with a reason)."""

    team_path: ClassVar[str] = "version__model__team"

    class Decision(models.TextChoices):
        PENDING = "", "Waiting for a decision"
        RETRAIN = "retrain", "Retraining requested"
        KEEP = "keep", "Kept"

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    version = models.ForeignKey("registry.ModelVersion", on_delete=models.CASCADE, related_name="erased_data_flags")
    snapshot = models.ForeignKey(DatasetSnapshot, on_delete=models.PROTECT, related_name="erased_data_flags")
    erasure_seq = models.BigIntegerField()  # the audit event that is the erasure's receipt
    erasure_hash = models.CharField(max_length=64)
    rows_removed = models.BigIntegerField(default=0)
    flagged_at = models.DateTimeField(default=timezone.now)
    decision = models.CharField(max_length=8, choices=Decision.choices, default=Decision.PENDING, blank=True)
    reason = models.TextField(blank=True)
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-flagged_at"]


# The experiments' tables (monitoring.experiments.models) belong to this app too: MonitoringConfig.import_models
# loads them after this module, which imports nothing of the features.
__all__ = ["Alert", "AlertStatus", "AttributionDrift", "DatasetAccessToken", "DatasetSnapshot", "ErasedDataFlag",
           "Feedback", "Granularity", "MonitoringSettings", "PredictionLog", "RetrainingPolicy", "RetrainingRequest",
           "RetrainingStatus", "Rollup", "RollupDirty", "SensitiveTreatment", "SnapshotStatus", "SubjectAccessReport",
           "SubjectReportStatus", "TrainingLink"]
