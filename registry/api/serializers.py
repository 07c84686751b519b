from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from portal.environments import ENVIRONMENTS
from registry.models import MODEL_NAME_VALIDATOR, MlflowSource, ModelVersion, RegisteredModel
from registry.versions.selectors import aliases_of, environment_overview


def _username(user: Any) -> str | None:
    return user.get_username() if user is not None else None


class VersionSummarySerializer(serializers.ModelSerializer[ModelVersion]):
    sha256 = serializers.CharField(source="artifact_sha256")
    size = serializers.IntegerField(source="artifact_size")
    uploaded_by = serializers.SerializerMethodField()

    class Meta:
        model = ModelVersion
        fields = ["number", "status", "format", "sha256", "size", "metrics", "uploaded_by", "created_at"]

    def get_uploaded_by(self, obj: ModelVersion) -> str | None:
        return _username(obj.uploaded_by)


class ModelSerializer(serializers.ModelSerializer[RegisteredModel]):
    team = serializers.CharField(source="team.slug")
    created_by = serializers.SerializerMethodField()
    latest_version = serializers.IntegerField(read_only=True, required=False)

    class Meta:
        model = RegisteredModel
        fields = ["name", "team", "description", "tags", "created_by", "created_at", "latest_version"]

    def get_created_by(self, obj: RegisteredModel) -> str | None:
        return _username(obj.created_by)


class ModelDetailSerializer(ModelSerializer):
    versions = serializers.SerializerMethodField()
    environments = serializers.SerializerMethodField()
    aliases = serializers.SerializerMethodField(help_text="MLflow-style aliases set in the portal: name → version")

    class Meta(ModelSerializer.Meta):
        fields = [*ModelSerializer.Meta.fields, "versions", "environments", "aliases"]

    def get_aliases(self, obj: RegisteredModel) -> dict[str, int]:
        return {a["alias"]: a["version"] for a in aliases_of(models=[obj]).get(obj.pk, [])}

    def get_environments(self, obj: RegisteredModel) -> dict[str, Any]:
        return {env: {"champion": s["champion"], "challenger": s["challenger"], "mode": s["mode"],
                      "challenger_percent": s["challenger_percent"]}
                for env, s in environment_overview(model=obj).items()}

    def get_versions(self, obj: RegisteredModel) -> list[dict[str, Any]]:
        return list(VersionSummarySerializer(obj.versions.select_related("uploaded_by").order_by("-number"),
                                             many=True).data)


class ModelCreateInput(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=100, validators=[MODEL_NAME_VALIDATOR])
    team = serializers.SlugField(max_length=64)
    description = serializers.CharField(required=False, allow_blank=True, max_length=5000)
    tags = serializers.ListField(child=serializers.CharField(max_length=50), required=False, max_length=20)


class VersionUploadInput(serializers.Serializer[Any]):
    file = serializers.FileField(help_text="zip of an MLflow model directory, .skops, .onnx, .pkl or .joblib")
    reference_data = serializers.FileField(required=False, help_text="CSV or Parquet")
    metrics = serializers.CharField(required=False, allow_blank=True, help_text='JSON object, e.g. {"auc": 0.97}')
    sensitive_columns = serializers.CharField(required=False, allow_blank=True, max_length=100_000,
                                              help_text='JSON object, e.g. {"age": "personal", "diagnosis": "health"}')
    trained_on = serializers.CharField(required=False, allow_blank=True, max_length=10_000, help_text=(
        "the dataset snapshots the version was trained on: ids or SHA-256, comma-separated (your team's, ready)"))
    description = serializers.CharField(required=False, allow_blank=True, max_length=5000)
    mlflow_run_id = serializers.CharField(required=False, allow_blank=True, max_length=64)
    source = serializers.CharField(required=False, allow_blank=True, max_length=500)  # type: ignore[assignment]
    git_commit = serializers.RegexField(r"^[0-9a-fA-F]{7,64}$", required=False, allow_blank=True)
    training_data_hash = serializers.CharField(required=False, allow_blank=True, max_length=128)
    intended_use = serializers.CharField(required=False, allow_blank=True, max_length=10000)
    limitations = serializers.CharField(required=False, allow_blank=True, max_length=10000)
    ethical_considerations = serializers.CharField(required=False, allow_blank=True, max_length=10000)


class TrustDecisionInput(serializers.Serializer[Any]):
    trust = serializers.BooleanField()
    reason = serializers.CharField(max_length=2000)
    remember_for_team = serializers.BooleanField(required=False, default=False)


class DeployInput(serializers.Serializer[Any]):
    environment = serializers.ChoiceField(choices=ENVIRONMENTS)
    strategy = serializers.ChoiceField(choices=["replace", "canary", "shadow"], default="replace")
    traffic_percent = serializers.IntegerField(min_value=1, max_value=100, default=100)
    reason = serializers.CharField(required=False, allow_blank=True, max_length=2000)


class DeploymentSerializer(serializers.Serializer[Any]):
    id = serializers.UUIDField(source="uid")
    model = serializers.CharField(source="model.name")
    version = serializers.IntegerField(source="version.number")
    environment = serializers.CharField()
    strategy = serializers.CharField()
    traffic_percent = serializers.IntegerField()
    status = serializers.CharField()
    progress = serializers.IntegerField()
    error = serializers.CharField()
    log = serializers.JSONField()
    serving_kind = serializers.CharField()
    attempts = serializers.IntegerField()
    requested_by = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)

    def get_requested_by(self, obj: Any) -> str | None:
        return _username(obj.requested_by)


class MlflowSourceSerializer(serializers.ModelSerializer[MlflowSource]):
    """Where an imported version came from: the tracking server (without credentials), run, experiment, logged
    model, tags and every logged value of each metric (``[[step, timestamp_ms, value or null], ...]``)."""

    run_url = serializers.CharField(read_only=True)
    metric_history = serializers.DictField(child=serializers.ListField(child=serializers.ListField()))
    missing_metrics = serializers.ListField(child=serializers.CharField())
    tags = serializers.DictField(child=serializers.CharField())

    class Meta:
        model = MlflowSource
        fields = ["uri", "tracking_uri", "artifact_uri", "registered_model", "registered_version", "logged_model_id",
                  "run_id", "run_name", "run_url", "experiment_id", "experiment_name", "tags", "metric_history",
                  "missing_metrics"]


def mlflow_source_data(version: ModelVersion) -> dict[str, Any] | None:
    try:
        source = version.mlflow_source
    except MlflowSource.DoesNotExist:
        return None
    return dict(MlflowSourceSerializer(source).data)


class VersionSerializer(serializers.ModelSerializer[ModelVersion]):
    model = serializers.CharField(source="model.name")  # type: ignore[assignment]
    sha256 = serializers.CharField(source="artifact_sha256")
    size = serializers.IntegerField(source="artifact_size")
    uploaded_by = serializers.SerializerMethodField()
    lineage = serializers.SerializerMethodField()
    model_card = serializers.SerializerMethodField()
    scan = serializers.SerializerMethodField()
    reference_data = serializers.SerializerMethodField()
    mlflow_source = serializers.SerializerMethodField()
    importance = serializers.SerializerMethodField(help_text=(
        "The version's global SHAP importance, computed in the sandbox after the scan: method, approximate, the "
        "output explained, cost and every feature's mean |SHAP| and share; {\"pending\": true} until computed, "
        "{\"error\": why} when none could be, null for a version scanned before explanations existed."))

    class Meta:
        model = ModelVersion
        fields = ["model", "number", "status", "status_detail", "sha256", "size", "format", "flavors", "signature",
                  "input_example", "metrics", "params", "description", "tags", "sensitive_columns", "uploaded_by",
                  "created_at", "lineage",
                  "model_card", "scan", "reference_data", "mlflow_source", "importance"]

    def get_uploaded_by(self, obj: ModelVersion) -> str | None:
        return _username(obj.uploaded_by)

    def get_lineage(self, obj: ModelVersion) -> dict[str, str]:
        return {"mlflow_run_id": obj.mlflow_run_id, "source": obj.source, "git_commit": obj.git_commit,
                "training_data_hash": obj.training_data_hash}

    def get_model_card(self, obj: ModelVersion) -> dict[str, str]:
        return {"intended_use": obj.intended_use, "limitations": obj.limitations,
                "ethical_considerations": obj.ethical_considerations}

    def get_scan(self, obj: ModelVersion) -> dict[str, Any]:
        return {"findings": obj.scan_findings, "untrusted_types": obj.untrusted_types,
                "trust_state": obj.trust_state, "trust_decided_by": _username(obj.trust_decided_by),
                "trust_decided_at": obj.trust_decided_at, "trust_reason": obj.trust_reason,
                "scanned_at": obj.scanned_at, "sandbox": obj.sandbox_report}

    @extend_schema_field(MlflowSourceSerializer(allow_null=True))
    def get_mlflow_source(self, obj: ModelVersion) -> dict[str, Any] | None:
        """Null for a version that was uploaded rather than imported from MLflow."""
        return mlflow_source_data(obj)

    def get_importance(self, obj: ModelVersion) -> dict[str, Any] | None:
        data = obj.explanation or {}
        if not data:
            return None
        if data.get("pending"):
            return {"pending": True}
        if data.get("error"):
            return {"error": str(data["error"])}
        return {"method": data.get("method", ""), "approximate": bool(data.get("approximate")),
                "output": data.get("output", ""), "cost": data.get("cost") or {}, "note": data.get("note", ""),
                "features": [{"name": str(f["name"]), "mean_abs": float(f.get("mean_abs") or 0),
                              "share": float(f.get("share") or 0)} for f in data.get("features") or []]}

    def get_reference_data(self, obj: ModelVersion) -> dict[str, Any] | None:
        ref = obj.reference
        if ref is None:
            return None
        return {"sha256": ref.blob.sha256, "size": ref.blob.size, "format": ref.format, "rows": ref.rows,
                "profile": ref.profile}
