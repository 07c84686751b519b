"""Monitoring API: a model environment's numbers over a time range, alerts, and per-model thresholds."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from monitoring import alerts, selectors
from monitoring.models import Alert, AlertStatus, MonitoringSettings
from portal.api.pagination import PortalPagination
from portal.permissions import require_capability, scope_to_teams
from registry.versions import selectors as registry_selectors


class Conflict(exceptions.APIException):
    status_code = 409
    default_code = "conflict"
    default_detail = "The alert is not in a state that allows this."


class MonitoringApi(APIView):
    @extend_schema(parameters=[
        OpenApiParameter("from", OpenApiTypes.DATETIME, description="Start (ISO 8601); default: 24 hours before to"),
        OpenApiParameter("to", OpenApiTypes.DATETIME, description="End (ISO 8601); default: now"),
        OpenApiParameter("range", OpenApiTypes.STR, enum=list(selectors.RANGES),
                         description="A preset instead of from/to"),
        OpenApiParameter("version", OpenApiTypes.INT,
                         description="Whose figures: a version number; default the version serving now")],
        responses=OpenApiTypes.OBJECT,
        summary="Accuracy, latency p50/p95/p99, throughput, error rate and per-feature drift of one version (the "
                "serving one by default) over a time range")
    def get(self, request: Request, name: str, env: str) -> Response:
        registry_selectors.environment_param(env)
        model = registry_selectors.model_get(user=request.user, name=name, action="view_monitoring")
        try:
            start, end = selectors.parse_range(request.query_params)
        except ValueError as exc:
            raise serializers.ValidationError({"range": str(exc)}) from None
        try:
            version = selectors.version_param(model, request.query_params.get("version"))
        except ValueError as exc:
            raise serializers.ValidationError({"version": str(exc)}) from None
        from monitoring import attribution

        summary = selectors.monitoring_summary(model=model, environment=env, start=start, end=end, version=version)
        # The latest attribution-drift measurement in the environment (of the version serving when it was taken).
        summary["attribution_drift"] = attribution.record_json(attribution.latest(model, env))
        return Response(summary)


class AlertListApi(APIView):
    @extend_schema(parameters=[
        OpenApiParameter("status", OpenApiTypes.STR, enum=["open", *AlertStatus.values, "all"],
                         description="open (default): firing or acknowledged"),
        OpenApiParameter("model", OpenApiTypes.STR), OpenApiParameter("environment", OpenApiTypes.STR)],
        responses=OpenApiTypes.OBJECT, summary="Alerts of the models you may see, newest first")
    def get(self, request: Request) -> Response:
        require_capability(request.user, "view_monitoring")
        wanted = request.query_params.get("status", "open")
        qs = scope_to_teams(Alert.objects.select_related("model", "acknowledged_by"), request.user)
        if wanted == "open":
            qs = qs.exclude(status=AlertStatus.RESOLVED)
        elif wanted in AlertStatus.values:
            qs = qs.filter(status=wanted)
        elif wanted != "all":
            raise serializers.ValidationError({"status": "Use open, firing, acknowledged, resolved or all."})
        if request.query_params.get("model"):
            qs = qs.filter(model__name=request.query_params["model"])
        if request.query_params.get("environment"):
            qs = qs.filter(environment=request.query_params["environment"])
        paginator = PortalPagination()
        page = paginator.paginate_queryset(qs.order_by("-opened_at"), request, view=self) or []
        return paginator.get_paginated_response([{**selectors.alert_json(a), "model": a.model.name,
                                                  "environment": a.environment} for a in page])


class AcknowledgeInput(serializers.Serializer[Any]):
    comment = serializers.CharField(required=False, allow_blank=True, max_length=1000)


class ResolveInput(serializers.Serializer[Any]):
    resolution = serializers.CharField(max_length=2000)



class AlertAcknowledgeApi(APIView):
    @extend_schema(request=AcknowledgeInput, responses=OpenApiTypes.OBJECT,
                   summary="Acknowledge a firing alert (someone is on it); audited")
    def post(self, request: Request, uid: str) -> Response:
        alert = selectors.alert_get(user=request.user, uid=uid)
        data = AcknowledgeInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            alert = alerts.alert_acknowledge(alert=alert, actor=request.user,
                                             comment=data.validated_data.get("comment", ""))
        except alerts.AlertError as exc:
            raise Conflict(str(exc)) from None
        return Response(selectors.alert_json(alert))


class AlertResolveApi(APIView):
    @extend_schema(request=ResolveInput, responses=OpenApiTypes.OBJECT,
                   summary="Resolve an open alert with a note; audited")
    def post(self, request: Request, uid: str) -> Response:
        alert = selectors.alert_get(user=request.user, uid=uid)
        data = ResolveInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            alert = alerts.alert_resolve(alert=alert, actor=request.user,
                                         resolution=data.validated_data["resolution"])
        except alerts.AlertError as exc:
            raise Conflict(str(exc)) from None
        return Response(selectors.alert_json(alert))


class SettingsInput(serializers.Serializer[Any]):
    thresholds = serializers.DictField(child=serializers.JSONField(), required=False, default=dict)
    target_column = serializers.CharField(required=False, allow_blank=True, max_length=200)


class MonitoringSettingsApi(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT, summary="A model's drift and alert thresholds (with the defaults)")
    def get(self, request: Request, name: str) -> Response:
        model = registry_selectors.model_get(user=request.user, name=name, action="view_monitoring")
        row = MonitoringSettings.objects.filter(model=model).first()
        return Response({"thresholds": row.thresholds if row else {}, "target_column": row.target_column if row
                         else "", "effective": selectors.thresholds_for(model),
                         "defaults": alerts.thresholds_defaults()})

    @extend_schema(request=SettingsInput, responses=OpenApiTypes.OBJECT,
                   summary="Replace a model's thresholds (unset names use the defaults); audited")
    def put(self, request: Request, name: str) -> Response:
        model = registry_selectors.model_get(user=request.user, name=name, action="manage_alerts")
        data = SettingsInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            alerts.monitoring_settings_change(model=model, thresholds=data.validated_data["thresholds"],
                                              target_column=data.validated_data.get("target_column"),
                                              actor=request.user)
        except alerts.AlertError as exc:
            raise serializers.ValidationError({"thresholds": str(exc)}) from None
        return self.get(request, name)
