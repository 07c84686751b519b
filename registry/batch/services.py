"""Batch scoring: a file scored in chunks by as many workers as are running, assembled in order, logged in bulk.

The steps, each a Celery task that claims its row before working so a redelivered message is harmless:

1. **Submit** (the request): the file's format, header and required columns are checked, the file is stored
   content-addressed, the serving version is pinned and the job is queued.
2. **Plan**: one pass over the file checks its SHA-256 and cuts it into chunks (see :mod:`registry.tabular`);
   one task per chunk goes to the queue, so every running worker takes a share.
3. **Score a chunk**: read its byte range (or row groups), check rows against the signature, predict, write the
   scored part to the artifact store (shared by all hosts). The chunk is marked done once, in the same transaction
   that counts it into the job; the task that counts the last chunk queues the assembly.
4. **Assemble**: the parts, in chunk order, become the result file (input columns plus prediction and prediction
   id); bad rows become the errors file (row, column, reason). The job is ``done`` only if every chunk's rows are
   there exactly once, and fails when bad rows pass the job's ``max_error_share``.
5. **Log**: the scored rows join the prediction log in bulk (role ``batch``), after the result is ready.

A worker killed mid-chunk loses that chunk only: the message is redelivered (acks late, reject on worker lost) or
the reaper hands it out again, and a chunk runs at most ``BatchJob.MAX_CHUNK_ATTEMPTS`` times.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import logging
import os
import posixpath
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from portal import context
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import AuditOutcome
from portal.permissions import has_capability, require_capability
from portal.views import error_text
from registry import storage
from registry import tabular as batch_io
from registry.hooks import write_prediction_log
from registry.models import (
    BATCH_ACTIVE,
    BatchChunk,
    BatchJob,
    BatchSchedule,
    BatchStatus,
    ChunkStatus,
    Deployment,
    EnvironmentState,
    RegisteredModel,
)
from registry.sandbox import hosts
from registry.serving.runtime import cache, input_columns, positional_inputs
from registry.serving.views import subject_hash
from registry.versions.selectors import environment_param

logger = logging.getLogger(__name__)
INBOX = "batch-inbox"


def batch_target(job: BatchJob) -> Target:
    return Target(type="batchjob", id=str(job.uid), repr=f"{job.model.name}/{job.environment}: {job.input_filename}"[:255],
                  team_slug=job.model.team.slug)


def work_prefix(job: BatchJob) -> str:
    return f"batch/{job.uid}"


# ---------------------------------------------------------------------------------------------------------------
# Submitting


@dataclass
class BatchOptions:
    id_column: str = ""
    subject_column: str = ""
    max_error_share: float | None = None


def _champion(model: RegisteredModel, environment: str) -> Deployment:
    state = (EnvironmentState.objects.select_related("champion__version", "champion__serving_blob")
             .filter(model=model, environment=environment).first())
    if state is None or state.champion is None:
        raise ValidationError({"env": f"Nothing serves {model.name} in {environment} yet; deploy a version first."})
    return state.champion


def batch_submit(*, model: RegisteredModel, environment: str, path: str | Path, filename: str, actor: Any,
                 options: BatchOptions | None = None, sha256: str | None = None, upload: Any = None,
                 schedule: BatchSchedule | None = None, csv_plan: batch_io.CsvPlan | None = None) -> BatchJob:
    """Check and store the file, pin the serving version, queue the job. ``upload`` (a temporary uploaded file) is
    moved into the store rather than copied; otherwise ``path`` is copied. A ``csv_plan`` made while the upload
    arrived (same bytes, same hash) lets scoring start at once; without one a worker plans the file."""
    options = options or BatchOptions()
    if schedule is None:
        require_capability(actor, "run_batch")
    environment_param(environment)
    share = settings.PORTAL_BATCH_MAX_ERROR_SHARE if options.max_error_share is None else options.max_error_share
    if not 0.0 <= share <= 1.0:
        raise ValidationError({"max_error_share": "Give a share between 0 and 1 (0.05 is 5 % of the rows)."})
    champion = _champion(model, environment)
    version = champion.version
    try:
        description = batch_io.describe(str(path), filename)
        required = _required_columns(version, description.columns, options.id_column, options.subject_column)
        batch_io.check_columns(description, required, {"id": options.id_column, "subject id": options.subject_column})
    except batch_io.BatchInputError as exc:
        raise ValidationError({"file": str(exc)}) from None
    if sha256 is None:
        sha256, size = storage.sha256_of_file(path)
    else:
        size = os.path.getsize(path)
    if upload is not None:
        blob = storage.blob_put(upload, sha256=sha256, size=size)
    else:
        with open(path, "rb") as fh:
            blob = storage.blob_put(fh, sha256=sha256, size=size)
    prediction_name, id_name = batch_io.output_names(description.columns)
    with transaction.atomic():
        job = BatchJob.objects.create(
            model=model, environment=environment, version=version, deployment=champion, schedule=schedule,
            input_blob=blob, input_format=description.format, input_filename=Path(filename).name[:255] or "input",
            columns=description.columns, newline=description.newline.decode(), id_column=options.id_column,
            subject_column=options.subject_column, prediction_column=prediction_name,
            prediction_id_column=id_name, max_error_share=share, rows_total=description.rows,
            requested_by=actor if getattr(actor, "is_authenticated", False) else None,
            request_id=context.current().request_id,
        )
        audit_record(AuditAction.BATCH_SUBMIT, actor=None if schedule else actor, target=batch_target(job),
                     after={"version": version.number, "environment": environment, "input_sha256": sha256,
                            "input_bytes": size, "format": description.format, "schedule": schedule.pk if schedule
                            else None, "max_error_share": share})
        if csv_plan is not None and description.format == "csv" and csv_plan.sha256 == sha256 \
                and csv_plan.size == size:
            _start_scoring(job, csv_plan.chunks, from_status=BatchStatus.QUEUED)
        else:
            _enqueue_on_commit("batch_plan", job.pk)
    job.refresh_from_db()
    return job


def _required_columns(version: Any, file_columns: list[str], *extra: str) -> list[str]:
    """The file's columns the model takes, in its order: the signature's names; or, for a model that takes its
    inputs by position (a tensor signature, names the portal made up), the file's own columns besides the id and
    subject columns, as many as the model takes."""
    columns = input_columns(version)
    if positional_inputs(version):
        own = [c for c in file_columns if c not in extra]
        if columns and len(own) != len(columns):
            raise ValidationError({"file": f"The model takes {len(columns)} inputs by position; the file has "
                                           f"{len(own)} columns besides the id and subject columns."})
        return own
    if not columns:
        raise ValidationError({"model": f"Version {version.number}'s signature names no input columns, so a file's "
                                        "columns cannot be matched to it."})
    return columns


def job_input_columns(job: BatchJob) -> list[str]:
    """The job's file columns the model takes, in its order (see ``_required_columns``)."""
    try:
        return _required_columns(job.version, list(job.columns), job.id_column, job.subject_column)
    except ValidationError:
        return input_columns(job.version)


def _enqueue_on_commit(task: str, *args: Any) -> None:
    ctx = context.current().as_task_kwargs()

    def enqueue() -> None:
        from registry.batch import tasks  # lazy: registry.batch.tasks imports this module at top (cycle)

        getattr(tasks, f"{task}_task").delay(*args, request_ctx=ctx)

    transaction.on_commit(enqueue)


# ---------------------------------------------------------------------------------------------------------------
# Planning


def _claim_job(job_id: int, *statuses: str, to: str) -> BatchJob | None:
    claimed = BatchJob.objects.filter(pk=job_id, status__in=statuses, attempts__lt=BatchJob.MAX_STEP_ATTEMPTS).update(
        status=to, attempts=F("attempts") + 1, started_at=timezone.now())
    if not claimed:
        return None
    return BatchJob.objects.select_related("model__team", "version", "deployment", "input_blob").get(pk=job_id)


def _give_up_if_stuck(job_id: int, status: str, step: str) -> BatchJob | None:
    """A job whose step kept killing its worker ends failed with the reason, never stuck."""
    job = BatchJob.objects.select_related("model__team").filter(pk=job_id).first()
    if job is not None and job.status == status and job.attempts >= BatchJob.MAX_STEP_ATTEMPTS:
        _fail(job, f"{step} was started {job.attempts} times and its worker stopped each time")
        job.refresh_from_db()
    return job


def batch_plan(*, job_id: int) -> BatchJob | None:
    job = _claim_job(job_id, BatchStatus.QUEUED, BatchStatus.PLANNING, to=BatchStatus.PLANNING)
    if job is None:
        return _give_up_if_stuck(job_id, BatchStatus.PLANNING, "planning")
    try:
        if job.input_format == "csv":
            chunks = _plan_csv(job)
        else:
            chunks = _plan_parquet(job)
    except (batch_io.BatchInputError, storage.IntegrityError) as exc:
        _fail(job, str(exc))
        return job
    with transaction.atomic():
        _start_scoring(job, chunks, from_status=BatchStatus.PLANNING)
    job.refresh_from_db()
    return job


def _start_scoring(job: BatchJob, chunks: list[batch_io.ChunkPlan], *, from_status: str) -> None:
    """Inside the caller's transaction: the chunk rows, the job to ``scoring``, one task per chunk at commit."""
    BatchChunk.objects.filter(job=job).delete()  # a re-planned job starts its chunks over
    BatchChunk.objects.bulk_create([
        BatchChunk(job=job, index=i, start=c.start, end=c.end, rows_planned=c.rows, source=c.source)
        for i, c in enumerate(chunks)])
    updated = BatchJob.objects.filter(pk=job.pk, status=from_status).update(
        status=BatchStatus.SCORING, chunks_total=len(chunks), chunks_done=0, rows_done=0, rows_failed=0,
        rows_total=sum(c.rows for c in chunks), started_at=timezone.now())
    if updated:
        ids = list(BatchChunk.objects.filter(job=job).order_by("index").values_list("pk", flat=True))
        ctx = context.current().as_task_kwargs()

        def enqueue() -> None:
            # lazy: registry.batch.tasks imports this module at top (cycle)
            from registry.batch.tasks import batch_chunk_task

            for pk in ids:
                batch_chunk_task.delay(pk, request_ctx=ctx)

        transaction.on_commit(enqueue)


def _plan_csv(job: BatchJob) -> list[batch_io.ChunkPlan]:
    with storage.local_path(job.input_blob) as path, open(path, "rb") as fh:
        plan = batch_io.plan_csv(fh, settings.PORTAL_BATCH_CHUNK_BYTES)
    if plan.sha256 != job.input_blob.sha256:
        raise storage.IntegrityError("the stored input file no longer matches its SHA-256")
    return plan.chunks


def _plan_parquet(job: BatchJob) -> list[batch_io.ChunkPlan]:
    chunk_rows = settings.PORTAL_BATCH_CHUNK_ROWS
    with storage.verified_local_path(job.input_blob) as path:
        planned = batch_io.plan_parquet(str(path), chunk_rows)
        chunks: list[batch_io.ChunkPlan] = []
        for plan in planned:
            if plan.source != "recut":
                chunks.append(plan)
                continue
            for piece in batch_io.recut_row_group(str(path), plan.start, chunk_rows):
                name = storage.put_work_file(f"{work_prefix(job)}/in-{len(chunks):05d}.arrow", piece)
                rows = batch_io.read_ipc(piece).num_rows
                chunks.append(batch_io.ChunkPlan(0, 0, rows, name))
    return chunks


# ---------------------------------------------------------------------------------------------------------------
# Scoring a chunk


def _claim_chunk(chunk_id: int) -> BatchChunk | None:
    claimable = Q(status=ChunkStatus.PENDING) | Q(status=ChunkStatus.RUNNING)
    claimed = BatchChunk.objects.filter(claimable, pk=chunk_id, attempts__lt=BatchJob.MAX_CHUNK_ATTEMPTS,
                                        job__status=BatchStatus.SCORING).update(
        status=ChunkStatus.RUNNING, attempts=F("attempts") + 1, started_at=timezone.now(),
        worker=f"{socket.gethostname()}:{os.getpid()}"[:200])
    if not claimed:
        return None
    return BatchChunk.objects.select_related("job__model__team", "job__version", "job__deployment__version",
                                             "job__deployment__serving_blob", "job__input_blob").get(pk=chunk_id)


def batch_chunk_run(*, chunk_id: int) -> str:
    chunk = _claim_chunk(chunk_id)
    if chunk is None:
        current = BatchChunk.objects.select_related("job__model__team").filter(pk=chunk_id).first()
        if current is None:
            return "gone"
        if current.status == ChunkStatus.RUNNING and current.attempts >= BatchJob.MAX_CHUNK_ATTEMPTS \
                and current.job.status == BatchStatus.SCORING:
            _fail(current.job, f"chunk {current.index + 1} was started {current.attempts} times and its worker "
                               "stopped each time")
        return current.status
    job = chunk.job
    if chunk.attempts > 1:
        logger.warning("Batch %s: chunk %s is being run again (attempt %s)", job.uid, chunk.index, chunk.attempts)
    clock = _Stopwatch()
    try:
        scored = _score(job, chunk, clock)
    except batch_io.BatchInputError as exc:
        _fail(job, f"chunk {chunk.index + 1}: {exc}")
        return "failed"
    except Exception as exc:
        logger.exception("Batch %s: chunk %s failed", job.uid, chunk.index)
        _fail(job, f"chunk {chunk.index + 1}: the model failed: {type(exc).__name__}: {str(exc)[:300]}")
        return "failed"
    suffix = f"{chunk.index:05d}-{chunk.attempts}"
    prefix = work_prefix(job)
    written = time.perf_counter()
    output_name = storage.put_work_file(f"{prefix}/part-{suffix}", scored.output)
    clock.seconds["write"] = time.perf_counter() - written
    errors_name = ""
    if scored.errors:
        errors_name = storage.put_work_file(f"{prefix}/errors-{suffix}.csv", batch_io.errors_csv(
            [(e.row, e.column, e.reason) for e in scored.errors]))
    # The prediction log reads the scored part again after the job is done, off the path people wait on.
    log_name = output_name if settings.PORTAL_BATCH_LOG_PREDICTIONS and scored.predictions else ""
    clock.seconds["format"] = scored.format_seconds
    clock.seconds["parse"] = max(0.0, clock.scoring - clock.seconds.get("model", 0.0) - scored.format_seconds)
    return _chunk_done(chunk, rows=scored.rows, failed=int((~scored.good).sum()), output_name=output_name,
                       errors_name=errors_name, log_name=log_name, keys=scored.keys,
                       stage_seconds={k: round(v, 4) for k, v in clock.seconds.items()})


class _Stopwatch:
    """A chunk's seconds per stage (``BatchChunk.stage_seconds``): ``timed`` wraps the model's callables."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"read": 0.0, "model": 0.0}
        self.scoring = 0.0  # parse, model and format together

    def timed(self, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds["model"] += time.perf_counter() - started

        return run


def _score(job: BatchJob, chunk: BatchChunk, clock: _Stopwatch | None = None) -> batch_io.ScoredChunk:
    clock = clock or _Stopwatch()
    loaded = cache.loaded(job.deployment)
    required = job_input_columns(job)
    prefix = f"{job.id_prefix}{chunk.index:04x}"
    # A model MLflow's scoring code answers (its sandboxed host) gets the rows as MLflow reads them, whatever the
    # column types; the others (in-process ONNX, a native host) take one float64 matrix.
    # A tensor signature: MLflow's server refuses CSV bodies for it, so its rows go as numbers in Parquet.
    table_predict = (batch_io.mlflow_scorer(clock.timed(loaded.invoke),
                                            csv_body=job.input_format == "csv" and not loaded.tensor,
                                            tensor=loaded.tensor, types=_signature_types(job))
                     if loaded.answers_requests else None)
    # Such a model whose host answers a numeric signature's rows as MLflow's server would (a scikit-learn
    # estimator): a chunk of finite numbers goes to it as one float64 matrix, without MLflow re-parsing the text.
    frames: dict[str, Any] = {}
    if table_predict is not None and loaded.takes_frames:
        frames = {"frame_predict": clock.timed(loaded.predict_frame), "frame_kinds": loaded.frame_kinds,
                  "declined": hosts.FrameDeclined}
    started = time.perf_counter()
    if job.input_format == "csv":
        data = storage.read_range(job.input_blob.storage_name, chunk.start, chunk.end)
        clock.seconds["read"] = time.perf_counter() - started
        scoring = time.perf_counter()
        scored = batch_io.score_csv_chunk(data, columns=list(job.columns), required=required, id_prefix=prefix,
                                          newline=job.newline.encode(), predict=clock.timed(loaded.predict),
                                          table_predict=table_predict, as_text=not loaded.tensor,
                                          allow_missing=loaded.missing_values, **frames)
        clock.scoring = time.perf_counter() - scoring
        return scored
    if chunk.source:
        table = batch_io.read_ipc(storage.read_work_file(chunk.source))
    else:
        with storage.local_path(job.input_blob) as path:
            table = batch_io.read_parquet_groups(str(path), int(chunk.start), int(chunk.end))
    clock.seconds["read"] = time.perf_counter() - started
    scoring = time.perf_counter()
    scored = batch_io.score_arrow_chunk(table, required=required, id_prefix=prefix,
                                        prediction_name=job.prediction_column, id_name=job.prediction_id_column,
                                        predict=clock.timed(loaded.predict), table_predict=table_predict,
                                        allow_missing=loaded.missing_values, **frames)
    clock.scoring = time.perf_counter() - scoring
    return scored


def _signature_types(job: BatchJob) -> dict[str, str]:
    """The signature's input column types by name (``double``, ``datetime``…)."""
    return {str(c.get("name")): str(c.get("type")) for c in (job.version.signature or {}).get("inputs") or []
            if isinstance(c, dict)}


def _chunk_done(chunk: BatchChunk, *, rows: int, failed: int, output_name: str, errors_name: str,
                log_name: str, keys: list[str] | None = None, stage_seconds: dict[str, float] | None = None) -> str:
    with transaction.atomic():
        updated = BatchChunk.objects.filter(pk=chunk.pk, status=ChunkStatus.RUNNING).update(
            status=ChunkStatus.DONE, rows=rows, rows_failed=failed, output_name=output_name, errors_name=errors_name,
            log_name=log_name, output_keys=list(keys or []), stage_seconds=stage_seconds or {},
            finished_at=timezone.now())
        if not updated:
            return "duplicate"  # another run of the same chunk finished first; its part is the one used
        job = BatchJob.objects.select_for_update().get(pk=chunk.job_id)
        if job.status != BatchStatus.SCORING:
            return str(job.status)
        job.chunks_done += 1
        job.rows_done += rows
        job.rows_failed += failed
        job.save(update_fields=["chunks_done", "rows_done", "rows_failed"])
        if job.chunks_done == job.chunks_total:
            BatchJob.objects.filter(pk=job.pk).update(scored_at=timezone.now())
            _enqueue_on_commit("batch_assemble", job.pk)
    return "done"


# ---------------------------------------------------------------------------------------------------------------
# Assembling


def batch_assemble(*, job_id: int) -> BatchJob | None:
    claimed = BatchJob.objects.filter(Q(status=BatchStatus.SCORING, chunks_done=F("chunks_total"))
                                      | Q(status=BatchStatus.ASSEMBLING), pk=job_id).update(
        status=BatchStatus.ASSEMBLING)
    job = BatchJob.objects.select_related("model__team", "version", "input_blob").filter(pk=job_id).first()
    if not claimed or job is None:
        return job
    chunks = list(BatchChunk.objects.filter(job=job).order_by("index"))
    problem = _completeness_problem(job, chunks)
    if problem:
        _fail(job, problem)
        return job
    rows = sum(int(c.rows or 0) for c in chunks)
    failed = sum(c.rows_failed for c in chunks)
    errors_blob = _assemble_errors(job, chunks) if failed else None
    if failed > job.max_error_share * rows:
        _fail(job, f"{failed:,} of {rows:,} rows ({100 * failed / rows:.2f} %) failed the model's signature, more "
                   f"than the {100 * job.max_error_share:g} % this job allows; see the errors file.",
              errors_blob=errors_blob)
        return job
    keys, problem = _answer_keys(chunks)
    if problem:
        _fail(job, problem)
        return job
    result_blob = _assemble_csv(job, chunks, keys) if job.input_format == "csv" else \
        _assemble_parquet(job, chunks, keys)
    with transaction.atomic():
        updated = BatchJob.objects.filter(pk=job.pk, status=BatchStatus.ASSEMBLING).update(
            status=BatchStatus.DONE, result_blob=result_blob, errors_blob=errors_blob, rows_total=rows,
            rows_done=rows, rows_failed=failed, finished_at=timezone.now(), error="")
        if updated:
            audit_record(AuditAction.BATCH_DONE, actor=None, target=batch_target(job),
                         before={"status": "assembling"},
                         after={"status": "done", "rows": rows, "rows_failed": failed, "result_sha256":
                                result_blob.sha256, "errors_sha256": errors_blob.sha256 if errors_blob else None})
            pending_logs = [c.pk for c in chunks if c.log_name and not c.logged]
            ctx = context.current().as_task_kwargs()

            def after() -> None:
                # lazy: registry.batch.tasks imports this module at top (cycle)
                from registry.batch.tasks import batch_log_task

                _cleanup_parts(job, keep={c.log_name for c in chunks if c.log_name and not c.logged})
                for pk in pending_logs:
                    batch_log_task.delay(pk, request_ctx=ctx)

            transaction.on_commit(after)
    job.refresh_from_db()
    return job


def _completeness_problem(job: BatchJob, chunks: list[BatchChunk]) -> str:
    if len(chunks) != job.chunks_total or [c.index for c in chunks] != list(range(job.chunks_total)):
        return f"expected {job.chunks_total} chunks, found {len(chunks)}"
    missing = [c.index + 1 for c in chunks if c.status != ChunkStatus.DONE or not c.output_name or c.rows is None]
    if missing:
        return f"chunks {missing[:5]} have no scored part"
    if job.input_format == "csv":
        for previous, current in itertools.pairwise(chunks):
            if previous.end != current.start:
                return f"chunks {previous.index + 1} and {current.index + 1} do not meet"
        if chunks[-1].end != job.input_blob.size:
            return "the chunks do not reach the end of the file"
    return ""


def _answer_keys(chunks: list[BatchChunk]) -> tuple[list[str], str]:
    """The columns of the model's record answer (a DataFrame or dict) that the result file gets, [] for one
    prediction column; and why the parts cannot be put together (the model answered differently in two chunks).
    A chunk none of whose rows was scored has no answer to tell; it gets empty cells in every column."""
    answered = [c for c in chunks if int(c.rows or 0) > c.rows_failed]
    keys = list(answered[0].output_keys) if answered else []
    for chunk in answered:
        if list(chunk.output_keys) != keys:
            first = f"the columns {keys}" if keys else "one prediction per row"
            then = f"the columns {list(chunk.output_keys)}" if chunk.output_keys else "one prediction per row"
            return [], (f"the model answered {first} in chunk {answered[0].index + 1} and {then} in chunk "
                        f"{chunk.index + 1}, so the scored rows do not fit one file")
    return keys, ""


def job_prediction_columns(job: BatchJob) -> list[str]:
    """The result file's prediction columns: the job's prediction column, or for a model whose answer is a record
    per row (a DataFrame or dict) one column per key, as its scored chunks answered (until one has, the former)."""
    keys = BatchChunk.objects.filter(job=job).exclude(output_keys=[]).order_by("index").values_list(
        "output_keys", flat=True).first()
    return _prediction_columns(job, list(keys or []))


def _prediction_columns(job: BatchJob, keys: list[str]) -> list[str]:
    return batch_io.prediction_names(list(job.columns), keys, job.prediction_id_column) if keys \
        else [job.prediction_column]


def _header_line(job: BatchJob, first_chunk: BatchChunk, keys: list[str]) -> bytes:
    header = storage.read_range(job.input_blob.storage_name, 0, int(first_chunk.start))
    newline = job.newline.encode()
    body = header[: -len(newline)] if header.endswith(newline) else header.rstrip(b"\r\n")
    extra = ",".join(batch_io._quote(n) for n in (*_prediction_columns(job, keys), job.prediction_id_column))
    return body + b"," + extra.encode() + newline


def _tmp_file() -> tuple[int, str]:
    tmp_dir = Path(settings.VAR_DIR) / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=tmp_dir)


def _assemble_csv(job: BatchJob, chunks: list[BatchChunk], keys: list[str]) -> Any:
    """Header, then the parts in order. On local disk the kernel copies the parts (copy_file_range) while a thread
    hashes them, so the result costs about one read of its size; elsewhere the parts are streamed through (and
    so are parts whose rows all failed where the answer has several columns: their rows get an empty cell each)."""
    header = _header_line(job, chunks[0], keys)
    store = storage.artifact_storage()
    pad = len(keys) - 1 if keys else 0
    if pad and any(list(c.output_keys) != keys for c in chunks):
        return _assemble_streamed(header, chunks, pad=pad, newline=job.newline.encode(), keys=keys)
    try:
        paths = [store.path(c.output_name) for c in chunks]
    except NotImplementedError:
        return _assemble_streamed(header, chunks)
    from concurrent.futures import ThreadPoolExecutor

    def digest() -> str:
        h = hashlib.sha256(header)
        for path in paths:
            with open(path, "rb") as fh:
                while piece := fh.read(storage.CHUNK * 8):
                    h.update(piece)
        return h.hexdigest()

    fd, tmp = _tmp_file()
    with ThreadPoolExecutor(max_workers=1) as pool, os.fdopen(fd, "wb") as out:
        hashed = pool.submit(digest)
        out.write(header)
        out.flush()
        size = len(header)
        for path in paths:
            with open(path, "rb") as src:
                size += _copy_into(src, out)
        sha = hashed.result()
    return storage.blob_put_moved(tmp, sha256=sha, size=size)


def _copy_into(src: Any, out: Any) -> int:
    length = os.fstat(src.fileno()).st_size
    done = 0
    try:
        while done < length:
            copied = os.copy_file_range(src.fileno(), out.fileno(), length - done)
            if copied == 0:
                break
            done += copied
    except OSError:  # a file system without it: copy through user space from where the kernel stopped
        src.seek(done)
        out.seek(0, os.SEEK_END)
        while piece := src.read(storage.CHUNK * 8):
            out.write(piece)
            done += len(piece)
    return done


def _assemble_streamed(header: bytes, chunks: list[BatchChunk], *, pad: int = 0, newline: bytes = b"\n",
                       keys: list[str] | None = None) -> Any:
    fd, tmp = _tmp_file()
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out:
        for piece in _pieces(header, chunks, pad=pad, newline=newline, keys=keys):
            digest.update(piece)
            out.write(piece)
            size += len(piece)
    return storage.blob_put_moved(tmp, sha256=digest.hexdigest(), size=size)


def _pieces(header: bytes, chunks: list[BatchChunk], *, pad: int = 0, newline: bytes = b"\n",
            keys: list[str] | None = None) -> Any:
    yield header
    store = storage.artifact_storage()
    for chunk in chunks:
        if pad and list(chunk.output_keys) != keys:
            # No row of this chunk was scored: each line ends ",<empty prediction>,<id>" and gets the empty cells
            # of the answer's other columns (the id, last, never holds a comma or a quote).
            with store.open(chunk.output_name, "rb") as fh:
                lines = fh.read().split(newline)
            yield newline.join(line.rsplit(b",", 1)[0] + b"," * (pad + 1) + line.rsplit(b",", 1)[1]
                               if line else line for line in lines)
            continue
        with store.open(chunk.output_name, "rb") as fh:
            while piece := fh.read(storage.CHUNK * 8):
                yield piece


def _assemble_parquet(job: BatchJob, chunks: list[BatchChunk], keys: list[str]) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fd, tmp = _tmp_file()
    os.close(fd)
    writer = None
    # Parts whose rows all failed where the answer has several columns get the answer's columns (their types as
    # a scored part has them), empty, in place of their one empty prediction column.
    schema = None
    if keys:
        answered = next(c for c in chunks if list(c.output_keys) == keys)
        schema = batch_io.read_ipc(storage.read_work_file(answered.output_name)).schema
    try:
        for chunk in chunks:
            table = batch_io.read_ipc(storage.read_work_file(chunk.output_name))
            if keys and list(chunk.output_keys) != keys and schema is not None:
                base = table.drop_columns([job.prediction_column, job.prediction_id_column])
                for name in _prediction_columns(job, keys):
                    base = base.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
                table = base.append_column(job.prediction_id_column, table.column(job.prediction_id_column))
            if writer is None:
                # Dictionary encoding only where it pays (text columns): on float columns it costs 4x the time
                # and makes the file bigger.
                text = [f.name for f in table.schema if f.name != job.prediction_id_column
                        and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                             or pa.types.is_dictionary(f.type))]
                writer = pq.ParquetWriter(tmp, table.schema, use_dictionary=text or False)
            elif table.schema != writer.schema:
                table = table.cast(writer.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    sha, size = storage.sha256_of_file(tmp)
    return storage.blob_put_moved(tmp, sha256=sha, size=size)


def _assemble_errors(job: BatchJob, chunks: list[BatchChunk]) -> Any:
    """One errors file for the job: the row number in the input (1 = the first data row), column and reason."""
    import csv
    import io

    fd, tmp = _tmp_file()
    offset = 0
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["row", "column", "reason"])
        for chunk in chunks:
            if chunk.errors_name:
                text = storage.read_work_file(chunk.errors_name).decode("utf-8")
                for row, column, reason in csv.reader(io.StringIO(text)):
                    writer.writerow([offset + int(row) + 1, column, reason])
            offset += int(chunk.rows or 0)
    sha, size = storage.sha256_of_file(tmp)
    return storage.blob_put_moved(tmp, sha256=sha, size=size)


def _cleanup_parts(job: BatchJob, *, keep: set[str] | None = None) -> None:
    """Remove the job's intermediate files, except ``keep`` (scored parts the prediction log still has to read)."""
    storage.delete_work_files(work_prefix(job), keep=keep or frozenset())


# ---------------------------------------------------------------------------------------------------------------
# Logging into the prediction log


def batch_log_chunk(*, chunk_id: int) -> int:
    """Write one chunk's predictions to the prediction log (ids are fixed, so a repeat inserts nothing twice)."""
    chunk = BatchChunk.objects.select_related("job__model", "job__version").filter(
        pk=chunk_id, status=ChunkStatus.DONE, logged=False).exclude(log_name="").first()
    if chunk is None:
        return 0
    job = chunk.job
    try:
        data = storage.read_work_file(chunk.log_name)
    except FileNotFoundError:
        logger.error("Batch %s: the scored part of chunk %s is gone; its predictions are not logged", job.uid,
                     chunk.index)
        BatchChunk.objects.filter(pk=chunk.pk).update(logged=True)
        return 0

    required = job_input_columns(job)
    logged = batch_io.scored_rows(data, fmt=job.input_format, columns=list(job.columns), required=required,
                                  subject_column=job.subject_column, prediction_column=job.prediction_column,
                                  id_column=job.prediction_id_column, keys=list(chunk.output_keys),
                                  types=_signature_types(job))
    matrix, ids, outputs, subjects = logged.matrix, logged.ids, logged.outputs, logged.subjects
    rows = ids
    seconds = (chunk.finished_at - chunk.started_at).total_seconds() if chunk.finished_at and chunk.started_at else 0
    latency = seconds * 1000 / max(int(chunk.rows or 1), 1)
    ts = (job.scored_at or job.created_at).timestamp()
    written = 0
    step = 5000  # rows per insert: bounded memory, whatever the chunk's size
    for lo in range(0, len(rows), step):
        hi = min(lo + step, len(rows))
        written += write_prediction_log([{
            "model": job.model.name, "environment": job.environment, "version": job.version.number, "role": "batch",
            "ts": ts, "latency_ms": latency * (hi - lo), "request_id": job.request_id, "error": "",
            "ids": ids[lo:hi],
            "inputs": matrix[lo:hi].tolist() if isinstance(matrix, np.ndarray) else matrix[lo:hi],
            "outputs": outputs[lo:hi],
            "subjects": [subject_hash(s) if s else "" for s in subjects[lo:hi]] if subjects else None,
        }])
    with transaction.atomic():
        if BatchChunk.objects.filter(pk=chunk.pk, logged=False).update(logged=True):
            BatchJob.objects.filter(pk=job.pk).update(rows_logged=F("rows_logged") + len(rows))
    storage.artifact_storage().delete(chunk.log_name)
    return written


# ---------------------------------------------------------------------------------------------------------------
# Failing, cancelling, reaping


def _fail(job: BatchJob, error: str, *, errors_blob: Any = None) -> None:
    with transaction.atomic():
        updated = BatchJob.objects.filter(pk=job.pk, status__in=BATCH_ACTIVE).update(
            status=BatchStatus.FAILED, error=error[:2000], finished_at=timezone.now(),
            **({"errors_blob": errors_blob} if errors_blob is not None else {}))
        if updated:
            audit_record(AuditAction.BATCH_FAIL, actor=None, target=batch_target(job), outcome=AuditOutcome.FAILURE,
                         before={"status": job.status}, after={"status": "failed", "error": error[:1000]})
            transaction.on_commit(lambda: _cleanup_parts(job))
    logger.warning("Batch %s failed: %s", job.uid, error)


def batch_cancel(*, job: BatchJob, actor: Any) -> BatchJob:
    require_capability(actor, "run_batch")
    with transaction.atomic():
        locked = BatchJob.objects.select_for_update().get(pk=job.pk)
        if locked.status not in BATCH_ACTIVE:
            raise ValidationError({"status": f"The job is already {locked.status}; only a queued or running job can "
                                             "be cancelled."})
        before = locked.status
        locked.status = BatchStatus.CANCELLED
        locked.finished_at = timezone.now()
        locked.error = f"Cancelled by {getattr(actor, 'username', 'someone')}."
        locked.save(update_fields=["status", "finished_at", "error"])
        audit_record(AuditAction.BATCH_CANCEL, actor=actor, target=batch_target(job), before={"status": before},
                     after={"status": "cancelled", "rows_done": locked.rows_done, "chunks_done": locked.chunks_done})
        transaction.on_commit(lambda: _cleanup_parts(locked))
    return locked


def batch_reap() -> dict[str, int]:
    """Hand out again what a dead worker or a lost message left behind: jobs stuck planning or assembling, chunks
    running (or pending) too long, logs never written. Claims count attempts, so nothing loops for ever."""
    from registry.batch import tasks  # lazy: registry.batch.tasks imports this module at top (cycle)

    cutoff = timezone.now() - dt.timedelta(seconds=settings.PORTAL_BATCH_STALE_SECONDS)
    counts = {"plan": 0, "chunk": 0, "assemble": 0, "log": 0}
    for pk in BatchJob.objects.filter(Q(status=BatchStatus.QUEUED, created_at__lt=cutoff)
                                      | Q(status=BatchStatus.PLANNING, started_at__lt=cutoff)).values_list("pk",
                                                                                                           flat=True):
        tasks.batch_plan_task.delay(pk)
        counts["plan"] += 1
    stale_chunks = BatchChunk.objects.filter(job__status=BatchStatus.SCORING).filter(
        Q(status=ChunkStatus.RUNNING, started_at__lt=cutoff)
        | Q(status=ChunkStatus.PENDING, job__started_at__lt=cutoff))
    for pk in stale_chunks.values_list("pk", flat=True)[:1000]:
        tasks.batch_chunk_task.delay(pk)
        counts["chunk"] += 1
    for pk in BatchJob.objects.filter(Q(status=BatchStatus.ASSEMBLING) | Q(status=BatchStatus.SCORING,
                                                                         chunks_done=F("chunks_total")),
                                      scored_at__lt=cutoff).values_list("pk", flat=True):
        tasks.batch_assemble_task.delay(pk)
        counts["assemble"] += 1
    for pk in BatchChunk.objects.filter(job__status=BatchStatus.DONE, job__finished_at__lt=cutoff, logged=False,
                                        status=ChunkStatus.DONE).exclude(log_name="").values_list("pk", flat=True)[:1000]:
        tasks.batch_log_task.delay(pk)
        counts["log"] += 1
    return counts


def batch_download_record(*, job: BatchJob, actor: Any, which: str) -> Any:
    """The blob a user downloads (``result`` or ``errors``), with the audit event saying who fetched which file."""
    require_capability(actor, "run_batch")
    blob = job.result_blob if which == "result" else job.errors_blob
    if blob is None:
        if which == "result":
            raise ValidationError({"status": f"The job is {job.status}; its result is there once it is done."})
        raise ValidationError({"errors": "This job has no errors file: every row passed the signature."})
    audit_record(AuditAction.BATCH_DOWNLOAD, actor=actor, target=batch_target(job),
                 metadata={"file": which, "sha256": blob.sha256, "bytes": blob.size})
    return blob


def result_filename(job: BatchJob, which: str) -> str:
    stem = Path(job.input_filename).stem or "input"
    if which == "errors":
        return f"{stem}-errors.csv"
    return f"{stem}-scored.{'csv' if job.input_format == 'csv' else 'parquet'}"


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def _check_cron(cron: str) -> list[str]:
    from celery.schedules import crontab

    fields = cron.split()
    if len(fields) != 5:
        raise ValidationError({"cron": "Give five fields: minute hour day-of-month month day-of-week (e.g. "
                                       "'0 2 * * *' for 02:00 UTC every day)."})
    try:
        crontab(*fields)
    except (ValueError, TypeError) as exc:
        raise ValidationError({"cron": f"{cron!r} is not a valid schedule: {exc}"}) from None
    return fields


def _check_location(location: str) -> str:
    location = location.strip()
    if not location or location.startswith(("/", "\\")) or "\\" in location or "\x00" in location:
        raise ValidationError({"location": "Give a path inside the team's batch inbox, like 'nightly/' or "
                                           "'nightly/customers.csv'."})
    normal = posixpath.normpath(location)
    if normal.startswith("..") or "/../" in f"/{location}/":
        raise ValidationError({"location": "The location must stay inside the team's batch inbox (no '..')."})
    return normal + ("/" if location.endswith("/") else "")


def inbox_path(schedule: BatchSchedule) -> str:
    return f"{INBOX}/{schedule.model.team.slug}/{schedule.location}"


def _sync_periodic_task(schedule: BatchSchedule) -> None:
    import json

    from django_celery_beat.models import CrontabSchedule, PeriodicTask

    minute, hour, dom, month, dow = schedule.cron.split()
    crontab, _created = CrontabSchedule.objects.get_or_create(minute=minute, hour=hour, day_of_month=dom,
                                                              month_of_year=month, day_of_week=dow, timezone="UTC")
    task = schedule.periodic_task or PeriodicTask(name=f"batch-schedule-{schedule.pk}")
    task.task = "registry.tasks.batch_schedule_fire"
    task.args = json.dumps([schedule.pk])
    task.crontab = crontab
    task.interval = None
    task.enabled = schedule.enabled
    task.description = f"Batch schedule {schedule}"
    task.save()
    if schedule.periodic_task_id != task.pk:
        BatchSchedule.objects.filter(pk=schedule.pk).update(periodic_task=task)
        schedule.periodic_task = task


def _schedule_summary(schedule: BatchSchedule) -> dict[str, Any]:
    return {"name": schedule.name, "environment": schedule.environment, "location": schedule.location,
            "cron": schedule.cron, "enabled": schedule.enabled, "id_column": schedule.id_column,
            "subject_column": schedule.subject_column}


def schedule_create(*, model: RegisteredModel, environment: str, name: str, location: str, cron: str, actor: Any,
                    id_column: str = "", subject_column: str = "", enabled: bool = True) -> BatchSchedule:
    require_capability(actor, "run_batch")
    environment_param(environment)
    _check_cron(cron)
    name = name.strip()
    if not name:
        raise ValidationError({"name": "Name the schedule."})
    if BatchSchedule.objects.filter(model=model, name=name).exists():
        raise ValidationError({"name": f"{model.name} already has a schedule named {name!r}."})
    with transaction.atomic():
        schedule = BatchSchedule.objects.create(
            model=model, environment=environment, name=name[:100], location=_check_location(location),
            cron=" ".join(cron.split()), id_column=id_column, subject_column=subject_column, enabled=enabled,
            created_by=actor)
        _sync_periodic_task(schedule)
        audit_record(AuditAction.BATCH_SCHEDULE_CREATE, actor=actor, target=_schedule_target(schedule),
                     after=_schedule_summary(schedule))
    return schedule


def _schedule_target(schedule: BatchSchedule) -> Target:
    return Target(type="batchschedule", id=str(schedule.pk), repr=str(schedule)[:255],
                  team_slug=schedule.model.team.slug)


def schedule_update(*, schedule: BatchSchedule, actor: Any, **changes: Any) -> BatchSchedule:
    require_capability(actor, "run_batch")
    allowed = {"cron", "enabled", "location", "environment", "id_column", "subject_column"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValidationError({sorted(unknown)[0]: "This field cannot be changed."})
    if "cron" in changes:
        _check_cron(changes["cron"])
        changes["cron"] = " ".join(changes["cron"].split())
    if "location" in changes:
        changes["location"] = _check_location(changes["location"])
    if "environment" in changes:
        environment_param(changes["environment"])
    with transaction.atomic():
        before = _schedule_summary(schedule)
        for key, value in changes.items():
            setattr(schedule, key, value)
        schedule.save()
        _sync_periodic_task(schedule)
        audit_record(AuditAction.BATCH_SCHEDULE_CHANGE, actor=actor, target=_schedule_target(schedule),
                     before=before, after=_schedule_summary(schedule))
    return schedule


def schedule_delete(*, schedule: BatchSchedule, actor: Any) -> None:
    require_capability(actor, "run_batch")
    with transaction.atomic():
        audit_record(AuditAction.BATCH_SCHEDULE_DELETE, actor=actor, target=_schedule_target(schedule),
                     before=_schedule_summary(schedule))
        task = schedule.periodic_task
        schedule.delete()
        if task is not None:
            task.delete()


def _newest_file(prefix: str) -> str | None:
    store = storage.artifact_storage()
    try:
        _dirs, files = store.listdir(prefix)
    except (FileNotFoundError, NotADirectoryError):
        return None
    candidates = [f"{prefix.rstrip('/')}/{f}" for f in files if f.lower().endswith((".csv", ".parquet"))]
    if not candidates:
        return None
    return max(candidates, key=lambda name: (store.get_modified_time(name), name))


def batch_schedule_fire(*, schedule_id: int) -> BatchJob | None:
    """One run of a schedule: the file (or the newest CSV/Parquet file of the folder) becomes a job."""
    schedule = BatchSchedule.objects.select_related("model__team", "created_by").filter(pk=schedule_id).first()
    if schedule is None or not schedule.enabled:
        return None
    now = timezone.now()
    owner = schedule.created_by
    try:
        if owner is None or not has_capability(owner, "run_batch") or not (
                has_capability(owner, "view_all_teams") or owner.memberships.filter(team=schedule.model.team).exists()):
            raise PermissionDenied("the schedule's owner may no longer run batch jobs for this team")
        location = inbox_path(schedule)
        name = _newest_file(location) if location.endswith("/") else location
        store = storage.artifact_storage()
        if name is None or not store.exists(name):
            raise ValidationError({"location": f"no CSV or Parquet file at {location}"})
        fd, tmp = _tmp_file()
        with os.fdopen(fd, "wb") as out, store.open(name, "rb") as src:
            while piece := src.read(storage.CHUNK * 8):
                out.write(piece)
        try:
            job = batch_submit(model=schedule.model, environment=schedule.environment, path=tmp,
                               filename=posixpath.basename(name), actor=owner, schedule=schedule,
                               options=BatchOptions(id_column=schedule.id_column,
                                                    subject_column=schedule.subject_column))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except (ValidationError, PermissionDenied) as exc:
        message = error_text(exc)
        BatchSchedule.objects.filter(pk=schedule.pk).update(last_run_at=now, last_error=message[:1000])
        logger.warning("Batch schedule %s did not run: %s", schedule, message)
        return None
    BatchSchedule.objects.filter(pk=schedule.pk).update(last_run_at=now, last_error="")
    return job
