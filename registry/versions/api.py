"""REST API of the registry: models, version uploads, trust decisions and downloads."""

from __future__ import annotations

import logging
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api.errors import error_body
from portal.api.pagination import PortalPagination, paginated
from portal.models import Team
from portal.permissions import get_object_for_user
from registry.api.responses import blob_download, too_large_response
from registry.api.serializers import (
    ModelCreateInput,
    ModelDetailSerializer,
    ModelSerializer,
    TrustDecisionInput,
    VersionSerializer,
    VersionUploadInput,
)
from registry.scanning.findings import UploadRejected
from registry.versions import selectors, services
from registry.versions.mlflow_import import TrackingServerUnavailable, mlflow_import

logger = logging.getLogger(__name__)


def upload_rejected_response(exc: UploadRejected) -> Response:
    findings = [f.as_dict() for f in exc.findings]
    message = "The upload was refused: " + "; ".join(f.message for f in exc.findings[:3])
    return Response(error_body("upload_rejected", message, {"findings": findings}),
                    status=status.HTTP_422_UNPROCESSABLE_ENTITY)


class ModelListCreateApi(APIView):
    @extend_schema(parameters=[OpenApiParameter("search", OpenApiTypes.STR), OpenApiParameter("team", OpenApiTypes.STR)],
                   responses=paginated(ModelSerializer, "PaginatedModelList"), operation_id="v1_models_list",
                   summary="Registered models of the caller's teams")
    def get(self, request: Request) -> Response:
        qs = selectors.model_list(user=request.user, search=request.query_params.get("search", ""),
                                  team=request.query_params.get("team", ""))
        paginator = PortalPagination()
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(ModelSerializer(page, many=True).data)

    @extend_schema(request=ModelCreateInput, responses={201: ModelSerializer}, summary="Register a model")
    def post(self, request: Request) -> Response:
        data = ModelCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        team = get_object_for_user(request.user, Team.objects.all(), slug=data.validated_data["team"])
        model = services.model_register(name=data.validated_data["name"], team=team,
                                        description=data.validated_data.get("description", ""),
                                        tags=data.validated_data.get("tags"), actor=request.user)
        return Response(ModelSerializer(model).data, status=status.HTTP_201_CREATED)


class ModelDetailApi(APIView):
    @extend_schema(responses=ModelDetailSerializer, summary="One model with its versions")
    def get(self, request: Request, name: str) -> Response:
        return Response(ModelDetailSerializer(selectors.model_get(user=request.user, name=name)).data)


class VersionUploadApi(APIView):
    parser_classes = [MultiPartParser]

    @extend_schema(request={"multipart/form-data": VersionUploadInput}, responses={201: VersionSerializer},
                   summary="Upload a version (multipart); it is scanned before it is stored")
    def post(self, request: Request, name: str) -> Response:
        model = selectors.model_get(user=request.user, name=name, action="register_model")
        files = request.FILES  # parses the body, streaming files to disk
        if getattr(request._request, "portal_upload_too_large", False):
            return too_large_response()
        data = VersionUploadInput(data={**request.data.dict(), **files.dict()})  # type: ignore[union-attr]
        data.is_valid(raise_exception=True)
        values = data.validated_data
        metrics, sensitive = services.validate_upload_metadata(metrics=values.get("metrics"),
                                                               sensitive_columns=values.get("sensitive_columns"))
        try:
            meta = services.UploadMetadata(
                description=values.get("description", ""), metrics=metrics, sensitive_columns=sensitive,
                mlflow_run_id=values.get("mlflow_run_id", ""), source=values.get("source", ""),
                git_commit=values.get("git_commit", ""), training_data_hash=values.get("training_data_hash", ""),
                intended_use=values.get("intended_use", ""), limitations=values.get("limitations", ""),
                ethical_considerations=values.get("ethical_considerations", ""),
                trained_on=services.split_references(values.get("trained_on", "")),
            )
            version = services.version_upload(model=model, upload=values["file"],
                                              reference=values.get("reference_data"), meta=meta, actor=request.user)
        except UploadRejected as exc:
            return upload_rejected_response(exc)
        return Response(VersionSerializer(version).data, status=status.HTTP_201_CREATED)


class VersionImportInput(serializers.Serializer[Any]):
    uri = serializers.CharField(max_length=400, help_text="models:/NAME/VERSION, models:/NAME@ALIAS, "
                                "models:/NAME/latest, models:/m-… (an MLflow 3 logged model) or runs:/RUN_ID/PATH")


class VersionImportApi(APIView):
    @extend_schema(request=VersionImportInput, responses={201: VersionSerializer, 200: VersionSerializer},
                   summary="Import a version from the configured MLflow tracking server, keeping its lineage; an "
                           "artifact the model already holds answers 200 with that version "
                           "(duplicate_of_existing), and a tracking server that does not answer is a 503")
    def post(self, request: Request, name: str) -> Response:
        model = selectors.model_get(user=request.user, name=name, action="register_model")
        data = VersionImportInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            result = mlflow_import(model=model, uri=data.validated_data["uri"], actor=request.user)
        except UploadRejected as exc:
            return upload_rejected_response(exc)
        except TrackingServerUnavailable as exc:
            return Response(error_body("mlflow_unavailable", str(exc), {"tracking_uri": exc.tracking_uri}),
                            status=status.HTTP_503_SERVICE_UNAVAILABLE)
        body = {**VersionSerializer(result.version).data, "duplicate_of_existing": not result.created}
        return Response(body, status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)


class TagsInput(serializers.Serializer[Any]):
    tags = serializers.JSONField(help_text='A list of strings, such as ["pii", "team:risk"]: replaces the tags.')


class ModelTagsApi(APIView):
    @extend_schema(request=TagsInput, responses=OpenApiTypes.OBJECT,
                   summary="Replace a model's tags (data scientists and admins; audited as model.tags_change)")
    def put(self, request: Request, name: str) -> Response:
        model = selectors.model_get(user=request.user, name=name, action="register_model")
        data = TagsInput(data=request.data)
        data.is_valid(raise_exception=True)
        model = services.model_tags_set(model=model, tags=data.validated_data["tags"], actor=request.user)
        return Response({"model": model.name, "tags": model.tags})


class AliasInput(serializers.Serializer[Any]):
    version = serializers.IntegerField(min_value=1)


def _alias_json(model: Any) -> dict[str, Any]:
    return {"model": model.name, "aliases": {a["alias"]: a["version"] for a in
                                             selectors.aliases_of(models=[model]).get(model.pk, [])}}


class ModelAliasesApi(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT, summary="A model's aliases (MLflow's @champion and the like)")
    def get(self, request: Request, name: str) -> Response:
        return Response(_alias_json(selectors.model_get(user=request.user, name=name)))


class ModelAliasApi(APIView):
    @extend_schema(request=AliasInput, responses=OpenApiTypes.OBJECT,
                   summary="Point an alias at a ready version, creating or moving it (data scientists and admins; "
                           "audited as model.alias_set)")
    def put(self, request: Request, name: str, alias: str) -> Response:
        model = selectors.model_get(user=request.user, name=name, action="register_model")
        data = AliasInput(data=request.data)
        data.is_valid(raise_exception=True)
        version = selectors.version_get(user=request.user, name=name, number=data.validated_data["version"])
        services.alias_set(model=model, name=alias, version=version, actor=request.user)
        return Response(_alias_json(model))

    @extend_schema(responses=OpenApiTypes.OBJECT,
                   summary="Remove an alias (data scientists and admins; audited as model.alias_delete)")
    def delete(self, request: Request, name: str, alias: str) -> Response:
        model = selectors.model_get(user=request.user, name=name, action="register_model")
        services.alias_delete(model=model, name=alias, actor=request.user)
        return Response(_alias_json(model))


class VersionTagsApi(APIView):
    @extend_schema(request=TagsInput, responses=OpenApiTypes.OBJECT,
                   summary="Replace a version's tags (data scientists and admins; audited as version.tags_change)")
    def put(self, request: Request, name: str, number: int) -> Response:
        version = selectors.version_get(user=request.user, name=name, number=number, action="register_model")
        data = TagsInput(data=request.data)
        data.is_valid(raise_exception=True)
        version = services.version_tags_set(version=version, tags=data.validated_data["tags"], actor=request.user)
        return Response({"model": name, "version": version.number, "tags": version.tags})


class VersionDetailApi(APIView):
    @extend_schema(responses=VersionSerializer, summary="A version: hash, status, findings, signature, metrics")
    def get(self, request: Request, name: str, number: int) -> Response:
        return Response(VersionSerializer(selectors.version_get(user=request.user, name=name, number=number)).data)


class VersionTrustApi(APIView):
    @extend_schema(request=TrustDecisionInput, responses=VersionSerializer,
                   summary="Approver's decision on a version's untrusted skops types")
    def post(self, request: Request, name: str, number: int) -> Response:
        version = selectors.version_get(user=request.user, name=name, number=number, action="decide_trust")
        data = TrustDecisionInput(data=request.data)
        data.is_valid(raise_exception=True)
        version = services.version_trust_decide(version=version, trust=data.validated_data["trust"],
                                                reason=data.validated_data["reason"],
                                                remember_for_team=data.validated_data["remember_for_team"],
                                                actor=request.user)
        return Response(VersionSerializer(version).data)


class VersionArtifactApi(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
                   summary="Download the version's artifact (hash verified; audited)")
    def get(self, request: Request, name: str, number: int) -> Any:
        version = selectors.version_get(user=request.user, name=name, number=number, action="download_artifact")
        if version.artifact is None:
            raise ValidationError({"artifact": "This version was rejected; its file was not kept."})
        services.version_download_record(version=version, actor=request.user)
        ext = {"mlflow": "zip", "skops": "skops", "onnx": "onnx", "pickle": "pkl", "joblib": "joblib"}[version.format]
        return blob_download(version.artifact, f"{version.model.name}-v{version.number}.{ext}")


class VersionReferenceApi(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
                   summary="Download the version's reference data (audited)")
    def get(self, request: Request, name: str, number: int) -> Any:
        version = selectors.version_get(user=request.user, name=name, number=number, action="download_artifact")
        if version.reference is None:
            raise ValidationError({"reference_data": "This version has no reference data."})
        services.reference_download_record(version=version, actor=request.user)
        return blob_download(version.reference.blob, f"{version.model.name}-v{version.number}-reference.{version.reference.format}")

