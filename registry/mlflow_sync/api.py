"""REST API of the MLflow integration: connect a team's tracking server, and the webhook MLflow calls."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api.errors import error_body
from portal.models import Team
from portal.permissions import get_object_for_user, require_capability, scope_to_teams
from registry.mlflow_sync import services
from registry.models import MlflowConnection
from registry.versions.mlflow_import import TrackingServerUnavailable


class ConnectionInput(serializers.Serializer[Any]):
    tracking_uri = serializers.CharField(max_length=500, help_text="The tracking server, e.g. http://mlflow:5000")
    team = serializers.SlugField(help_text="The team whose models the server's versions become")
    write_back = serializers.BooleanField(default=True, help_text="Set dev/stage/prod aliases and approval tags "
                                                                  "in MLflow when a version goes live")
    portal_url = serializers.URLField(required=False, allow_blank=True, max_length=300,
                                      help_text="The portal's address as the tracking server reaches it "
                                                "(default: PORTAL_BASE_URL)")


class ConnectionSerializer(serializers.ModelSerializer[MlflowConnection]):
    id = serializers.UUIDField(source="uid", read_only=True)
    team = serializers.CharField(source="team.slug")

    class Meta:
        model = MlflowConnection
        fields = ["id", "team", "tracking_uri", "webhook_id", "webhook_url", "write_back", "active", "created_at",
                  "reconciled_at"]


class MlflowConnectionsApi(APIView):
    @extend_schema(responses=ConnectionSerializer(many=True), summary="The MLflow connections of the teams the caller manages")
    def get(self, request: Request) -> Response:
        require_capability(request.user, "manage_teams")
        qs = scope_to_teams(MlflowConnection.objects.select_related("team"), request.user)
        return Response(ConnectionSerializer(qs.order_by("team__slug", "tracking_uri"), many=True).data)

    @extend_schema(request=ConnectionInput, responses={201: ConnectionSerializer},
                   summary="Connect a team to an MLflow tracking server: registers the portal's webhook there "
                           "(model_version.created, model_version_alias.created) through MLflow's own client "
                           "(team managers; audited as mlflow.connect)")
    def post(self, request: Request) -> Response:
        require_capability(request.user, "manage_teams")
        data = ConnectionInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        team = get_object_for_user(request.user, Team.objects.all(), action="manage_teams", slug=values["team"])
        try:
            connection = services.mlflow_connect(team=team, tracking_uri=values["tracking_uri"],
                                                 write_back=values["write_back"], actor=request.user,
                                                 portal_url=values.get("portal_url", ""))
        except TrackingServerUnavailable as exc:
            return Response(error_body("mlflow_unavailable", str(exc), {"tracking_uri": exc.tracking_uri}),
                            status=status.HTTP_503_SERVICE_UNAVAILABLE)
        return Response(ConnectionSerializer(connection).data, status=status.HTTP_201_CREATED)


class MlflowWebhookApi(APIView):
    """Called by MLflow, not by people: no session or token; the HMAC signature of the connection is the proof."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(parameters=[OpenApiParameter("connection", OpenApiTypes.UUID, required=True)],
                   request=OpenApiTypes.OBJECT, responses={202: OpenApiTypes.OBJECT, 200: OpenApiTypes.OBJECT},
                   summary="MLflow 3 registry webhook (X-MLflow-Signature v1 HMAC-SHA256 of delivery id, timestamp "
                           "and body with the connection's secret). A bad or missing signature is a 401 and an "
                           "audit event (mlflow.webhook_refuse)")
    def post(self, request: Request) -> Response:
        body = request._request.body
        try:
            answer = services.webhook_receive(connection_id=request.query_params.get("connection", ""),
                                              headers=request.headers, body=body,
                                              ip=request.META.get("REMOTE_ADDR"))
        except services.WebhookRefused as exc:
            return Response(error_body("bad_signature", f"The delivery was refused: {exc}.", None),
                            status=status.HTTP_401_UNAUTHORIZED)
        return Response(answer, status=status.HTTP_200_OK if answer.get("duplicate") or answer.get("ignored")
                        else status.HTTP_202_ACCEPTED)
