"""The datasets API: snapshots (ask, follow, download), retraining policies and requests, lineage, and the decisions
on versions trained on erased data."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import authentication, exceptions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from monitoring.datasets import retraining, selectors, services
from monitoring.models import DatasetAccessToken, RetrainingPolicy
from portal.authentication import BearerTokenAuthentication
from portal.environments import ENVIRONMENTS
from portal.permissions import require_capability
from registry.api.responses import blob_download
from registry.versions import selectors as registry_selectors


class DatasetSnapshotInput(serializers.Serializer[Any]):
    model = serializers.CharField(max_length=100)
    environment = serializers.ChoiceField(choices=ENVIRONMENTS)
    version = serializers.IntegerField(required=False, allow_null=True, min_value=1,
                                       help_text="One version; omitted: every version in the window")
    start = serializers.DateTimeField(help_text="Window start (ISO 8601 with a zone), inclusive")
    end = serializers.DateTimeField(help_text="Window end, exclusive")
    labelled_only = serializers.BooleanField(default=True, help_text="Only predictions with ground truth")
    sensitive = serializers.DictField(child=serializers.ChoiceField(choices=["dropped", "masked", "encrypted"]),
                                      required=False, help_text="Per sensitive column: dropped, masked or encrypted "
                                                                "(default by kind: PORTAL_SNAPSHOT_PERSONAL/_HEALTH)")

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict) and ("from" in data or "to" in data):
            data = {**data, "start": data.get("from", data.get("start")), "end": data.get("to", data.get("end"))}
        return super().to_internal_value(data)


class DatasetListApi(APIView):
    @extend_schema(parameters=[OpenApiParameter("model", str, description="only this model's snapshots")],
                   responses={200: OpenApiTypes.OBJECT}, summary="Dataset snapshots of your teams' models",
                   operation_id="datasets_list")
    def get(self, request: Request) -> Response:
        model = None
        if request.query_params.get("model"):
            model = registry_selectors.model_get(user=request.user, name=request.query_params["model"])
        qs = selectors.snapshot_list(user=request.user, model=model)[:200]
        return Response({"results": [selectors.snapshot_data(s, detail=False) for s in qs]})

    @extend_schema(request=DatasetSnapshotInput, responses={202: OpenApiTypes.OBJECT},
                   summary="Cut a snapshot: the logged inputs joined with ground truth in a window, written as Parquet "
                           "by a worker (follow it at its url)")
    def post(self, request: Request) -> Response:
        data = DatasetSnapshotInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        model = registry_selectors.model_get(user=request.user, name=values["model"], action="register_model")
        snapshot = services.snapshot_create(model=model, environment=values["environment"],
                                            version=values.get("version"), start=values["start"], end=values["end"],
                                            labelled_only=values["labelled_only"],
                                            sensitive=values.get("sensitive"), actor=request.user)
        return Response(selectors.snapshot_data(snapshot), status=status.HTTP_202_ACCEPTED)


class DatasetDetailApi(APIView):
    @extend_schema(responses={200: OpenApiTypes.OBJECT},
                   summary="A snapshot: status and progress, its manifest, the versions trained on it")
    def get(self, request: Request, uid: str) -> Response:
        return Response(selectors.snapshot_data(selectors.snapshot_get(user=request.user, uid=uid)))


class DatasetTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer mld_…``: a retraining call's read-only token, honoured by the download endpoint only
    (everywhere else the token is unknown: 401)."""

    def authenticate(self, request: Any) -> tuple[Any, DatasetAccessToken] | None:
        header = authentication.get_authorization_header(request).split()
        if len(header) != 2 or header[0].lower() != b"bearer" or not header[1].startswith(b"mld_"):
            return None
        token = services.token_lookup(header[1].decode("ascii", "replace"))
        if token is None or not token.is_active:
            raise exceptions.AuthenticationFailed("The dataset token is unknown or expired.")
        from django.contrib.auth.models import AnonymousUser

        return AnonymousUser(), token

    def authenticate_header(self, request: Any) -> str:
        return "Bearer"


class DatasetTokenScheme(OpenApiAuthenticationExtension):
    target_class = "monitoring.datasets.api.DatasetTokenAuthentication"
    name = "datasetToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "The read-only `mld_…` token a retraining call "
                "carries: downloads that one snapshot, nothing else."}


class DatasetDownloadApi(APIView):
    authentication_classes = [DatasetTokenAuthentication, BearerTokenAuthentication,
                              authentication.SessionAuthentication]
    permission_classes: list[Any] = []

    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
                   summary="Download a ready snapshot (Parquet; X-Content-SHA256); audited. Takes your token, or the "
                           "read-only dataset token a retraining call carries (that snapshot only)")
    def get(self, request: Request, uid: str) -> Any:
        token = request.auth if isinstance(request.auth, DatasetAccessToken) else None
        if token is not None:
            if str(token.snapshot.uid) != str(uid):
                services.token_refused(token=token, asked_for=str(uid))
                raise exceptions.NotFound("Not found.")
            snapshot = token.snapshot
            services.snapshot_read(snapshot=snapshot, actor=None, token=token, via="dataset token")
        else:
            if not request.user or not request.user.is_authenticated:
                raise exceptions.NotAuthenticated()
            snapshot = selectors.snapshot_get(user=request.user, uid=uid, action="download_artifact")
            services.snapshot_read(snapshot=snapshot, actor=request.user, via="api")
        return blob_download(snapshot.blob, f"{snapshot.model.name}-{snapshot.environment}-"
                                            f"{snapshot.sha256[:12]}.parquet")


class RetrainingPolicyInput(serializers.Serializer[Any]):
    enabled = serializers.BooleanField(default=True)
    on_drift = serializers.BooleanField(default=True)
    accuracy_floor = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=1)
    accuracy_window_minutes = serializers.IntegerField(default=60, min_value=5, max_value=7 * 24 * 60)
    accuracy_min_labelled = serializers.IntegerField(default=50, min_value=1, max_value=10_000_000)
    schedule_hours = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=24 * 366)
    snapshot_days = serializers.IntegerField(default=7, min_value=1, max_value=366)
    labelled_only = serializers.BooleanField(default=True)
    webhook = serializers.IntegerField(required=False, allow_null=True, help_text="the id of the team's CI webhook")


class RetrainingPolicyApi(APIView):
    @extend_schema(responses={200: OpenApiTypes.OBJECT}, summary="The retraining policy of a model in an environment")
    def get(self, request: Request, name: str, env: str) -> Response:
        registry_selectors.environment_param(env)
        model = registry_selectors.model_get(user=request.user, name=name)
        policy = RetrainingPolicy.objects.select_related("webhook").filter(model=model, environment=env).first()
        return Response({"policy": selectors.policy_data(policy)})

    @extend_schema(request=RetrainingPolicyInput, responses={200: OpenApiTypes.OBJECT},
                   summary="Set the retraining policy: drift alert, accuracy floor over a window, schedule; the CI "
                           "webhook to call")
    def put(self, request: Request, name: str, env: str) -> Response:
        registry_selectors.environment_param(env)
        model = registry_selectors.model_get(user=request.user, name=name, action="manage_alerts")
        data = RetrainingPolicyInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        webhook = values.pop("webhook", None)
        policy = retraining.policy_set(model=model, environment=env, actor=request.user, webhook_id=webhook, **values)
        return Response({"policy": selectors.policy_data(policy)})


class RetrainingRequestListApi(APIView):
    @extend_schema(responses={200: OpenApiTypes.OBJECT}, summary="A model's retraining requests, newest first")
    def get(self, request: Request, name: str) -> Response:
        model = registry_selectors.model_get(user=request.user, name=name)
        return Response({"results": [selectors.request_data(r) for r in selectors.request_list(model=model)]})


class RetrainingCloseInput(serializers.Serializer[Any]):
    reason = serializers.CharField(max_length=2000)


class RetrainingRequestCloseApi(APIView):
    @extend_schema(request=RetrainingCloseInput, responses={200: OpenApiTypes.OBJECT}, summary="Close an open request")
    def post(self, request: Request, uid: str) -> Response:
        item = selectors.request_get(user=request.user, uid=uid, action="manage_alerts")
        data = RetrainingCloseInput(data=request.data)
        data.is_valid(raise_exception=True)
        item = retraining.retraining_close(request=item, actor=request.user, reason=data.validated_data["reason"])
        return Response(selectors.request_data(item))


class VersionLineageApi(APIView):
    @extend_schema(responses={200: OpenApiTypes.OBJECT},
                   summary="The snapshots a version was trained on, and whether any of them lost rows to an erasure")
    def get(self, request: Request, name: str, number: int) -> Response:
        version = registry_selectors.version_get(user=request.user, name=name, number=number)
        return Response(selectors.version_lineage(version))


class ErasedDataFlagListApi(APIView):
    @extend_schema(parameters=[OpenApiParameter("pending", bool)], responses={200: OpenApiTypes.OBJECT},
                   summary="Versions trained on data an erasure removed, with the decisions taken")
    def get(self, request: Request) -> Response:
        require_capability(request.user, "manage_subjects")
        pending = request.query_params.get("pending") in ("1", "true", "yes")
        return Response({"results": [selectors.flag_data(f) for f in selectors.flag_list(
            user=request.user, pending_only=pending)[:500]]})


class ErasedDataDecisionInput(serializers.Serializer[Any]):
    decision = serializers.ChoiceField(choices=["retrain", "keep"])
    reason = serializers.CharField(max_length=2000, required=False, allow_blank=True)


class ErasedDataDecideApi(APIView):
    @extend_schema(request=ErasedDataDecisionInput, responses={200: OpenApiTypes.OBJECT},
                   summary="Record a compliance officer's decision: retrain, or keep with a reason")
    def post(self, request: Request, uid: str) -> Response:
        require_capability(request.user, "manage_subjects")
        flag = selectors.flag_get(user=request.user, uid=uid)
        data = ErasedDataDecisionInput(data=request.data)
        data.is_valid(raise_exception=True)
        flag = retraining.erased_data_decide(flag=flag, decision=data.validated_data["decision"],
                                           reason=data.validated_data.get("reason", ""), actor=request.user)
        return Response(selectors.flag_data(flag))
