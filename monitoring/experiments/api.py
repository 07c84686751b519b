"""The experiments' REST API: plan, start, list, read, change guardrails, stop."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from monitoring.experiments import selectors, services
from monitoring.experiments.models import ExperimentStatus, Metric
from portal.api.pagination import PortalPagination
from portal.permissions import require_capability
from registry.versions import selectors as registry_selectors


class GuardrailsInput(serializers.Serializer[Any]):
    error_rate_max = serializers.FloatField(required=False, allow_null=True, min_value=0.0, max_value=1.0,
                                            help_text="the challenger's error rate limit (0.05 = 5 %)")
    latency_p99_ms = serializers.FloatField(required=False, allow_null=True, min_value=0.001,
                                            help_text="the challenger's latency p99 limit, ms")
    drift_psi_max = serializers.FloatField(required=False, allow_null=True, min_value=0.0001,
                                           help_text="the challenger's worst input drift (PSI) limit")


class ExperimentInput(serializers.Serializer[Any]):
    model = serializers.CharField(max_length=100)
    environment = serializers.CharField(max_length=8)
    metric = serializers.CharField(max_length=10, help_text=f"one of {', '.join(Metric.values)}")
    mde = serializers.FloatField(help_text="minimum detectable effect in the metric's units (0.02 = two accuracy "
                                           "points)")
    alpha = serializers.FloatField(required=False, default=0.05, help_text="significance level (0.001 to 0.2)")
    traffic_percent = serializers.IntegerField(required=False, allow_null=True, default=None,
                                               help_text="the challenger's share, 1-99; default: the canary's now")
    guardrails = GuardrailsInput(required=False, allow_null=True, default=None,
                                 help_text="limits on the challenger; a missing one takes the model's monitoring "
                                           "threshold, null turns it off")
    name = serializers.CharField(required=False, allow_blank=True, default="", max_length=200)
    segment_column = serializers.CharField(required=False, allow_blank=True, default="", max_length=200,
                                           help_text="a categorical input column: the analysis then shows each of "
                                                     "its segments too (at most 20 categories)")


class ExperimentChangeInput(serializers.Serializer[Any]):
    guardrails = GuardrailsInput(required=False)
    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    traffic_percent = serializers.IntegerField(required=False, help_text=(
        "the challenger's new share, 1-99: the router sends it that share from now on (audited with the change)"))


class StopInput(serializers.Serializer[Any]):
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=1000)
    stop_traffic = serializers.BooleanField(required=False, default=False,
                                            help_text="also send all traffic back to the champion")


def _guardrails(data: dict[str, Any]) -> dict[str, Any] | None:
    raw = data.get("guardrails")
    return dict(raw) if raw is not None else None


class ExperimentListApi(APIView):
    pagination_class = PortalPagination

    @extend_schema(parameters=[
        OpenApiParameter("status", OpenApiTypes.STR, enum=[*ExperimentStatus.values, "all"]),
        OpenApiParameter("model", OpenApiTypes.STR), OpenApiParameter("environment", OpenApiTypes.STR)],
        operation_id="v1_experiments_list", responses=OpenApiTypes.OBJECT,
        summary="A/B experiments of the models you may see, newest first")
    def get(self, request: Request) -> Response:
        require_capability(request.user, "view_monitoring")
        qs = selectors.experiments_for(user=request.user)
        wanted = request.query_params.get("status", "all")
        if wanted in ExperimentStatus.values:
            qs = qs.filter(status=wanted)
        elif wanted != "all":
            raise serializers.ValidationError({"status": "Use running, ended or all."})
        if request.query_params.get("model"):
            qs = qs.filter(model__name=request.query_params["model"])
        if request.query_params.get("environment"):
            qs = qs.filter(environment=request.query_params["environment"])
        paginator = PortalPagination()
        page = paginator.paginate_queryset(qs.select_related("started_by"), request, view=self)
        return paginator.get_paginated_response([selectors.experiment_json(e) for e in page or []])

    @extend_schema(request=ExperimentInput, responses={201: OpenApiTypes.OBJECT},
                   summary="Start an A/B experiment of an environment's champion against its canary challenger")
    def post(self, request: Request) -> Response:
        data = ExperimentInput(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        model = registry_selectors.model_get(user=request.user, name=v["model"], action="view_monitoring")
        experiment = services.experiment_start(
            model=model, environment=v["environment"], metric=v["metric"], mde=v["mde"], alpha=v["alpha"],
            traffic_percent=v["traffic_percent"], guardrails=_guardrails(v), name=v["name"],
            segment_column=v["segment_column"], actor=request.user)
        return Response(selectors.experiment_json(experiment), status=status.HTTP_201_CREATED)


class ExperimentPlanApi(APIView):
    @extend_schema(parameters=[
        OpenApiParameter("model", OpenApiTypes.STR, required=True),
        OpenApiParameter("environment", OpenApiTypes.STR, required=True),
        OpenApiParameter("metric", OpenApiTypes.STR, required=True, enum=Metric.values),
        OpenApiParameter("mde", OpenApiTypes.NUMBER, required=True),
        OpenApiParameter("alpha", OpenApiTypes.NUMBER), OpenApiParameter("traffic_percent", OpenApiTypes.INT)],
        responses=OpenApiTypes.OBJECT,
        summary="The sample an experiment needs (80 % power at the MDE) and the days that takes at today's traffic")
    def get(self, request: Request) -> Response:
        q = request.query_params
        model = registry_selectors.model_get(user=request.user, name=q.get("model", "")[:100],
                                             action="view_monitoring")
        environment = registry_selectors.environment_param(q.get("environment", ""))
        try:
            mde = float(q.get("mde", ""))
            alpha = float(q.get("alpha", "0.05"))
        except ValueError:
            raise serializers.ValidationError({"mde": "Give mde (and alpha) as numbers."}) from None
        share = q.get("traffic_percent")
        if share is not None and not share.isdigit():
            raise serializers.ValidationError({"traffic_percent": "A whole percentage from 1 to 99."})
        state = services._canary_state(model, environment)
        plan = services.experiment_plan(model=model, environment=environment, metric=q.get("metric", ""), mde=mde,
                                        alpha=alpha, traffic_percent=int(share) if share else
                                        state.challenger_percent)
        plan.pop("champion")
        plan.pop("challenger_id")
        return Response(plan)


class ExperimentDetailApi(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT,
                   summary="One experiment: settings, verdict in one sentence, per-arm counts, the difference with its "
                           "always-valid interval over time, SRM and guardrails")
    def get(self, request: Request, uid: str) -> Response:
        return Response(selectors.experiment_json(selectors.experiment_get(user=request.user, uid=uid)))

    @extend_schema(request=ExperimentChangeInput, responses=OpenApiTypes.OBJECT,
                   summary="Change a running experiment's guardrails, name or traffic share (audited; a new share is "
                           "what the router gives the challenger from then on)")
    def patch(self, request: Request, uid: str) -> Response:
        experiment = selectors.experiment_get(user=request.user, uid=uid)
        data = ExperimentChangeInput(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        experiment = services.experiment_settings_change(
            experiment=experiment, actor=request.user, guardrails=_guardrails(v) if "guardrails" in v else None,
            name=v.get("name"), traffic_percent=v.get("traffic_percent"))
        return Response(selectors.experiment_json(experiment))


class ExperimentStopApi(APIView):
    @extend_schema(request=StopInput, responses=OpenApiTypes.OBJECT,
                   summary="Stop a running experiment before its verdict (audited); optionally stop the challenger's "
                           "traffic")
    def post(self, request: Request, uid: str) -> Response:
        experiment = selectors.experiment_get(user=request.user, uid=uid)
        data = StopInput(data=request.data)
        data.is_valid(raise_exception=True)
        experiment = services.experiment_stop(experiment=experiment, actor=request.user,
                                              reason=data.validated_data["reason"],
                                              stop_traffic=data.validated_data["stop_traffic"])
        return Response(selectors.experiment_json(experiment))
