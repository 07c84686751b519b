"""REST API of edge packages: request and follow a build, download the package (audited), device tokens, the
signing key, and the devices' uploads (``POST /api/v1/edge/uploads`` with a device token, nothing else)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import authentication, exceptions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api.errors import error_body
from registry.api.responses import blob_download
from registry.edge import selectors, services, signing
from registry.models import EdgeDeviceToken, Environment
from registry.serving.buffer import BufferUnavailable
from registry.versions import selectors as version_selectors


class PackageRequestInput(serializers.Serializer[Any]):
    version = serializers.IntegerField(min_value=1)
    int8 = serializers.BooleanField(default=True, help_text="Also offer an int8 form where it stays within "
                                                            "PORTAL_EDGE_INT8_TOLERANCE of the float form")


class EdgePackageListApi(APIView):
    @extend_schema(responses={200: OpenApiTypes.OBJECT}, summary="A model's edge packages, newest first")
    def get(self, request: Request, name: str) -> Response:
        model = version_selectors.model_get(user=request.user, name=name, action="view_models")
        return Response({"packages": [selectors.package_data(p) for p in selectors.package_list(model=model)[:50]]})

    @extend_schema(request=PackageRequestInput, responses={202: OpenApiTypes.OBJECT},
                   summary="Build an edge package of a version (a worker converts, proves, measures and signs it)")
    def post(self, request: Request, name: str) -> Response:
        model = version_selectors.model_get(user=request.user, name=name, action="deploy_dev")
        data = PackageRequestInput(data=request.data)
        data.is_valid(raise_exception=True)
        version = version_selectors.version_get(user=request.user, name=model.name,
                                                number=data.validated_data["version"])
        package = services.edge_package_request(version=version, int8=data.validated_data["int8"],
                                                actor=request.user)
        return Response(selectors.package_data(package), status=status.HTTP_202_ACCEPTED)


class EdgePackageDetailApi(APIView):
    @extend_schema(responses={200: OpenApiTypes.OBJECT}, summary="An edge package: status, progress, log, forms")
    def get(self, request: Request, uid: str) -> Response:
        return Response(selectors.package_data(selectors.package_get(user=request.user, uid=uid)))


class EdgePackageDownloadApi(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
                   summary="Download a ready edge package (ZIP; X-Content-SHA256); audited")
    def get(self, request: Request, uid: str) -> Any:
        package = selectors.package_get(user=request.user, uid=uid, action="download_artifact")
        services.edge_package_download_record(package=package, actor=request.user)
        return blob_download(package.blob, f"{package.model.name}-v{package.version.number}-edge.zip")


class TokenInput(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=100)
    environment = serializers.ChoiceField(choices=Environment.values, default=Environment.PROD,
                                          help_text="the environment the devices' predictions are monitored under")


class EdgeTokenListApi(APIView):
    @extend_schema(responses={200: OpenApiTypes.OBJECT}, summary="A model's device tokens and when each last reported")
    def get(self, request: Request, name: str) -> Response:
        model = version_selectors.model_get(user=request.user, name=name, action="view_models")
        return Response({"tokens": [selectors.token_data(t) for t in selectors.token_list(model=model)]})

    @extend_schema(request=TokenInput, responses={201: OpenApiTypes.OBJECT},
                   summary="Create a device token that uploads predictions for this model only (shown once; audited)")
    def post(self, request: Request, name: str) -> Response:
        model = version_selectors.model_get(user=request.user, name=name, action="deploy_dev")
        data = TokenInput(data=request.data)
        data.is_valid(raise_exception=True)
        token, plaintext = services.device_token_create(model=model, actor=request.user, **data.validated_data)
        return Response({**selectors.token_data(token), "token": plaintext}, status=status.HTTP_201_CREATED)


class EdgeTokenRevokeApi(APIView):
    @extend_schema(request=None, responses={200: OpenApiTypes.OBJECT}, summary="Revoke a device token (audited)")
    def post(self, request: Request, uid: str) -> Response:
        token = selectors.token_get(user=request.user, uid=uid, action="deploy_dev")
        return Response(selectors.token_data(services.device_token_revoke(token=token, actor=request.user)))


class EdgePublicKeyApi(APIView):
    @extend_schema(responses={(200, "application/x-pem-file"): OpenApiTypes.STR},
                   summary="The PEM public key that signs edge packages (give it to `python -m portal_edge verify "
                           "--public-key`)")
    def get(self, request: Request) -> Any:
        from django.core.exceptions import ImproperlyConfigured
        from django.http import HttpResponse

        try:
            pem = signing.public_key_pem()
        except ImproperlyConfigured as exc:
            return Response(error_body("unavailable", str(exc)), status=status.HTTP_503_SERVICE_UNAVAILABLE)
        response = HttpResponse(pem, content_type="application/x-pem-file")
        response["X-Key-Fingerprint"] = signing.public_key_fingerprint()
        return response


class DeviceTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer mle_…``: a device fleet's token, honoured by the upload endpoint only (everywhere else
    the token is unknown: 401)."""

    def authenticate(self, request: Any) -> tuple[Any, EdgeDeviceToken] | None:
        header = authentication.get_authorization_header(request).split()
        if len(header) != 2 or header[0].lower() != b"bearer" or not header[1].startswith(b"mle_"):
            return None
        token = services.device_token_lookup(header[1].decode("ascii", "replace"))
        if token is None or not token.is_active:
            raise exceptions.AuthenticationFailed("The device token is unknown or revoked.")
        from django.contrib.auth.models import AnonymousUser

        return AnonymousUser(), token

    def authenticate_header(self, request: Any) -> str:
        return "Bearer"


class DeviceTokenScheme(OpenApiAuthenticationExtension):
    target_class = "registry.edge.api.DeviceTokenAuthentication"
    name = "deviceToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "A device fleet's `mle_…` token: uploads "
                "predictions for its one model, nothing else."}


class UploadInput(serializers.Serializer[Any]):
    model = serializers.CharField(max_length=100)
    records = serializers.ListField(child=serializers.DictField(), help_text=(
        "{id (32 hex, made on the device), version, ts (seconds since 1970 UTC), latency_ms, inputs (numbers in the "
        "model's column order, null where missing), output}"))


class EdgeUploadApi(APIView):
    authentication_classes = [DeviceTokenAuthentication]
    permission_classes: list[Any] = []

    @extend_schema(request=UploadInput, responses={202: OpenApiTypes.OBJECT},
                   summary="Upload the predictions an edge runner kept (device token); each id is logged once")
    def post(self, request: Request) -> Response:
        token = request.auth if isinstance(request.auth, EdgeDeviceToken) else None
        if token is None:
            raise exceptions.NotAuthenticated("Send the model's device token (Authorization: Bearer mle_…).")
        if not isinstance(request.data, dict):
            raise exceptions.ValidationError({"records": "Send {\"model\": name, \"records\": [...]}."})
        name = request.data.get("model")
        if not isinstance(name, str) or name != token.model.name:
            services.edge_upload_refused(token=token, asked_for=str(name or ""))
            raise exceptions.NotFound("Not found.")
        try:
            receipt = services.edge_upload(token=token, records=request.data.get("records"))
        except BufferUnavailable:
            return Response(error_body("unavailable", "The prediction log cannot take records right now; keep them "
                                                      "and upload again later."),
                            status=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "30"})
        return Response(receipt.as_dict(), status=status.HTTP_202_ACCEPTED)
