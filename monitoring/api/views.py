"""Ground truth arriving late: ``POST /api/v1/serve/{name}/{env}/feedback``."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from monitoring.feedback import REFUSALS_LISTED, feedback_receive
from monitoring.gdpr import subject_erase, subject_export
from monitoring.sensitive import recent_predictions
from portal.permissions import require_capability
from registry.versions import selectors

MAX_FEEDBACK = 10_000


class FeedbackItem(serializers.Serializer[Any]):
    prediction_id = serializers.RegexField(r"^[0-9a-f]{32}$", error_messages={
        "invalid": "prediction_id is the 32-character id the prediction returned."})
    actual = serializers.JSONField()


class FeedbackApi(APIView):
    @extend_schema(request=FeedbackItem(many=True), responses={202: inline_serializer("FeedbackReceipt", {
        "accepted": serializers.IntegerField(help_text="items attached to predictions of this model and environment"),
        "refused": serializers.IntegerField(help_text="items whose prediction is not one of this model and "
                                                      "environment (or not logged yet); nothing was written for them"),
        "refusals": serializers.ListField(child=serializers.DictField(), help_text=(
            f"the first {REFUSALS_LISTED} refused items: index in the request, prediction_id, reason")),
    })}, summary="Attach ground truth to predictions of this model and environment by id, in bulk; later values "
                 "replace earlier ones; items for other predictions are refused one by one")
    def post(self, request: Request, name: str, env: str) -> Response:
        selectors.environment_param(env)
        model = selectors.model_get(user=request.user, name=name, action="score")
        if not isinstance(request.data, list):
            raise serializers.ValidationError({"body": "Send a JSON list of {prediction_id, actual} objects."})
        if len(request.data) > MAX_FEEDBACK:
            raise serializers.ValidationError({"body": f"At most {MAX_FEEDBACK} items per request."})
        items = FeedbackItem(data=request.data, many=True)
        items.is_valid(raise_exception=True)
        receipt = feedback_receive(model=model, environment=env, items=list(items.validated_data), actor=request.user)
        return Response(receipt.as_dict(), status=status.HTTP_202_ACCEPTED)


class ErasureInput(serializers.Serializer[Any]):
    subject_id = serializers.CharField(max_length=256, trim_whitespace=False)
    reason = serializers.CharField(required=False, allow_blank=True, max_length=1000)


class SubjectExportApi(APIView):
    @extend_schema(responses={200: OpenApiTypes.OBJECT},
                   summary="Everything held about a data subject (GDPR Art. 15); audited")
    def get(self, request: Request, subject_id: str) -> Response:
        if len(subject_id) > 256:
            raise serializers.ValidationError({"subject_id": "A subject id has at most 256 characters."})
        return Response(subject_export(subject_id=subject_id, actor=request.user))


class ErasureApi(APIView):
    @extend_schema(request=ErasureInput, responses={200: OpenApiTypes.OBJECT},
                   summary="Erase a data subject's payloads everywhere (GDPR Art. 17); returns an audited receipt")
    def post(self, request: Request) -> Response:
        require_capability(request.user, "manage_subjects")  # before the body is looked at: no hints to others
        data = ErasureInput(data=request.data)
        data.is_valid(raise_exception=True)
        return Response(subject_erase(subject_id=data.validated_data["subject_id"], actor=request.user,
                                      reason=data.validated_data.get("reason", "")))


class RecentPredictionsApi(APIView):
    @extend_schema(responses={200: OpenApiTypes.OBJECT},
                   summary="The latest predictions with their inputs; sensitive columns masked without view_sensitive; "
                           "audited")
    def get(self, request: Request, name: str, env: str) -> Response:
        selectors.environment_param(env)
        model = selectors.model_get(user=request.user, name=name, action="view_monitoring")
        raw = request.query_params.get("limit", "50")
        if not raw.isdigit() or not 1 <= int(raw) <= 500:
            raise serializers.ValidationError({"limit": "Give a number from 1 to 500."})
        return Response(recent_predictions(model=model, environment=env, actor=request.user, limit=int(raw)))
