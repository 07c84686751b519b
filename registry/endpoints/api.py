"""REST API of multi-model endpoints: list and create, read, replace the rules and default, delete.

Scoring through an endpoint is ``POST /api/v1/serve/endpoints/{name}/{env}/invocations``
(``registry.serving.endpoints``)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.models import Team
from portal.permissions import get_object_for_user, require_capability
from registry.endpoints import selectors, services
from registry.models import Endpoint, Environment, RuleKind
from registry.versions.selectors import environment_param


class RuleSerializer(serializers.Serializer[Any]):
    kind = serializers.ChoiceField(choices=RuleKind.choices)
    model = serializers.CharField(help_text="A model of the endpoint's team, deployed in its environment")
    key = serializers.CharField(required=False, allow_blank=True,
                                help_text="field_equals/field_in: an input column; header_equals: a header name")
    values = serializers.ListField(child=serializers.JSONField(), required=False,
                                   help_text="field_equals/header_equals: one value; field_in: the set")
    percent = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=100,
                                       help_text="share: the percentage of requests (by routing key) it takes")


class EndpointInput(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=100)
    environment = serializers.ChoiceField(choices=Environment.choices)
    team = serializers.SlugField()
    default = serializers.CharField(help_text="The model that answers the rows no rule matches")
    description = serializers.CharField(required=False, allow_blank=True, max_length=2000)
    rules = RuleSerializer(many=True, required=False)


class EndpointChange(serializers.Serializer[Any]):
    default = serializers.CharField(required=False)
    description = serializers.CharField(required=False, allow_blank=True, max_length=2000)
    rules = RuleSerializer(many=True, required=False, help_text="Replaces every rule, in this order")


class EndpointSerializer(serializers.Serializer[Any]):
    id = serializers.UUIDField(source="uid")
    name = serializers.CharField()
    environment = serializers.CharField()
    team = serializers.CharField(source="team.slug")
    description = serializers.CharField()
    default = serializers.SerializerMethodField(method_name="default_model_name")
    rules = serializers.SerializerMethodField()
    generation = serializers.IntegerField()
    invocations = serializers.SerializerMethodField()
    created_by = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    def default_model_name(self, obj: Endpoint) -> str | None:
        return obj.default_model.name if obj.default_model else None

    def get_rules(self, obj: Endpoint) -> list[dict[str, Any]]:
        return [services.rule_summary(r) for r in obj.rules.select_related("model").order_by("position")]

    def get_invocations(self, obj: Endpoint) -> str:
        return f"/api/v1/serve/endpoints/{obj.name}/{obj.environment}/invocations"

    def get_created_by(self, obj: Endpoint) -> str | None:
        return obj.created_by.get_username() if obj.created_by else None


def _rules(data: dict[str, Any]) -> list[services.RuleInput] | None:
    if "rules" not in data:
        return None
    return [services.RuleInput(kind=r["kind"], model=r["model"], key=r.get("key", ""),
                               values=tuple(r.get("values") or ()), percent=r.get("percent"))
            for r in data["rules"]]


class EndpointListApi(APIView):
    @extend_schema(responses=EndpointSerializer(many=True), summary="The endpoints of the caller's teams")
    def get(self, request: Request) -> Response:
        require_capability(request.user, "view_models")
        env = request.query_params.get("environment", "")
        if env:
            environment_param(env)
        return Response(EndpointSerializer(selectors.endpoint_list(user=request.user, environment=env),
                                           many=True).data)

    @extend_schema(request=EndpointInput, responses={201: EndpointSerializer},
                   summary="Create an endpoint: ordered routing rules to a team's models deployed in one environment, "
                           "and a default (dev: data scientists; stage and prod: team managers; audited as "
                           "endpoint.create)")
    def post(self, request: Request) -> Response:
        require_capability(request.user, "view_models")
        data = EndpointInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        team = get_object_for_user(request.user, Team.objects.all(), slug=values["team"])
        endpoint = services.endpoint_create(team=team, name=values["name"], environment=values["environment"],
                                            default_model=values["default"], rules=_rules(values),
                                            description=values.get("description", ""), actor=request.user)
        return Response(EndpointSerializer(endpoint).data, status=status.HTTP_201_CREATED)


class EndpointDetailApi(APIView):
    @extend_schema(responses=EndpointSerializer, summary="One endpoint with its rules in order")
    def get(self, request: Request, endpoint_name: str, env: str) -> Response:
        endpoint = selectors.endpoint_get(user=request.user, name=endpoint_name, environment=env)
        return Response(EndpointSerializer(endpoint).data)

    @extend_schema(request=EndpointChange, responses=EndpointSerializer,
                   summary="Replace the rules (as a whole, in order), the default or the description; serving "
                           "workers pick the change up within a second, without a restart (audited as "
                           "endpoint.change)")
    def put(self, request: Request, endpoint_name: str, env: str) -> Response:
        endpoint = selectors.endpoint_get(user=request.user, name=endpoint_name, environment=env,
                                          action=services.edit_capability(env))
        data = EndpointChange(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        endpoint = services.endpoint_update(endpoint=endpoint, actor=request.user, rules=_rules(values),
                                            default_model=values.get("default"),
                                            description=values.get("description"))
        return Response(EndpointSerializer(endpoint).data)

    @extend_schema(responses={204: None}, summary="Delete the endpoint (its models keep serving at their own "
                                                  "routes; audited as endpoint.delete)")
    def delete(self, request: Request, endpoint_name: str, env: str) -> Response:
        endpoint = selectors.endpoint_get(user=request.user, name=endpoint_name, environment=env,
                                          action=services.edit_capability(env))
        services.endpoint_delete(endpoint=endpoint, actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
