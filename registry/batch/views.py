"""Batch scoring pages: submit a file (uploaded with a progress bar), follow a job live, cancel it, schedules."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from portal.permissions import has_capability
from portal.views import error_text
from registry.batch import selectors as batch_selectors
from registry.batch import services as batch
from registry.batch.forms import BatchScheduleForm
from registry.models import ENVIRONMENT_ORDER, BatchSchedule, EnvironmentState
from registry.versions import selectors


@login_required
@require_GET
def batch_page(request: HttpRequest, name: str) -> HttpResponse:
    model = selectors.model_get(user=request.user, name=name, action="view_models")
    return _batch_page(request, model, BatchScheduleForm(model=model, initial={"environment": "dev"}))


def _batch_page(request: HttpRequest, model: Any, schedule_form: BatchScheduleForm, status: int = 200) -> HttpResponse:
    serving = dict(EnvironmentState.objects.filter(model=model, champion__isnull=False)
                   .values_list("environment", "champion__version__number"))
    jobs = Paginator(batch_selectors.job_list(user=request.user, model=model.name), 25).get_page(request.GET.get("page"))
    schedules = list(model.batch_schedules.select_related("created_by", "model__team"))
    return render(request, "registry/batch.html", {
        "model": model, "jobs": jobs, "schedules": [(s, batch.inbox_path(s)) for s in schedules],
        "environments": [(str(env), serving.get(str(env))) for env in ENVIRONMENT_ORDER],
        "can_run": has_capability(request.user, "run_batch"),
        "max_upload_mb": settings.PORTAL_MAX_UPLOAD_BYTES // (1024 * 1024),
        "default_share": settings.PORTAL_BATCH_MAX_ERROR_SHARE,
        "inbox": f"{batch.INBOX}/{model.team.slug}/", "schedule_form": schedule_form,
    }, status=status)


@login_required
@require_GET
def batch_job_page(request: HttpRequest, uid: str) -> HttpResponse:
    job = batch_selectors.job_get(user=request.user, uid=uid)
    return render(request, "registry/batch_job.html", {
        "job": job, "model": job.model, "chunks": list(job.chunks.order_by("index")),
        "can_run": has_capability(request.user, "run_batch"), "active": job.status in batch.BATCH_ACTIVE,
        "state": selectors.batch_job_state(job=job), "prediction_columns": batch.job_prediction_columns(job),
    })


@login_required
@require_POST
def batch_job_cancel(request: HttpRequest, uid: str) -> HttpResponse:
    job = batch_selectors.job_get(user=request.user, uid=uid)
    try:
        batch.batch_cancel(job=job, actor=request.user)
        messages.success(request, "The job is cancelled; chunks not yet scored will not be.")
    except ValidationError as exc:
        messages.error(request, error_text(exc))
    return redirect("registry:batch-job", uid=job.uid)


@login_required
@require_POST
def schedule_create(request: HttpRequest, name: str) -> HttpResponse:
    model = selectors.model_get(user=request.user, name=name, action="run_batch")
    form = BatchScheduleForm(request.POST, model=model)
    if form.is_valid():
        try:
            schedule = batch.schedule_create(model=model, actor=request.user, **form.cleaned_data)
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                form.add_error(field if field in form.fields else None, errors)
        else:
            messages.success(request, f"Schedule {schedule.name} is on: {schedule.cron} (UTC).")
            return redirect("registry:batch", name=model.name)
    # Every problem at once, next to its field, with what was typed still in the form.
    messages.error(request, "The schedule was not created: correct the fields marked below.")
    return _batch_page(request, model, form, status=400)


def _schedule(request: HttpRequest, pk: int) -> BatchSchedule:
    return batch_selectors.schedule_get(user=request.user, pk=pk)


@login_required
@require_POST
def schedule_toggle(request: HttpRequest, pk: int) -> HttpResponse:
    schedule = _schedule(request, pk)
    batch.schedule_update(schedule=schedule, actor=request.user, enabled=not schedule.enabled)
    messages.success(request, f"Schedule {schedule.name} is {'on' if schedule.enabled else 'paused'}.")
    return redirect("registry:batch", name=schedule.model.name)


@login_required
@require_POST
def schedule_delete(request: HttpRequest, pk: int) -> HttpResponse:
    schedule = _schedule(request, pk)
    model_name = schedule.model.name
    batch.schedule_delete(schedule=schedule, actor=request.user)
    messages.success(request, f"Schedule {schedule.name} is deleted; its past jobs stay.")
    return redirect("registry:batch", name=model_name)
