"""Experiment pages: an environment's experiments with the start form (and its sample-size plan), one experiment
with its plot, counts, guardrails, SRM and verdict, and the stop button."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from monitoring.experiments import selectors, services
from monitoring.experiments.models import ExperimentStatus, Metric, Verdict
from monitoring.experiments.selectors import GUARDRAILS
from monitoring.selectors import thresholds_for
from portal.permissions import has_capability
from portal.views import error_text
from registry.models import Environment, EnvironmentState, ServingMode
from registry.versions import selectors as registry_selectors

FORM_FIELDS = ("metric", "mde", "alpha", "traffic_percent", "name", "segment_column", *GUARDRAILS)


def _number(raw: str, cast: Any, field: str) -> Any:
    if raw.strip() == "":
        return None
    try:
        return cast(raw)
    except ValueError:
        raise ValidationError({field: f"{field} is a number."}) from None


def _form_values(post: Any) -> dict[str, Any]:
    guard: dict[str, Any] = {}
    for key in GUARDRAILS:
        raw = post.get(key, "")
        if raw.strip().lower() == "off":
            guard[key] = None
        elif raw.strip():
            guard[key] = _number(raw, float, key)
    return {"metric": post.get("metric", ""), "mde": _number(post.get("mde", ""), float, "mde"),
            "alpha": _number(post.get("alpha", "") or "0.05", float, "alpha"),
            "traffic_percent": _number(post.get("traffic_percent", ""), int, "traffic_percent"),
            "guardrails": guard, "name": post.get("name", "")[:200],
            "segment_column": post.get("segment_column", "")[:200]}


@login_required
@require_http_methods(["GET", "POST"])
def environment_experiments(request: HttpRequest, name: str, env: str) -> HttpResponse:
    """GET: the environment's experiments, the start form and, with ?plan=1, the sample it needs. POST: start."""
    model = registry_selectors.model_get(user=request.user, name=name, action="view_monitoring")
    if env not in Environment.values:
        raise Http404("No such environment.")
    may_start = has_capability(request.user, "deploy_dev" if env == "dev" else "rollback_environment")
    if request.method == "POST":
        if not may_start:
            raise PermissionDenied("Your role does not allow starting experiments here.")
        try:
            values = _form_values(request.POST)
            experiment = services.experiment_start(model=model, environment=env, metric=values["metric"],
                                                   mde=values["mde"], alpha=values["alpha"],
                                                   traffic_percent=values["traffic_percent"],
                                                   guardrails=values["guardrails"], name=values["name"],
                                                   segment_column=values["segment_column"], actor=request.user)
        except (ValidationError, PermissionDenied) as exc:
            messages.error(request, error_text(exc))
            return _list_page(request, model, env, may_start, dict(request.POST.items()), status=400)
        messages.success(request, "Experiment started. Beat analyses it every minute; look as often as you like.")
        return redirect("monitoring:experiment", uid=experiment.uid)
    return _list_page(request, model, env, may_start, dict(request.GET.items()))


def _list_page(request: HttpRequest, model: Any, env: str, may_start: bool, form: dict[str, Any],
               status: int = 200) -> HttpResponse:
    state = EnvironmentState.objects.filter(model=model, environment=env).select_related(
        "champion__version", "challenger__version").first()
    canary = state is not None and state.mode == ServingMode.CANARY and state.challenger_id is not None
    plan: dict[str, Any] | None = None
    plan_error = ""
    if form.get("plan") and canary and state is not None:
        try:
            values = _form_values(form)
            share = values["traffic_percent"] if values["traffic_percent"] is not None else state.challenger_percent
            plan = services.experiment_plan(model=model, environment=env, metric=values["metric"],
                                            mde=values["mde"], alpha=values["alpha"], traffic_percent=share)
        except ValidationError as exc:
            plan_error = error_text(exc)
    thresholds = thresholds_for(model)
    defaults = {key: thresholds.get(meta["threshold"]) for key, meta in GUARDRAILS.items()}
    experiments = selectors.experiments_for(user=request.user).filter(model=model, environment=env)[:50]
    segment_options = services.segment_options(model, state) if canary and state is not None else []
    return render(request, "monitoring/experiments.html", {
        "model": model, "env": env, "state": state, "canary": canary, "may_start": may_start,
        "experiments": experiments, "metrics": Metric.choices, "form": form, "plan": plan,
        "plan_error": plan_error, "guardrail_defaults": defaults, "guardrails": GUARDRAILS,
        "segment_options": segment_options,
    }, status=status)


@login_required
@require_GET
def experiment_detail(request: HttpRequest, uid: str) -> HttpResponse:
    experiment = selectors.experiment_get(user=request.user, uid=uid)
    analysis = experiment.analysis or {}
    if not analysis:  # not analysed by beat yet: read it now (from the rollups, so it costs little)
        analysis = selectors.experiment_analysis(experiment)
    may_stop = experiment.status == ExperimentStatus.RUNNING and has_capability(
        request.user, "deploy_dev" if experiment.environment == "dev" else "rollback_environment")
    x = {**selectors.experiment_json(experiment), "analysis": analysis}
    return render(request, "monitoring/experiment.html", {
        "experiment": experiment, "model": experiment.model, "x": x,
        "verdict_label": Verdict(experiment.verdict).label, "may_stop": may_stop,
        "chart": {"series": analysis.get("series") or {}, "metric": experiment.metric,
                  "mde": experiment.mde, "higher_is_better": experiment.higher_is_better},
    })


@login_required
@require_POST
def experiment_stop(request: HttpRequest, uid: str) -> HttpResponse:
    experiment = selectors.experiment_get(user=request.user, uid=uid)
    try:
        services.experiment_stop(experiment=experiment, actor=request.user,
                                 reason=request.POST.get("reason", "")[:1000],
                                 stop_traffic=request.POST.get("stop_traffic") == "1")
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
    else:
        messages.success(request, "Experiment stopped.")
    return redirect("monitoring:experiment", uid=experiment.uid)
