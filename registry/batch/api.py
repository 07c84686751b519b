"""REST API of batch scoring: submit a file, follow its progress, download the scored file, cancel; schedules."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api.pagination import PortalPagination, paginated
from portal.permissions import require_capability
from registry.api.responses import blob_download, too_large_response
from registry.batch import selectors as batch_selectors
from registry.batch import services as batch
from registry.versions import selectors


class BatchJobSerializer(serializers.Serializer[Any]):
    id = serializers.UUIDField(source="uid")
    model = serializers.CharField(source="model.name")
    env = serializers.CharField(source="environment")
    version = serializers.IntegerField(source="version.number")
    status = serializers.CharField()
    progress = serializers.IntegerField()
    rows_total = serializers.IntegerField(allow_null=True)
    rows_done = serializers.IntegerField()
    rows_failed = serializers.IntegerField()
    rows_logged = serializers.IntegerField()
    chunks_total = serializers.IntegerField()
    chunks_done = serializers.IntegerField()
    input_filename = serializers.CharField()
    input_format = serializers.CharField()
    input_sha256 = serializers.CharField(source="input_blob.sha256")
    input_bytes = serializers.IntegerField(source="input_blob.size")
    id_column = serializers.CharField()
    subject_column = serializers.CharField()
    prediction_column = serializers.CharField()
    prediction_columns = serializers.SerializerMethodField(
        help_text="The result file's prediction columns: `prediction_column`, or one per key of the model's answer "
                  "when it answers a record per row (a DataFrame or dict), as MLflow's JSON answer names them")
    prediction_id_column = serializers.CharField()
    max_error_share = serializers.FloatField()
    error = serializers.CharField()
    result_sha256 = serializers.SerializerMethodField()
    errors_sha256 = serializers.SerializerMethodField()
    schedule = serializers.SerializerMethodField()
    requested_by = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    scored_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    seconds = serializers.SerializerMethodField()
    state = serializers.SerializerMethodField(help_text="One sentence on where the job stands and `final`: "
                                                        "true once nothing will change (logging included)")

    def get_prediction_columns(self, obj: Any) -> list[str]:
        return batch.job_prediction_columns(obj)

    def get_state(self, obj: Any) -> dict[str, Any]:
        return selectors.batch_job_state(job=obj)

    def get_result_sha256(self, obj: Any) -> str | None:
        return obj.result_blob.sha256 if obj.result_blob_id else None

    def get_errors_sha256(self, obj: Any) -> str | None:
        return obj.errors_blob.sha256 if obj.errors_blob_id else None

    def get_schedule(self, obj: Any) -> str | None:
        return obj.schedule.name if obj.schedule_id else None

    def get_requested_by(self, obj: Any) -> str | None:
        return obj.requested_by.get_username() if obj.requested_by_id else None

    def get_seconds(self, obj: Any) -> float | None:
        """From submission to done (or failed, cancelled)."""
        if obj.finished_at is None:
            return None
        return round((obj.finished_at - obj.created_at).total_seconds(), 3)


class BatchChunkSerializer(serializers.Serializer[Any]):
    index = serializers.IntegerField()
    status = serializers.CharField()
    rows_planned = serializers.IntegerField()
    rows = serializers.IntegerField(allow_null=True)
    rows_failed = serializers.IntegerField()
    attempts = serializers.IntegerField()
    worker = serializers.CharField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    stage_seconds = serializers.DictField(child=serializers.FloatField(), help_text=(
        "Seconds the chunk spent reading its bytes (read), turning rows into the model's input (parse), in the "
        "model's call including shipping rows to a sandboxed host (model), writing the scored part's bytes "
        "(format) and storing it (write)."))


class BatchJobDetailSerializer(BatchJobSerializer):
    chunks = BatchChunkSerializer(many=True, source="chunk_list")


class BatchSubmitInput(serializers.Serializer[Any]):
    model = serializers.CharField(max_length=100)
    env = serializers.ChoiceField(choices=["dev", "stage", "prod"])
    file = serializers.FileField(help_text="CSV (with a header) or Parquet")
    id_column = serializers.CharField(required=False, allow_blank=True, max_length=200,
                                      help_text="carried through to the scored file (it is anyway); checked present")
    subject_column = serializers.CharField(required=False, allow_blank=True, max_length=200,
                                           help_text="data subject ids, kept in the prediction log as keyed hashes")
    max_error_share = serializers.FloatField(required=False, min_value=0.0, max_value=1.0,
                                             help_text="share of rows that may fail the signature (default 0.01)")


class BatchJobListApi(APIView):
    parser_classes = [MultiPartParser]

    @extend_schema(parameters=[OpenApiParameter("model", OpenApiTypes.STR), OpenApiParameter("status", OpenApiTypes.STR)],
                   responses=paginated(BatchJobSerializer, "PaginatedBatchJobList"),
                   operation_id="v1_batch_jobs_list", summary="Batch jobs of the caller's teams, newest first")
    def get(self, request: Request) -> Response:
        qs = batch_selectors.job_list(user=request.user, model=request.query_params.get("model", ""),
                                      status=request.query_params.get("status", ""))
        paginator = PortalPagination()
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(BatchJobSerializer(page, many=True).data)

    @extend_schema(request={"multipart/form-data": BatchSubmitInput}, responses={202: BatchJobSerializer},
                   summary="Submit a CSV or Parquet file for scoring by the version serving model/env")
    def post(self, request: Request) -> Response:
        require_capability(request.user, "run_batch")  # before the body is read: refuse early, not after 8 GB
        files = request.FILES
        if getattr(request._request, "portal_upload_too_large", False):
            return too_large_response()
        fields = request.data.dict() if hasattr(request.data, "dict") else {}  # no body at all: {}
        data = BatchSubmitInput(data={**fields, **files.dict()})
        data.is_valid(raise_exception=True)
        values = data.validated_data
        model = selectors.model_get(user=request.user, name=values["model"], action="run_batch")
        upload = values["file"]
        job = batch.batch_submit(
            model=model, environment=values["env"], path=upload.temporary_file_path(), filename=upload.name or "",
            actor=request.user, sha256=getattr(upload, "sha256", None), upload=upload,
            csv_plan=getattr(upload, "csv_plan", None),
            options=batch.BatchOptions(id_column=values.get("id_column", ""),
                                       subject_column=values.get("subject_column", ""),
                                       max_error_share=values.get("max_error_share")))
        return Response(BatchJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class BatchJobDetailApi(APIView):
    @extend_schema(responses=BatchJobDetailSerializer, summary="A batch job: status, rows_done/rows_total, chunks")
    def get(self, request: Request, uid: str) -> Response:
        job = batch_selectors.job_get(user=request.user, uid=uid)
        job.chunk_list = list(job.chunks.order_by("index"))  # type: ignore[attr-defined]
        return Response(BatchJobDetailSerializer(job).data)


class BatchJobCancelApi(APIView):
    @extend_schema(request=None, responses=BatchJobSerializer, summary="Cancel a queued or running job")
    def post(self, request: Request, uid: str) -> Response:
        job = batch_selectors.job_get(user=request.user, uid=uid)
        return Response(BatchJobSerializer(batch.batch_cancel(job=job, actor=request.user)).data)


def _file_response(request: Request, uid: str, which: str) -> Any:
    job = batch_selectors.job_get(user=request.user, uid=uid)
    blob = batch.batch_download_record(job=job, actor=request.user, which=which)
    response = blob_download(blob, batch.result_filename(job, which))
    if which == "errors" or job.input_format == "csv":
        response["Content-Type"] = "text/csv; charset=utf-8"
    return response


class BatchJobResultApi(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
                   summary="The scored file: the input's columns plus prediction and prediction_id (audited)")
    def get(self, request: Request, uid: str) -> Any:
        return _file_response(request, uid, "result")


class BatchJobErrorsApi(APIView):
    @extend_schema(responses={(200, "text/csv"): OpenApiTypes.BINARY},
                   summary="Rows that failed the signature: row, column, reason (audited)")
    def get(self, request: Request, uid: str) -> Any:
        return _file_response(request, uid, "errors")


class BatchScheduleSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField(source="pk", read_only=True)
    model = serializers.CharField(source="model.name", read_only=True)
    name = serializers.CharField(max_length=100)
    env = serializers.ChoiceField(choices=["dev", "stage", "prod"], source="environment")
    location = serializers.CharField(max_length=400, help_text="a file, or a folder ending in '/', in the team's "
                                                                "batch inbox; a folder's newest file is scored")
    cron = serializers.CharField(max_length=100, help_text="minute hour day-of-month month day-of-week (UTC)")
    id_column = serializers.CharField(required=False, allow_blank=True, max_length=200)
    subject_column = serializers.CharField(required=False, allow_blank=True, max_length=200)
    enabled = serializers.BooleanField(required=False, default=True)
    inbox_path = serializers.SerializerMethodField()
    last_run_at = serializers.DateTimeField(read_only=True, allow_null=True)
    last_error = serializers.CharField(read_only=True)

    def get_inbox_path(self, obj: Any) -> str:
        return batch.inbox_path(obj)


class BatchScheduleListApi(APIView):
    parser_classes = [JSONParser]

    @extend_schema(responses=BatchScheduleSerializer(many=True), summary="A model's batch schedules")
    def get(self, request: Request, name: str) -> Response:
        model = selectors.model_get(user=request.user, name=name, action="view_models")
        return Response(BatchScheduleSerializer(model.batch_schedules.select_related("model__team"), many=True).data)

    @extend_schema(request=BatchScheduleSerializer, responses={201: BatchScheduleSerializer},
                   summary="Create a recurring batch job (cron, UTC)")
    def post(self, request: Request, name: str) -> Response:
        model = selectors.model_get(user=request.user, name=name, action="run_batch")
        data = BatchScheduleSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        schedule = batch.schedule_create(model=model, environment=values["environment"], name=values["name"],
                                         location=values["location"], cron=values["cron"], actor=request.user,
                                         id_column=values.get("id_column", ""),
                                         subject_column=values.get("subject_column", ""),
                                         enabled=values.get("enabled", True))
        return Response(BatchScheduleSerializer(schedule).data, status=status.HTTP_201_CREATED)


class BatchScheduleDetailApi(APIView):
    parser_classes = [JSONParser]

    @extend_schema(responses=BatchScheduleSerializer, summary="One batch schedule")
    def get(self, request: Request, pk: int) -> Response:
        return Response(BatchScheduleSerializer(batch_selectors.schedule_get(user=request.user, pk=pk)).data)

    @extend_schema(request=BatchScheduleSerializer(partial=True), responses=BatchScheduleSerializer,
                   summary="Change a schedule (cron, enabled, location, env, columns); audited")
    def patch(self, request: Request, pk: int) -> Response:
        schedule = batch_selectors.schedule_get(user=request.user, pk=pk)
        data = BatchScheduleSerializer(schedule, data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        changes = dict(data.validated_data)
        if "name" in changes and changes["name"] != schedule.name:
            raise DjangoValidationError({"name": "A schedule's name cannot change; create a new one."})
        changes.pop("name", None)
        schedule = batch.schedule_update(schedule=schedule, actor=request.user, **changes)
        return Response(BatchScheduleSerializer(schedule).data)

    @extend_schema(request=None, responses={204: None}, summary="Delete a schedule; audited")
    def delete(self, request: Request, pk: int) -> Response:
        batch.schedule_delete(schedule=batch_selectors.schedule_get(user=request.user, pk=pk), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
