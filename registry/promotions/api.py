"""REST API of promotion: requests, the approval queue, decisions, rollback, the serving history."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api.pagination import PortalPagination, paginated
from portal.permissions import require_capability
from registry.api.serializers import DeploymentSerializer, _username
from registry.models import PromotionRequest, PromotionStatus
from registry.promotions import services as promotions
from registry.versions import selectors


class PromoteInput(serializers.Serializer[Any]):
    target = serializers.ChoiceField(choices=["stage", "prod"])
    reason = serializers.CharField(max_length=5000)
    override_reason = serializers.CharField(required=False, allow_blank=True, max_length=5000,
                                            help_text="Why an incompatible signature may go ahead (audited).")


class DecisionInput(serializers.Serializer[Any]):
    comment = serializers.CharField(required=False, allow_blank=True, max_length=5000)
    password = serializers.CharField(required=False, allow_blank=True, max_length=512, trim_whitespace=False,
                                     help_text="Your password; required to approve a promotion to prod.")


class RollbackInput(serializers.Serializer[Any]):
    to_version = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    reason = serializers.CharField(max_length=5000)


class PromotionSerializer(serializers.Serializer[Any]):
    id = serializers.UUIDField(source="uid")
    model = serializers.CharField(source="model.name")
    version = serializers.IntegerField(source="version.number")
    target = serializers.CharField()
    status = serializers.CharField()
    reason = serializers.CharField()
    override_reason = serializers.CharField()
    requested_by = serializers.SerializerMethodField()
    uploaded_by = serializers.SerializerMethodField()
    approvals_required = serializers.IntegerField()
    metric_tolerance = serializers.FloatField()
    champion_version = serializers.SerializerMethodField()
    gates = serializers.JSONField()
    approvals = serializers.SerializerMethodField()
    deployment = serializers.SerializerMethodField()
    blocked = serializers.SerializerMethodField(help_text=(
        "Pending and a gate blocks it: approvers have not been notified and will be when every gate passes."))
    approvers_notified_at = serializers.DateTimeField(allow_null=True, help_text=(
        "When approvers were asked to decide; null while the request is blocked."))
    created_at = serializers.DateTimeField()
    decided_at = serializers.DateTimeField(allow_null=True)

    def get_blocked(self, obj: PromotionRequest) -> bool:
        return obj.status == PromotionStatus.PENDING and obj.approvers_notified_at is None

    def get_requested_by(self, obj: PromotionRequest) -> str | None:
        return _username(obj.requested_by)

    def get_uploaded_by(self, obj: PromotionRequest) -> str | None:
        return _username(obj.version.uploaded_by)

    def get_champion_version(self, obj: PromotionRequest) -> int | None:
        return obj.champion_version.number if obj.champion_version else None

    def get_approvals(self, obj: PromotionRequest) -> list[dict[str, Any]]:
        return [{"approver": a.approver.get_username(), "decision": a.decision, "comment": a.comment,
                 "reauthenticated": a.reauthenticated, "at": a.created_at}
                for a in obj.approvals.all()]  # prefetched with their approvers

    def get_deployment(self, obj: PromotionRequest) -> dict[str, Any] | None:
        return dict(DeploymentSerializer(obj.deployment).data) if obj.deployment else None


class PromotionDetailSerializer(PromotionSerializer):
    review = serializers.SerializerMethodField(help_text=(
        "What an approver decides on: gates as they stand now, the baseline the candidate is judged against, the "
        "recorded metrics against it, whether the reason agrees with them, and what blocks an approval."))

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_review(self, obj: PromotionRequest) -> dict[str, Any]:
        review = promotions.promotion_review(obj)
        return {key: review[key] for key in ("blockers", "baseline", "metric_rows", "reason_check", "approvable",
                                            "min_predictions")}


def _promotion(request: Request, uid: str) -> PromotionRequest:
    require_capability(request.user, "view_models")
    try:
        return promotions.promotion_queue(user=request.user).filter(uid=uid).get()
    except (DjangoValidationError, PromotionRequest.DoesNotExist) as exc:
        raise Http404("Not found.") from exc


class PromoteApi(APIView):
    @extend_schema(request=PromoteInput, responses={201: PromotionSerializer},
                   summary="Request a promotion to stage or prod; the gates are evaluated at once")
    def post(self, request: Request, name: str, number: int) -> Response:
        version = selectors.version_get(user=request.user, name=name, number=number, action="request_promotion")
        data = PromoteInput(data=request.data)
        data.is_valid(raise_exception=True)
        promotion = promotions.promotion_request(version=version, target=data.validated_data["target"],
                                                 reason=data.validated_data["reason"], actor=request.user,
                                                 override_reason=data.validated_data.get("override_reason", ""))
        return Response(PromotionSerializer(promotion).data, status=status.HTTP_201_CREATED)


class PromotionListApi(APIView):
    @extend_schema(parameters=[OpenApiParameter("status", OpenApiTypes.STR, enum=PromotionStatus.values),
                               OpenApiParameter("model", OpenApiTypes.STR)],
                   responses=paginated(PromotionSerializer, "PaginatedPromotionList"),
                   operation_id="v1_promotions_list", summary="Promotion requests; ?status=pending is the queue")
    def get(self, request: Request) -> Response:
        require_capability(request.user, "view_models")
        wanted = request.query_params.get("status", "")
        if wanted and wanted not in PromotionStatus.values:
            raise ValidationError({"status": f"Use one of {', '.join(PromotionStatus.values)}."})
        qs = promotions.promotion_queue(user=request.user, status=wanted)
        if request.query_params.get("model"):
            qs = qs.filter(model__name=request.query_params["model"])
        paginator = PortalPagination()
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(PromotionSerializer(page, many=True).data)


class PromotionDetailApi(APIView):
    @extend_schema(responses=PromotionDetailSerializer,
                   summary="One promotion request with its gates, approvals and review (baseline, reason check, "
                           "what blocks an approval)")
    def get(self, request: Request, uid: str) -> Response:
        return Response(PromotionDetailSerializer(_promotion(request, uid)).data)


class PromotionEvidenceApi(APIView):
    @extend_schema(parameters=[OpenApiParameter("window", OpenApiTypes.STR, enum=list(promotions.EVIDENCE_WINDOWS),
                                                description="How far back the figures go (default 24h)")],
                   responses=OpenApiTypes.OBJECT,
                   summary="Live evidence: the candidate where it served against the target's champion, with "
                           "each figure's threshold and pass/warn (what the promotion page shows)")
    def get(self, request: Request, uid: str) -> Response:
        promotion = _promotion(request, uid)
        window = request.query_params.get("window", "24h")
        evidence = promotions.live_evidence(promotion=promotion, window=window)
        if evidence is None:
            raise ValidationError({"window": "Monitoring is not installed, so there is no live evidence."})
        return Response({"promotion": str(promotion.uid), **evidence})


class _DecisionApi(APIView):
    approve = True

    def post(self, request: Request, uid: str) -> Response:
        promotion = _promotion(request, uid)
        data = DecisionInput(data=request.data)
        data.is_valid(raise_exception=True)
        promotion = promotions.promotion_decide(promotion=promotion, actor=request.user, approve=self.approve,
                                                comment=data.validated_data.get("comment", ""),
                                                password=data.validated_data.get("password", ""),
                                                request=request._request)
        return Response(PromotionSerializer(_promotion(request, str(promotion.uid))).data)


class PromotionApproveApi(_DecisionApi):
    approve = True

    @extend_schema(request=DecisionInput, responses=PromotionSerializer,
                   summary="Approve (not your own request or upload); prod needs your password")
    def post(self, request: Request, uid: str) -> Response:
        return super().post(request, uid)


class PromotionRejectApi(_DecisionApi):
    approve = False

    @extend_schema(request=DecisionInput, responses=PromotionSerializer, summary="Reject, with a comment")
    def post(self, request: Request, uid: str) -> Response:
        return super().post(request, uid)


class PromotionCancelApi(APIView):
    @extend_schema(request=None, responses=PromotionSerializer, summary="Cancel your own pending request")
    def post(self, request: Request, uid: str) -> Response:
        promotion = promotions.promotion_cancel(promotion=_promotion(request, uid), actor=request.user)
        return Response(PromotionSerializer(promotion).data)


class RollbackApi(APIView):
    @extend_schema(request=RollbackInput, responses={202: DeploymentSerializer},
                   summary="Roll back to the previously live version, or a chosen one that served there")
    def post(self, request: Request, name: str, env: str) -> Response:
        model = selectors.model_get(user=request.user, name=name, action="view_models")
        data = RollbackInput(data=request.data)
        data.is_valid(raise_exception=True)
        deployment = promotions.environment_rollback(model=model, environment=env,
                                                     to_version=data.validated_data.get("to_version"),
                                                     reason=data.validated_data["reason"], actor=request.user)
        return Response(DeploymentSerializer(deployment).data, status=status.HTTP_202_ACCEPTED)


class HistoryApi(APIView):
    @extend_schema(parameters=[OpenApiParameter("at", OpenApiTypes.DATETIME,
                                                description="ISO time: answer what served then")],
                   responses=OpenApiTypes.OBJECT, summary="Every version that served an environment, or the one at T")
    def get(self, request: Request, name: str, env: str) -> Response:
        model = selectors.model_get(user=request.user, name=name, action="view_models")
        env = selectors.environment_param(env)
        at_raw = request.query_params.get("at")
        if at_raw:
            at = promotions.parse_at(at_raw, naive_is_utc=False)
            return Response({"model": model.name, "environment": env, **promotions.serving_at(model, env, at)})
        return Response({"model": model.name, "environment": env,
                         "history": promotions.serving_history(model, env)})
