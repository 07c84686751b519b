"""Registered models, their immutable versions, artifacts (content-addressed blobs) and reference data."""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

from portal.environments import ENVIRONMENTS, PROMOTION_TARGETS
from portal.models import Team

MODEL_NAME_VALIDATOR = RegexValidator(
    r"^[a-z0-9](?:[a-z0-9-]{0,98}[a-z0-9])?$",
    "Use 1 to 100 lowercase letters, digits and hyphens, starting and ending with a letter or digit.",
)


class Blob(models.Model):
    """A stored file, named by its SHA-256. Never overwritten; the hash is checked again on every read."""

    sha256 = models.CharField(max_length=64, unique=True)
    size = models.BigIntegerField()
    storage_name = models.CharField(max_length=255)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.sha256[:12]}… ({self.size} bytes)"


class RegisteredModel(models.Model):
    team_path: ClassVar[str] = "team"  # whose team sees it (portal.permissions.scope_to_teams)
    name = models.CharField(max_length=100, unique=True, validators=[MODEL_NAME_VALIDATOR])
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="models")
    description = models.TextField(blank=True)
    tags = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ModelFormat(models.TextChoices):
    MLFLOW = "mlflow", "MLflow model directory"
    SKOPS = "skops", "skops"
    ONNX = "onnx", "ONNX"
    PICKLE = "pickle", "pickle"
    JOBLIB = "joblib", "joblib"


class VersionStatus(models.TextChoices):
    SCANNING = "scanning", "Scanning"
    READY = "ready", "Ready"
    REJECTED = "rejected", "Rejected"


class TrustState(models.TextChoices):
    NOT_NEEDED = "not_needed", "Not needed"
    PENDING = "pending", "Waiting for an approver"
    TRUSTED = "trusted", "Trusted"
    REFUSED = "refused", "Refused"


class ReferenceData(models.Model):
    """Training or validation data stored with a version and profiled once, for drift monitoring."""

    blob = models.ForeignKey(Blob, on_delete=models.PROTECT, related_name="+")
    format = models.CharField(max_length=16)  # csv | parquet
    rows = models.BigIntegerField(null=True)
    profile = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"reference {self.blob.sha256[:12]}…"


class ModelVersion(models.Model):
    """One uploaded version. Invariant: what was uploaded (artifact, metadata, lineage, card) never changes; only
    the outcome of scanning and the trust decision are filled in afterwards (``MUTABLE_FIELDS``)."""

    team_path: ClassVar[str] = "model__team"  # whose team sees it (portal.permissions.scope_to_teams)

    MUTABLE_FIELDS = frozenset({
        "status", "status_detail", "scan_findings", "untrusted_types", "trust_state", "trust_decided_by",
        "trust_decided_at", "trust_reason", "scanned_at", "sandbox_report", "signature", "input_example", "tags",
        "flavors", "artifact", "explanation",
    })

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model = models.ForeignKey(RegisteredModel, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=VersionStatus.choices, default=VersionStatus.SCANNING)
    status_detail = models.TextField(blank=True)
    artifact = models.ForeignKey(Blob, null=True, on_delete=models.PROTECT, related_name="versions")
    artifact_sha256 = models.CharField(max_length=64, db_index=True)
    artifact_size = models.BigIntegerField()
    original_filename = models.CharField(max_length=255, blank=True)
    format = models.CharField(max_length=16, choices=ModelFormat.choices)
    flavors = models.JSONField(default=list, blank=True)
    signature = models.JSONField(default=dict, blank=True)
    input_example = models.JSONField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    params = models.JSONField(default=dict, blank=True)
    description = models.TextField(blank=True)
    tags = models.JSONField(default=list, blank=True)  # editable labels (the file and its lineage are not)
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    # Lineage
    mlflow_run_id = models.CharField(max_length=64, blank=True)
    source = models.CharField(max_length=500, blank=True)
    git_commit = models.CharField(max_length=64, blank=True)
    training_data_hash = models.CharField(max_length=128, blank=True)
    # Model card
    intended_use = models.TextField(blank=True)
    limitations = models.TextField(blank=True)
    ethical_considerations = models.TextField(blank=True)
    # Input columns holding personal or health data: {"column": "personal" | "health"}. Their values are encrypted
    # at rest in the prediction log and masked for roles without view_sensitive.
    sensitive_columns = models.JSONField(default=dict, blank=True)
    # Scanning and trust
    scan_findings = models.JSONField(default=list, blank=True)
    untrusted_types = models.JSONField(default=list, blank=True)
    trust_state = models.CharField(max_length=16, choices=TrustState.choices, default=TrustState.NOT_NEEDED)
    trust_decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                         related_name="+")
    trust_decided_at = models.DateTimeField(null=True, blank=True)
    trust_reason = models.TextField(blank=True)
    scanned_at = models.DateTimeField(null=True, blank=True)
    sandbox_report = models.JSONField(default=dict, blank=True)
    # SHAP global importance computed at scan time in the sandbox from the reference data: method, whether it is
    # approximate, its cost, mean |attribution| per feature, and the background rows the explain endpoint uses;
    # or {"error": why} when none could be computed ({} before the scan).
    explanation = models.JSONField(default=dict, blank=True)
    reference = models.ForeignKey(ReferenceData, null=True, blank=True, on_delete=models.PROTECT, related_name="+")

    class Meta:
        ordering = ["model", "-number"]
        constraints = [models.UniqueConstraint(fields=["model", "number"], name="version_unique_number")]

    def __str__(self) -> str:
        return f"{self.model.name} v{self.number}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not kwargs.get("force_insert"):
            fields = kwargs.get("update_fields")
            if fields is None or not set(fields) <= self.MUTABLE_FIELDS:
                raise ValueError("Model versions are immutable: only scan results and trust decisions may change.")
        super().save(*args, **kwargs)


class MlflowSource(models.Model):
    """Where an imported version came from on an MLflow tracking server, written once with the version (the
    version's ``params`` hold the run's parameters, its ``metrics`` the finite last values)."""

    version = models.OneToOneField(ModelVersion, on_delete=models.CASCADE, related_name="mlflow_source")
    uri = models.CharField(max_length=500)  # as asked: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/…, models:/m-…
    tracking_uri = models.CharField(max_length=500)  # without any credentials
    artifact_uri = models.CharField(max_length=1000, blank=True)
    registered_model = models.CharField(max_length=256, blank=True)
    registered_version = models.CharField(max_length=32, blank=True)
    logged_model_id = models.CharField(max_length=64, blank=True)
    run_id = models.CharField(max_length=64, blank=True)
    run_name = models.CharField(max_length=256, blank=True)
    experiment_id = models.CharField(max_length=64, blank=True)
    experiment_name = models.CharField(max_length=500, blank=True)
    tags = models.JSONField(default=dict, blank=True)
    # {"metric": [[step, timestamp_ms, value or null], ...]}: every logged value, NaN and infinities as null
    metric_history = models.JSONField(default=dict, blank=True)
    missing_metrics = models.JSONField(default=list, blank=True)  # last value NaN or infinite: not in metrics
    imported_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.version} from {self.uri}"

    @property
    def run_url(self) -> str:
        """The run's page on the tracking server's UI; "" when the server has no UI (a database URI)."""
        if not self.run_id or not self.tracking_uri.startswith(("http://", "https://")):
            return ""
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id or '0'}/runs/{self.run_id}"

    def history_summary(self) -> list[dict[str, Any]]:
        """Per metric: how many values were logged, the first, last, lowest and highest finite one."""
        rows = []
        for name, points in sorted(self.metric_history.items()):
            values = [p[2] for p in points if p[2] is not None]
            rows.append({"name": name, "points": len(points), "first": values[0] if values else None,
                         "last": values[-1] if values else None, "min": min(values) if values else None,
                         "max": max(values) if values else None, "steps": len({p[0] for p in points})})
        return rows


class TeamTrustedType(models.Model):
    """A standing trust decision: an approver trusted this skops type for all future uploads of the team."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="trusted_types")
    type_name = models.CharField(max_length=255)
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    decided_at = models.DateTimeField(default=timezone.now)
    reason = models.TextField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "type_name"], name="team_trusted_type_unique")]

    def __str__(self) -> str:
        return f"{self.type_name} for {self.team}"


class Environment(models.TextChoices):
    DEV = "dev", "dev"
    STAGE = "stage", "stage"
    PROD = "prod", "prod"


ENVIRONMENT_ORDER = [Environment(e) for e in ENVIRONMENTS]


class Strategy(models.TextChoices):
    REPLACE = "replace", "Replace (blue/green)"
    CANARY = "canary", "Canary / A-B split"
    SHADOW = "shadow", "Shadow"


class DeploymentStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    LIVE = "live", "Live"
    FAILED = "failed", "Failed"
    RETIRED = "retired", "Retired"


class Deployment(models.Model):
    """One attempt to put a version live in an environment, carried out by a worker. Its log is shown live."""

    team_path: ClassVar[str] = "model__team"  # whose team sees it (portal.permissions.scope_to_teams)

    MAX_ATTEMPTS = 3

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model = models.ForeignKey(RegisteredModel, on_delete=models.PROTECT, related_name="deployments")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="deployments")
    environment = models.CharField(max_length=8, choices=Environment.choices)
    strategy = models.CharField(max_length=8, choices=Strategy.choices, default=Strategy.REPLACE)
    traffic_percent = models.PositiveSmallIntegerField(default=100)
    status = models.CharField(max_length=8, choices=DeploymentStatus.choices, default=DeploymentStatus.PENDING)
    progress = models.PositiveSmallIntegerField(default=0)
    log = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    serving_kind = models.CharField(max_length=16, blank=True)  # onnx | native
    serving_blob = models.ForeignKey(Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    request_id = models.CharField(max_length=64, blank=True)
    reason = models.TextField(blank=True)
    purpose = models.CharField(max_length=10, default="deploy")  # DeploymentPurpose
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["model", "environment", "-created_at"], name="deployment_model_env")]

    def __str__(self) -> str:
        return f"{self.version} to {self.environment} ({self.status})"


class ServingMode(models.TextChoices):
    SINGLE = "single", "Single version"
    CANARY = "canary", "Canary split"
    SHADOW = "shadow", "Shadow"


class EnvironmentState(models.Model):
    """What serves a model in an environment now. ``generation`` goes up with every switch, so web workers notice
    a change by comparing one integer."""

    team_path: ClassVar[str] = "model__team"  # whose team sees it (portal.permissions.scope_to_teams)

    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="environment_states")
    environment = models.CharField(max_length=8, choices=Environment.choices)
    champion = models.ForeignKey(Deployment, null=True, on_delete=models.PROTECT, related_name="+")
    challenger = models.ForeignKey(Deployment, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    mode = models.CharField(max_length=8, choices=ServingMode.choices, default=ServingMode.SINGLE)
    challenger_percent = models.PositiveSmallIntegerField(default=0)
    generation = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "environment"], name="environment_state_unique")]

    def __str__(self) -> str:
        return f"{self.model.name}/{self.environment} gen {self.generation}"


class ServingInterval(models.Model):
    """A version serving in an environment from ``started_at`` until ``ended_at`` (open while it serves)."""

    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="serving_intervals")
    environment = models.CharField(max_length=8, choices=Environment.choices)
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    deployment = models.ForeignKey(Deployment, on_delete=models.PROTECT, related_name="intervals")
    role = models.CharField(max_length=12)  # champion | canary | shadow
    traffic_percent = models.PositiveSmallIntegerField()
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["started_at"]
        indexes = [models.Index(fields=["model", "environment", "started_at"], name="interval_model_env")]


ALIAS_NAME_VALIDATOR = RegexValidator(
    r"^(?!latest$)(?!v[0-9]+$)[a-z][a-z0-9_-]{0,63}$",
    "An alias is 1 to 64 lowercase letters, digits, hyphens and underscores, starting with a letter, such as "
    "champion; MLflow reserves latest and v<number>.",
)


class ModelAlias(models.Model):
    """A name pointing at one version of a model, as MLflow's registered-model aliases (``@champion``): a version
    may carry several, a name points at one version at a time. Set and moved in the portal, audited
    (``registry.versions.services.alias_set``); the MLflow write-back reads them."""

    team_path: ClassVar[str] = "model__team"
    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="aliases")
    name = models.CharField(max_length=64, validators=[ALIAS_NAME_VALIDATOR])
    version = models.ForeignKey("ModelVersion", on_delete=models.PROTECT, related_name="aliases")
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["model", "name"], name="model_alias_unique")]

    def __str__(self) -> str:
        return f"{self.model.name}@{self.name} → v{self.version.number}"


class Endpoint(models.Model):
    """One address in front of several models of a team in one environment
    (``/api/v1/serve/endpoints/{name}/{env}/invocations``): its ordered ``rules`` send each row to a model deployed
    there, ``default_model`` takes the rows no rule matches. ``generation`` goes up with every change, so serving
    workers notice one by comparing one integer (as ``EnvironmentState``)."""

    team_path: ClassVar[str] = "team"  # whose team sees it (portal.permissions.scope_to_teams)

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=100, validators=[MODEL_NAME_VALIDATOR])
    environment = models.CharField(max_length=8, choices=Environment.choices)
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="endpoints")
    description = models.TextField(blank=True)
    default_model = models.ForeignKey(RegisteredModel, null=True, blank=True, on_delete=models.PROTECT,
                                      related_name="+")
    generation = models.PositiveBigIntegerField(default=1)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name", "environment"]
        constraints = [models.UniqueConstraint(fields=["name", "environment"], name="endpoint_name_env_unique")]

    def __str__(self) -> str:
        return f"endpoint {self.name}/{self.environment}"


class RuleKind(models.TextChoices):
    FIELD_EQUALS = "field_equals", "A field of the row equals"
    FIELD_IN = "field_in", "A field of the row is one of"
    HEADER_EQUALS = "header_equals", "A request header equals"
    SHARE = "share", "A share of traffic"


class EndpointRule(models.Model):
    """One routing rule, tried in ``position`` order; the first that matches a row names its model."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="rules")
    position = models.PositiveSmallIntegerField()
    kind = models.CharField(max_length=16, choices=RuleKind.choices)
    key = models.CharField(max_length=200, blank=True)  # the field (input column) or header name
    values = models.JSONField(default=list, blank=True)  # field_equals / header_equals: one; field_in: several
    percent = models.PositiveSmallIntegerField(null=True, blank=True)  # share: 1..100
    model = models.ForeignKey(RegisteredModel, on_delete=models.PROTECT, related_name="endpoint_rules")

    class Meta:
        ordering = ["endpoint", "position"]
        constraints = [models.UniqueConstraint(fields=["endpoint", "position"], name="endpoint_rule_position")]

    def __str__(self) -> str:
        return f"{self.endpoint} rule {self.position}: {self.kind} -> {self.model_id}"


class ColdLoad(models.Model):
    """A deployment's serving form loaded (an ONNX session) or its sandboxed host started in a serving or batch
    process, and how long it took: shown on the deployment page, never counted as live latency."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="cold_loads")
    seconds = models.FloatField()
    kind = models.CharField(max_length=16)  # onnx | native | mlflow
    resident_bytes = models.BigIntegerField(null=True, blank=True)  # the form's estimated memory once loaded
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["deployment", "-at"], name="coldload_deployment_at")]


class PredictionOutbox(models.Model):
    """Prediction records waiting for monitoring's flusher, in the embedded mode (Redis holds them otherwise)."""

    payload = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)


class DeploymentPurpose(models.TextChoices):
    DEPLOY = "deploy", "Deploy"
    PROMOTION = "promotion", "Promotion"
    ROLLBACK = "rollback", "Rollback"


class PromotionPolicy(models.Model):
    """How many approvals a promotion to ``environment`` needs, and how much worse a metric may be than the
    champion's. The most specific row wins: model, then team, then the global row (neither set), then the
    defaults in :data:`DEFAULT_APPROVALS`."""

    environment = models.CharField(max_length=8, choices=[(e, e) for e in PROMOTION_TARGETS])
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    model = models.ForeignKey(RegisteredModel, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    approvals_required = models.PositiveSmallIntegerField(validators=[MinValueValidator(1), MaxValueValidator(5)])
    metric_tolerance = models.FloatField(default=0.01, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
                                         help_text="How much worse than the champion a metric may be (absolute).")

    class Meta:
        verbose_name_plural = "promotion policies"
        constraints = [models.UniqueConstraint(fields=["environment", "team", "model"], name="promotion_policy_unique",
                                               nulls_distinct=False)]

    def __str__(self) -> str:
        scope = self.model or self.team or "everyone"
        return f"{self.environment}: {self.approvals_required} approvals ({scope})"


DEFAULT_APPROVALS = {"stage": 1, "prod": 2}
DEFAULT_METRIC_TOLERANCE = 0.01


class PromotionStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"
    CANCELLED = "cancelled", "Cancelled"
    DEPLOYING = "deploying", "Deploying"
    LIVE = "live", "Live"
    FAILED = "failed", "Failed"


class PromotionRequest(models.Model):
    """A request to put a version live in stage or prod; approved by people other than the requester and the
    version's uploader, then carried out by one deployment."""

    team_path: ClassVar[str] = "model__team"  # whose team sees it (portal.permissions.scope_to_teams)

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model = models.ForeignKey(RegisteredModel, on_delete=models.PROTECT, related_name="promotions")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="promotions")
    target = models.CharField(max_length=8, choices=[(e, e) for e in PROMOTION_TARGETS])
    status = models.CharField(max_length=10, choices=PromotionStatus.choices, default=PromotionStatus.PENDING)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    reason = models.TextField()
    override_reason = models.TextField(blank=True, help_text="Why an incompatible signature may go ahead.")
    approvals_required = models.PositiveSmallIntegerField()
    metric_tolerance = models.FloatField()
    champion_version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.PROTECT,
                                         related_name="+", help_text="What served the target when requested.")
    gates = models.JSONField(default=list, blank=True)
    deployment = models.OneToOneField(Deployment, null=True, blank=True, on_delete=models.PROTECT,
                                      related_name="promotion")
    decided_at = models.DateTimeField(null=True, blank=True)
    approvers_notified_at = models.DateTimeField(
        null=True, blank=True, help_text="When approvers were asked to decide: at the request, or (a gate blocked it) "
        "when its last blocking gate cleared. Empty while it is blocked.")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "-created_at"], name="promotion_status")]
        constraints = [
            # At most one open request per version and target: the second click finds the first.
            models.UniqueConstraint(fields=["version", "target"], name="promotion_one_open",
                                    condition=models.Q(status__in=["pending", "approved", "deploying"])),
        ]

    def __str__(self) -> str:
        return f"{self.model.name} v{self.version.number} to {self.target} ({self.status})"


class ApprovalDecision(models.TextChoices):
    APPROVE = "approve", "Approved"
    REJECT = "reject", "Rejected"


class PromotionApproval(models.Model):
    promotion = models.ForeignKey(PromotionRequest, on_delete=models.CASCADE, related_name="approvals")
    approver = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    decision = models.CharField(max_length=8, choices=ApprovalDecision.choices)
    comment = models.TextField(blank=True)
    reauthenticated = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at"]
        constraints = [models.UniqueConstraint(fields=["promotion", "approver"], name="promotion_approval_once")]


class BatchStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    PLANNING = "planning", "Planning"
    SCORING = "scoring", "Scoring"
    ASSEMBLING = "assembling", "Assembling"
    DONE = "done", "Done"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


BATCH_ACTIVE = (BatchStatus.QUEUED, BatchStatus.PLANNING, BatchStatus.SCORING, BatchStatus.ASSEMBLING)


class BatchSchedule(models.Model):
    """A recurring batch job: on a cron schedule (Celery beat, database-backed), score a file or the newest file of
    a folder in the team's batch inbox of the artifact store. Each run is a :class:`BatchJob`."""

    team_path: ClassVar[str] = "model__team"  # whose team sees it (portal.permissions.scope_to_teams)

    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="batch_schedules")
    environment = models.CharField(max_length=8, choices=Environment.choices)
    name = models.CharField(max_length=100)
    location = models.CharField(max_length=400, help_text="A file or folder (ending in /) in the team's batch inbox.")
    cron = models.CharField(max_length=100, help_text="minute hour day-of-month month day-of-week, in UTC")
    id_column = models.CharField(max_length=200, blank=True)
    subject_column = models.CharField(max_length=200, blank=True)
    enabled = models.BooleanField(default=True)
    periodic_task = models.OneToOneField("django_celery_beat.PeriodicTask", null=True, blank=True,
                                         on_delete=models.SET_NULL, related_name="+")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["model", "name"]
        constraints = [models.UniqueConstraint(fields=["model", "name"], name="batch_schedule_unique_name")]

    def __str__(self) -> str:
        return f"{self.model.name}/{self.environment}: {self.name}"


class BatchJob(models.Model):
    """Predictions in bulk for one file, scored in chunks by as many workers as are running. The version (and its
    serving form) is pinned when the job is submitted; a later switch in the environment does not change it."""

    team_path: ClassVar[str] = "model__team"  # whose team sees it (portal.permissions.scope_to_teams)

    MAX_CHUNK_ATTEMPTS = 2  # a chunk whose worker died is run once more
    MAX_STEP_ATTEMPTS = 3  # planning, which a dying worker may also interrupt

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model = models.ForeignKey(RegisteredModel, on_delete=models.PROTECT, related_name="batch_jobs")
    environment = models.CharField(max_length=8, choices=Environment.choices)
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="batch_jobs")
    deployment = models.ForeignKey(Deployment, on_delete=models.PROTECT, related_name="batch_jobs")
    schedule = models.ForeignKey(BatchSchedule, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    input_blob = models.ForeignKey(Blob, on_delete=models.PROTECT, related_name="+")
    input_format = models.CharField(max_length=8)  # csv | parquet
    input_filename = models.CharField(max_length=255)
    columns = models.JSONField(default=list, blank=True)
    newline = models.CharField(max_length=2, default="\n")
    id_column = models.CharField(max_length=200, blank=True)
    subject_column = models.CharField(max_length=200, blank=True)
    prediction_column = models.CharField(max_length=220, default="prediction")
    prediction_id_column = models.CharField(max_length=220, default="prediction_id")
    max_error_share = models.FloatField(validators=[MinValueValidator(0.0), MaxValueValidator(1.0)])
    status = models.CharField(max_length=10, choices=BatchStatus.choices, default=BatchStatus.QUEUED)
    rows_total = models.BigIntegerField(null=True, blank=True)
    rows_done = models.BigIntegerField(default=0)
    rows_failed = models.BigIntegerField(default=0)
    rows_logged = models.BigIntegerField(default=0)
    chunks_total = models.PositiveIntegerField(default=0)
    chunks_done = models.PositiveIntegerField(default=0)
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    result_blob = models.ForeignKey(Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    errors_blob = models.ForeignKey(Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    request_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    scored_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["model", "-created_at"], name="batchjob_model_time"),
                   models.Index(fields=["status", "created_at"], name="batchjob_status")]

    def __str__(self) -> str:
        return f"batch {str(self.uid)[:8]} of {self.model.name}/{self.environment} ({self.status})"

    @property
    def progress(self) -> int:
        if self.status == BatchStatus.DONE:
            return 100
        if not self.rows_total:
            return 0
        return min(99, int(100 * self.rows_done / self.rows_total))

    @property
    def id_prefix(self) -> str:
        """Prediction ids are this job's 22 hex characters, the chunk's 4 and the row's 6: the same on a re-run."""
        return self.uid.hex[:22]


class ChunkStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    DONE = "done", "Done"


class BatchChunk(models.Model):
    job = models.ForeignKey(BatchJob, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    start = models.BigIntegerField()  # CSV: byte offset; Parquet: first row group
    end = models.BigIntegerField()
    source = models.CharField(max_length=255, blank=True)  # a re-cut Arrow IPC chunk file in the store
    rows_planned = models.BigIntegerField(default=0)
    rows = models.BigIntegerField(null=True, blank=True)  # as parsed and scored
    rows_failed = models.BigIntegerField(default=0)
    status = models.CharField(max_length=8, choices=ChunkStatus.choices, default=ChunkStatus.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    output_name = models.CharField(max_length=255, blank=True)
    errors_name = models.CharField(max_length=255, blank=True)
    log_name = models.CharField(max_length=255, blank=True)
    # The keys of the model's record answer (a DataFrame or dict) its part has a column for, in MLflow's JSON
    # order; [] when each row's prediction is one cell.
    output_keys = models.JSONField(default=list, blank=True)
    # Where the chunk's time went, in seconds: read (its bytes from the store), parse (rows to the model's input),
    # model (the model's call, with shipping the rows to a sandboxed host), format (the scored part), write.
    stage_seconds = models.JSONField(default=dict, blank=True)
    logged = models.BooleanField(default=False)
    worker = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="batch_chunk_unique_index")]

    def __str__(self) -> str:
        return f"chunk {self.index} of {self.job_id} ({self.status})"


class MlflowConnection(models.Model):
    """A team's MLflow tracking server: its registry's new versions are imported (a webhook registered on the server,
    signed with ``secret``, plus a periodic reconcile), and with ``write_back`` the versions live in an environment
    get that environment's alias (``dev``, ``stage``, ``prod``) and tags there. The secret is stored encrypted with
    the payload keys (``PORTAL_PAYLOAD_KEYS``) and never shown again after it is made."""

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="mlflow_connections")
    tracking_uri = models.CharField(max_length=500)  # http(s) without credentials (MLflow's own env vars carry those)
    secret_encrypted = models.TextField()
    webhook_id = models.CharField(max_length=64, blank=True)
    webhook_url = models.CharField(max_length=600, blank=True)
    write_back = models.BooleanField(default=True)
    active = models.BooleanField(default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    reconciled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "tracking_uri"], name="mlflow_connection_team_uri")]

    def __str__(self) -> str:
        return f"{self.team}: {self.tracking_uri}"


class MlflowSyncKind(models.TextChoices):
    IMPORT = "import", "Import a new MLflow version"
    ALIAS = "alias", "Set an environment's alias in MLflow"


class MlflowSyncStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    DONE = "done", "Done"
    DUPLICATE = "duplicate", "Already a version"
    REFUSED = "refused", "Refused by the scan"
    RETRYING = "retrying", "Failed; will retry"
    FAILED = "failed", "Failed; gave up"


class MlflowSyncJob(models.Model):
    """One piece of work between a connection and the portal, kept until it is done: importing version ``mlflow_version``
    of ``registered_model`` (one row per MLflow version: a webhook delivered twice, or found again by the reconcile,
    finds the row), or setting ``environment``'s alias on it. Failures stay visible with their error and retry with
    backoff until ``MAX_ATTEMPTS``."""

    team_path: ClassVar[str] = "connection__team"  # whose team sees it (portal.permissions.scope_to_teams)

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    connection = models.ForeignKey(MlflowConnection, on_delete=models.CASCADE, related_name="jobs")
    kind = models.CharField(max_length=8, choices=MlflowSyncKind.choices)
    registered_model = models.CharField(max_length=256)
    mlflow_version = models.CharField(max_length=32)
    environment = models.CharField(max_length=8, blank=True)  # alias jobs
    deployment = models.ForeignKey(Deployment, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model = models.ForeignKey(RegisteredModel, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="mlflow_jobs")
    version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    origin = models.CharField(max_length=16, default="webhook")  # webhook, reconcile, deployment
    status = models.CharField(max_length=10, choices=MlflowSyncStatus.choices, default=MlflowSyncStatus.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["connection", "registered_model", "mlflow_version"],
                                               condition=models.Q(kind="import"), name="mlflow_import_once")]
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.registered_model}/{self.mlflow_version} ({self.status})"


class EdgePackageStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Building"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


class EdgePackage(models.Model):
    """An offline package of one version for small devices, built by a worker (``registry.edge``): the version's
    proven ONNX form, optionally an int8 form that stays within ``PORTAL_EDGE_INT8_TOLERANCE`` of it on the reference
    rows, the ``portal_edge`` runner, and a manifest signed with the edge signing key. ``forms`` holds each form's
    file, size, metrics on the reference rows and latency per row; ``int8_note`` why there is no int8 form."""

    team_path: ClassVar[str] = "model__team"  # whose team sees it (portal.permissions.scope_to_teams)
    MAX_ATTEMPTS = 3

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model = models.ForeignKey(RegisteredModel, on_delete=models.PROTECT, related_name="edge_packages")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="edge_packages")
    int8_requested = models.BooleanField(default=True)
    status = models.CharField(max_length=8, choices=EdgePackageStatus.choices, default=EdgePackageStatus.QUEUED)
    progress = models.PositiveSmallIntegerField(default=0)
    log = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    forms = models.JSONField(default=list, blank=True)
    int8_note = models.TextField(blank=True)
    manifest = models.JSONField(default=dict, blank=True)
    blob = models.ForeignKey(Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    request_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["model", "-created_at"], name="edgepackage_model_time")]

    def __str__(self) -> str:
        return f"edge package {str(self.uid)[:8]} of {self.model.name} v{self.version.number} ({self.status})"


class EdgeDeviceToken(models.Model):
    """A device fleet's credential: uploads the predictions its runners stored while offline for one model, into
    that model's prediction log under ``environment``, and does nothing else. Only its SHA-256 is kept."""

    team_path: ClassVar[str] = "model__team"

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="edge_tokens")
    environment = models.CharField(max_length=8, choices=Environment.choices, default=Environment.PROD)
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16)
    key_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_report_at = models.DateTimeField(null=True, blank=True)
    records_received = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"device token {self.prefix}… for {self.model.name}"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
