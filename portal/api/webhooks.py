"""REST API of a team's outgoing webhooks: list, add, and each one's delivery log (team managers only)."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.models import Team, TeamWebhook
from portal.permissions import get_object_for_user
from portal.webhooks import WEBHOOK_EVENTS, webhook_create


def _managed_team(request: Request, slug: str) -> Team:
    """The team whose webhooks the caller manages (404 for a team outside the caller's reach, 403 without
    ``manage_teams``)."""
    return get_object_for_user(request.user, Team.objects.all(), action="manage_teams", slug=slug)


class WebhookSerializer(serializers.ModelSerializer[TeamWebhook]):
    secret = serializers.CharField(write_only=True, min_length=16, max_length=128)
    events = serializers.ListField(child=serializers.ChoiceField(choices=WEBHOOK_EVENTS), required=False)

    class Meta:
        model = TeamWebhook
        fields = ["id", "url", "secret", "events", "active", "created_at"]
        read_only_fields = ["id", "created_at"]


class WebhookListApi(APIView):
    @extend_schema(responses=WebhookSerializer(many=True), summary="A team's outgoing webhooks")
    def get(self, request: Request, slug: str) -> Response:
        team = _managed_team(request, slug)
        return Response(WebhookSerializer(team.webhooks.all(), many=True).data)

    @extend_schema(request=WebhookSerializer, responses={201: WebhookSerializer},
                   summary="Add a webhook; internal addresses are refused, also after DNS resolution")
    def post(self, request: Request, slug: str) -> Response:
        team = _managed_team(request, slug)
        data = WebhookSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        hook = webhook_create(team=team, actor=request.user, **data.validated_data)
        return Response(WebhookSerializer(hook).data, status=status.HTTP_201_CREATED)


class WebhookDeliveriesApi(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT, summary="The delivery log of a team's webhook")
    def get(self, request: Request, slug: str, pk: int) -> Response:
        team = _managed_team(request, slug)
        hook = team.webhooks.filter(pk=pk).first()
        if hook is None:
            raise Http404("Not found.")
        rows = [{"id": str(d.uid), "event": d.event, "status": d.status, "attempts": d.attempts,
                 "response_status": d.response_status, "error": d.error, "created_at": d.created_at,
                 "last_attempt_at": d.last_attempt_at, "delivered_at": d.delivered_at}
                for d in hook.deliveries.all()[:200]]
        return Response({"webhook": hook.pk, "deliveries": rows})
