"""Deployments over the API: deploy a version, follow a deployment."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry.api.serializers import DeployInput, DeploymentSerializer
from registry.deployments.services import deployment_start
from registry.versions import selectors


class VersionDeployApi(APIView):
    @extend_schema(request=DeployInput, responses={202: DeploymentSerializer},
                   summary="Deploy a ready version (data scientists: dev only; stage and prod through promotion)")
    def post(self, request: Request, name: str, number: int) -> Response:
        version = selectors.version_get(user=request.user, name=name, number=number, action="view_models")
        data = DeployInput(data=request.data)
        data.is_valid(raise_exception=True)
        deployment = deployment_start(version=version, environment=data.validated_data["environment"],
                                      strategy=data.validated_data["strategy"],
                                      traffic_percent=data.validated_data["traffic_percent"],
                                      reason=data.validated_data.get("reason", ""), actor=request.user)
        return Response(DeploymentSerializer(deployment).data, status=status.HTTP_202_ACCEPTED)


class DeploymentDetailApi(APIView):
    @extend_schema(responses=DeploymentSerializer, summary="A deployment's status, progress, log and error")
    def get(self, request: Request, uid: str) -> Response:
        return Response(DeploymentSerializer(selectors.deployment_get(user=request.user, uid=uid)).data)
