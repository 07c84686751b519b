"""Monitoring pages: the portfolio (every serving environment with a traffic light), one model's environment with
its Plotly panels, alert acknowledgement and resolution, thresholds, Prometheus ``/metrics``, and the GDPR subject
access and erasure pages."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import orjson
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.serializers.json import DjangoJSONEncoder
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from monitoring import alerts, gdpr, metrics, selectors
from monitoring.models import Alert, MonitoringSettings
from monitoring.sensitive import recent_predictions
from portal.permissions import has_capability, require_capability
from registry.models import Environment
from registry.versions import selectors as registry_selectors

RANGE_LABELS = {"1h": "Last hour", "6h": "6 hours", "24h": "24 hours", "7d": "7 days", "30d": "30 days",
                "90d": "90 days"}


@login_required
@require_GET
def portfolio(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "view_monitoring")
    rows = selectors.portfolio(user=request.user)
    schedule: Any = settings.CELERY_BEAT_SCHEDULE["monitoring-rollups"]["schedule"]
    return render(request, "monitoring/portfolio.html", {
        "rows": rows, "rollup_seconds": int(schedule.total_seconds())})


def _environment(request: HttpRequest, name: str, env: str) -> Any:
    model = registry_selectors.model_get(user=request.user, name=name, action="view_monitoring")
    if env not in Environment.values:
        raise Http404("No such environment.")
    return model


@login_required
@require_GET
def model_monitoring(request: HttpRequest, name: str, env: str) -> HttpResponse:
    model = _environment(request, name, env)
    params: dict[str, str] = {k: str(v) for k, v in request.GET.items()}
    if not any(params.get(k) for k in ("range", "from", "to")):  # a range that fits the data (an hour when young)
        params["range"] = selectors.default_range(model=model, environment=env)
    try:
        start, end = selectors.parse_range(params)
        invalid = ""
    except ValueError as exc:
        params = {"range": "24h"}
        start, end = selectors.parse_range(params)
        invalid = str(exc)
    try:
        version = selectors.version_param(model, params.get("version"))
    except ValueError as exc:
        version, invalid_version = None, f"{exc} Showing the version serving now instead."
    else:
        invalid_version = ""
    summary = selectors.monitoring_summary(model=model, environment=env, start=start, end=end, version=version)
    # The switcher keeps the range; the range links keep the version.
    keep_range = {k: params[k] for k in ("range", "from", "to") if params.get(k)}
    settings_row = MonitoringSettings.objects.filter(model=model).first()
    preset = params.get("range", "")
    return render(request, "monitoring/model.html", {
        "model": model, "env": env, "summary": summary, "ranges": RANGE_LABELS, "preset": preset,
        "range_label": RANGE_LABELS.get(preset, "the chosen range"),
        "invalid": invalid, "chart_data": {k: summary[k] for k in (
            "time", "series", "heatmap", "distributions", "prediction_distribution", "drift", "roles", "granularity",
            "from", "to", "version")},
        "invalid_version": invalid_version, "range_query": urlencode(keep_range), "version_query": f"&version={version}" if version is not None else "",
        "alerts": Alert.objects.filter(model=model, environment=env).select_related(
            "acknowledged_by", "resolved_by").order_by("-opened_at")[:20],
        "may_manage": has_capability(request.user, "manage_alerts"),
        "thresholds_json": orjson.dumps(settings_row.thresholds if settings_row else {},
                                        option=orjson.OPT_INDENT_2).decode(),
        "target_column": settings_row.target_column if settings_row else "",
        "defaults": alerts.thresholds_defaults(),
        **_attribution_context(model, env),
    })


def _attribution_context(model: Any, env: str) -> dict[str, Any]:
    from monitoring import attribution

    record = attribution.latest(model, env)
    return {"attribution": record, "attribution_rows": attribution.rows_for_page(record),
            "attribution_limit": selectors.thresholds_for(model).get("attribution_drift_max")}



@login_required
@require_POST
def alert_acknowledge(request: HttpRequest, uid: str) -> HttpResponse:
    alert = selectors.alert_get(user=request.user, uid=uid)
    try:
        alerts.alert_acknowledge(alert=alert, actor=request.user, comment=request.POST.get("comment", "")[:1000])
        messages.success(request, "Alert acknowledged; it stays open until its condition clears or it is resolved.")
    except alerts.AlertError as exc:
        messages.error(request, str(exc))
    return redirect("monitoring:model", name=alert.model.name, env=alert.environment)


@login_required
@require_POST
def alert_resolve(request: HttpRequest, uid: str) -> HttpResponse:
    alert = selectors.alert_get(user=request.user, uid=uid)
    try:
        alerts.alert_resolve(alert=alert, actor=request.user, resolution=request.POST.get("resolution", "")[:2000])
        messages.success(request, "Alert resolved.")
    except alerts.AlertError as exc:
        messages.error(request, str(exc))
    return redirect("monitoring:model", name=alert.model.name, env=alert.environment)


@login_required
@require_POST
def settings_change(request: HttpRequest, name: str, env: str) -> HttpResponse:
    model = _environment(request, name, env)
    require_capability(request.user, "manage_alerts")
    try:
        thresholds = orjson.loads(request.POST.get("thresholds", "").strip() or "{}")
    except orjson.JSONDecodeError as exc:
        messages.error(request, f"Thresholds are not valid JSON: {exc}.")
        return redirect("monitoring:model", name=name, env=env)
    try:
        alerts.monitoring_settings_change(model=model, thresholds=thresholds, actor=request.user,
                                          target_column=request.POST.get("target_column", ""))
        messages.success(request, "Monitoring thresholds saved; alerts use them from their next evaluation.")
    except (alerts.AlertError, PermissionDenied) as exc:
        messages.error(request, str(exc))
    return redirect("monitoring:model", name=name, env=env)


@require_GET
def prometheus_metrics(request: HttpRequest) -> HttpResponse:
    if not metrics.allowed(request):
        return HttpResponse("Not allowed: send the metrics token (Authorization: Bearer …) or scrape from an "
                            "address in PORTAL_METRICS_ALLOW.\n", status=403, content_type="text/plain")
    return HttpResponse(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")


@login_required
@require_GET
def environment_predictions(request: HttpRequest, name: str, env: str) -> HttpResponse:
    model = registry_selectors.model_get(user=request.user, name=name, action="view_monitoring")
    if env not in Environment.values:
        raise Http404("No such environment.")
    data = recent_predictions(model=model, environment=env, actor=request.user, limit=50)
    return render(request, "monitoring/predictions.html", {"model": model, "env": env, **data})


@login_required
@require_GET
def records_of_processing(request: HttpRequest) -> HttpResponse:
    """GDPR Art. 30: which models process which categories of data, for what, kept how long, seen by whom —
    generated from the registry, so it is never out of date."""
    require_capability(request.user, "view_audit")
    return render(request, "monitoring/records_of_processing.html", gdpr.records_of_processing())


# --- GDPR subject rights in the browser (the same services, and so the same audit events, as the API) -----------

SUBJECT_REPORT_ROWS = 200  # rows shown on the page; the download holds every one


def _subject_id(request: HttpRequest) -> tuple[str, str]:
    """The subject id of the form, as given (ids are matched exactly, spaces included), and what is wrong with it."""
    raw = request.POST.get("subject_id", "")
    if not raw.strip():
        return raw, "Give the subject id that the scoring calls sent (subject_ids)."
    if len(raw) > gdpr.MAX_SUBJECT_ID:
        return raw, f"A subject id has at most {gdpr.MAX_SUBJECT_ID} characters."
    return raw, ""


def _with_feedback(report: dict[str, Any]) -> list[dict[str, Any]]:
    truth = {f["prediction_id"]: f for f in report["feedback"]}
    return [{**p, "feedback": truth.get(p["id"])} for p in report["predictions"][:SUBJECT_REPORT_ROWS]]


@never_cache
@login_required
@require_http_methods(["GET", "POST"])
def subject_access(request: HttpRequest) -> HttpResponse:
    """Subject access (Art. 15): search by subject id (POSTed, so it never sits in a URL or an access log). The
    report is compiled by a worker (each decision is explained by its version's sandboxed host, seconds per
    version): the search asks for it and goes to its page, which follows it until it is ready."""
    require_capability(request.user, "manage_subjects")
    subject_id, error = "", ""
    if request.method == "POST":
        subject_id, error = _subject_id(request)
        if not error:
            report = gdpr.subject_report_request(subject_id=subject_id, actor=request.user)
            return redirect("portal:subject-report", uid=report.uid)
    return render(request, "monitoring/subject_access.html", {"subject_id": subject_id, "error": error},
                  status=400 if error else 200)


def _parsed_report(data: dict[str, Any]) -> dict[str, Any]:
    """A stored report's times (ISO strings in the JSON) as datetimes, for the page's date formats."""
    from django.utils.dateparse import parse_datetime

    def when(value: Any) -> Any:
        return parse_datetime(value) if isinstance(value, str) else value

    return {**data, "generated_at": when(data.get("generated_at")),
            "predictions": [{**p, "created_at": when(p.get("created_at"))} for p in data["predictions"]]}


def _own_report(request: HttpRequest, uid: Any) -> Any:
    report = gdpr.subject_report_get(uid=uid, actor=request.user)
    if report is None:
        raise Http404("No such report of yours (reports are kept for an hour).")
    return report


@never_cache
@login_required
@require_GET
def subject_report(request: HttpRequest, uid: Any) -> HttpResponse:
    """One subject access report: its progress while a worker compiles it (the page refreshes itself), then what
    is held, with its download. Only the officer who asked sees it; it is kept for an hour."""
    require_capability(request.user, "manage_subjects")
    report = _own_report(request, uid)
    data = _parsed_report(gdpr.subject_report_data(report)) if report.status == "ready" else None
    return render(request, "monitoring/subject_report.html", {
        "job": report, "report": data, "stalled": gdpr.subject_report_stalled(report),
        "shown": SUBJECT_REPORT_ROWS, "rows": _with_feedback(data) if data else [],
        "keep_minutes": report.KEEP_SECONDS // 60,
    })


@never_cache
@login_required
@require_GET
def subject_report_download(request: HttpRequest, uid: Any) -> HttpResponse:
    """The ready report as JSON: a further access, audited as the search was."""
    require_capability(request.user, "manage_subjects")
    report = _own_report(request, uid)
    if report.status != "ready":
        return render(request, "monitoring/subject_report.html", {
            "job": report, "report": None, "stalled": gdpr.subject_report_stalled(report),
            "keep_minutes": report.KEEP_SECONDS // 60}, status=409)
    data = gdpr.subject_report_download(report=report, actor=request.user)
    body = json.dumps(data, cls=DjangoJSONEncoder, indent=2, ensure_ascii=False)
    response = HttpResponse(body, content_type="application/json")
    name = f"subject-{data['subject_hash'][:12]}-{timezone.now():%Y%m%d-%H%M%S}.json"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


@never_cache
@login_required
@require_http_methods(["GET", "POST"])
def subject_erasure(request: HttpRequest) -> HttpResponse:
    """Erasure (Art. 17) in three steps: the subject id, a confirmation naming exactly what will be removed (counted,
    nothing read), then the erasure and its receipt (the audit event that records it)."""
    require_capability(request.user, "manage_subjects")
    context: dict[str, Any] = {"step": "start", "subject_id": "", "error": ""}
    if request.method == "POST":
        subject_id, error = _subject_id(request)
        context.update(subject_id=subject_id, error=error)
        if error:
            return render(request, "monitoring/subject_erasure.html", context, status=400)
        if request.POST.get("step") == "erase":
            if request.POST.get("confirm") != "yes":
                context.update(step="confirm", error="Tick the box to confirm the erasure.",
                               holdings=gdpr.subject_holdings(subject_id=subject_id, actor=request.user),
                               reason=request.POST.get("reason", "")[:1000])
                return render(request, "monitoring/subject_erasure.html", context, status=400)
            receipt = gdpr.subject_erase(subject_id=subject_id, actor=request.user,
                                         reason=request.POST.get("reason", "")[:1000])
            context.update(step="receipt", receipt=receipt, subject_id="")
        else:
            context.update(step="confirm", holdings=gdpr.subject_holdings(subject_id=subject_id,
                                                                          actor=request.user))
    return render(request, "monitoring/subject_erasure.html", context)
