"""API views for the caller's identity, their tokens, and the audit trail."""

from __future__ import annotations

from typing import Any

from django.http import Http404
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, generics, status
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal import selectors, services
from portal.api.serializers import (
    AuditEventSerializer,
    AuditFilterInput,
    ChainVerdictSerializer,
    MeSerializer,
    TokenCreatedSerializer,
    TokenCreateInput,
    TokenSerializer,
)
from portal.audit.export import EXPORT_FORMATS, audit_export_stream, export_filename
from portal.audit.signing import public_key_pem
from portal.audit.verify import audit_chain_verify
from portal.models import ApiToken, AuditEvent
from portal.permissions import HasCapability
from portal.roles import roles_of


class MeApi(APIView):
    @extend_schema(responses=MeSerializer, summary="Who the caller is: roles, teams and capabilities")
    def get(self, request: Request) -> Response:
        user: Any = request.user
        caps = sorted(p.split(".", 1)[1] for p in user.get_all_permissions() if p.startswith("portal."))
        data = {
            "username": user.get_username(),
            "roles": roles_of(user),
            "teams": list(selectors.team_list(user=user).values_list("slug", flat=True)),
            "capabilities": caps,
        }
        return Response(MeSerializer(data).data)


class SessionRequired(exceptions.PermissionDenied):
    default_detail = ("API tokens are created only from a signed-in session (the Account page, or this endpoint with "
                      "the browser's session), never with another token: a token that could mint tokens would "
                      "outlive its own revocation.")
    default_code = "session_required"


class ReauthenticationRequired(exceptions.PermissionDenied):
    default_code = "reauthentication_required"


class TokenListCreateApi(APIView):
    @extend_schema(responses=TokenSerializer(many=True), summary="The caller's API tokens (never their secrets)")
    def get(self, request: Request) -> Response:
        return Response(TokenSerializer(selectors.token_list(user=request.user), many=True).data)

    @extend_schema(request=TokenCreateInput, responses={201: TokenCreatedSerializer},
                   summary="Create a token from a signed-in browser session (never with a bearer token); approvers "
                           "and administrators give their password again; the secret is in this response only")
    def post(self, request: Request) -> Response:
        if isinstance(request.auth, ApiToken):
            raise SessionRequired()
        data = TokenCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            token, plaintext = services.token_create_for_person(
                user=request.user, name=data.validated_data["name"],
                expires_in_days=data.validated_data.get("expires_in_days"),
                password=data.validated_data.get("password", ""), request=request._request,
            )
        except services.ReauthenticationFailed as exc:
            raise ReauthenticationRequired(str(exc)) from exc
        token.token = plaintext  # type: ignore[attr-defined]
        return Response(TokenCreatedSerializer(token).data, status=status.HTTP_201_CREATED)


class TokenRevokeApi(APIView):
    @extend_schema(request=None, responses=TokenSerializer, summary="Revoke one of the caller's tokens")
    def delete(self, request: Request, uid: str) -> Response:
        token = ApiToken.objects.filter(uid=uid, user_id=int(request.user.pk or 0)).first()
        if token is None:
            raise Http404("No token of yours has that id.")
        token = services.token_revoke(token=token, actor=request.user)
        return Response(TokenSerializer(token).data)


_AUDIT_PARAMS = [
    OpenApiParameter("actor", OpenApiTypes.STR, description="username"),
    OpenApiParameter("action", OpenApiTypes.STR, description="an action label (auth.login) or a domain (auth)"),
    OpenApiParameter("target", OpenApiTypes.STR, description="type or type:id"),
    OpenApiParameter("outcome", OpenApiTypes.STR, enum=["success", "failure", "denied"]),
    OpenApiParameter("team", OpenApiTypes.STR),
    OpenApiParameter("model", OpenApiTypes.STR, description="a model's whole timeline: it, its versions, "
                                                            "environments, deployments and promotions"),
    OpenApiParameter("request_id", OpenApiTypes.STR),
    OpenApiParameter("from", OpenApiTypes.DATETIME, description="inclusive, ISO 8601"),
    OpenApiParameter("to", OpenApiTypes.DATETIME, description="exclusive, ISO 8601"),
]


def audit_filters(params: Any) -> dict[str, Any]:
    """Validate the audit trail's query parameters (shared by the API and the pages)."""
    raw = {k: v for k, v in params.items() if v not in ("", None)}
    if "from" in raw:
        raw["since"] = raw.pop("from")
    if "to" in raw:
        raw["until"] = raw.pop("to")
    data = AuditFilterInput(data=raw)
    data.is_valid(raise_exception=True)
    return dict(data.validated_data)


class AuditEventListApi(generics.ListAPIView[AuditEvent]):
    permission_classes = [HasCapability.of("view_audit")]
    serializer_class = AuditEventSerializer

    def get_queryset(self) -> Any:
        return selectors.audit_event_list(**audit_filters(self.request.query_params))

    @extend_schema(parameters=_AUDIT_PARAMS, summary="Search the audit trail, newest first")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class AuditVerifyApi(APIView):
    permission_classes = [HasCapability.of("view_audit")]

    @extend_schema(responses=ChainVerdictSerializer,
                   summary="Recompute the hash chain, compare it with the signed checkpoints and name each problem")
    def get(self, request: Request) -> Response:
        verdict = audit_chain_verify(actor=request.user, source="api")
        return Response(ChainVerdictSerializer(verdict.as_dict()).data)


class _FirstRenderer(DefaultContentNegotiation):
    """The contract's ``?format=csv|jsonl`` names the export's format, not one of DRF's renderers."""

    def select_renderer(self, request: Any, renderers: Any, format_suffix: Any = None) -> Any:
        return renderers[0], renderers[0].media_type


class AuditExportApi(APIView):
    permission_classes = [HasCapability.of("export_audit")]
    content_negotiation_class = _FirstRenderer

    @extend_schema(parameters=[*_AUDIT_PARAMS, OpenApiParameter("format", OpenApiTypes.STR, enum=["csv", "jsonl"])],
                   responses={(200, "application/zip"): OpenApiTypes.BINARY},
                   summary="A streamed ZIP: the events, manifest.json and its Ed25519 signature (audited)")
    def get(self, request: Request) -> Any:
        from django.http import StreamingHttpResponse
        from rest_framework.exceptions import ValidationError

        fmt = request.query_params.get("format", "jsonl")
        if fmt not in EXPORT_FORMATS:
            raise ValidationError({"format": "Use csv or jsonl."})
        params = {k: v for k, v in request.query_params.items() if k not in ("format", "page", "page_size")}
        filters = audit_filters(params)
        stream = audit_export_stream(queryset=selectors.audit_event_list(**filters), fmt=fmt, filters=filters,
                                     actor=request.user)
        response = StreamingHttpResponse(stream, content_type="application/zip")
        response["Content-Disposition"] = f'attachment; filename="{export_filename(fmt, timezone.now())}"'
        response["Cache-Control"] = "no-store"
        return response


class AuditPublicKeyApi(APIView):
    permission_classes = [HasCapability.of("view_audit")]

    @extend_schema(responses={(200, "application/x-pem-file"): OpenApiTypes.STR},
                   summary="The PEM public key that signs audit exports")
    def get(self, request: Request) -> Any:
        from django.http import HttpResponse

        return HttpResponse(public_key_pem(), content_type="application/x-pem-file")
