"""Endpoint pages: the team's endpoints (and creating one), one endpoint's rules with the form that replaces them,
and deleting it. Everyone in a team reads; those who may change what serves in the environment edit (dev: data
scientists; stage and prod: team managers), checked again by the services."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from portal.models import Team
from portal.permissions import get_object_for_user, has_capability, require_capability, scope_to_teams
from portal.views import error_text
from registry.endpoints import selectors, services
from registry.models import Environment, RuleKind
from registry.versions.views import keep_input, kept_input

_FORM_KEY = "endpoint-create"
BLANK_RULE_ROWS = 3
MAX_FORM_RULES = services.MAX_RULES


def _editable_environments(user: Any) -> list[str]:
    return [env for env in Environment.values if has_capability(user, services.edit_capability(env))]


@login_required
@require_GET
def endpoint_list_page(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "view_models")
    teams = list(scope_to_teams(Team.objects.all(), request.user).order_by("slug"))
    envs = _editable_environments(request.user)
    served = {team.slug: {env: selectors.deployable_models(endpoint_team_id=team.pk, environment=env)
                          for env in envs} for team in teams} if envs else {}
    return render(request, "registry/endpoints.html", {
        "endpoints": selectors.endpoint_list(user=request.user), "teams": teams, "environments": envs,
        "served": served, "kept": kept_input(request, _FORM_KEY)})


@login_required
@require_POST
def endpoint_create_page(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "view_models")
    env = request.POST.get("environment", "")
    if env in Environment.values:
        require_capability(request.user, services.edit_capability(env))
    try:
        team = get_object_for_user(request.user, Team.objects.all(), slug=request.POST.get("team", "")[:64])
        endpoint = services.endpoint_create(team=team, name=request.POST.get("name", "")[:100], environment=env,
                                            default_model=request.POST.get("default", "")[:100],
                                            description=request.POST.get("description", "")[:2000],
                                            actor=request.user)
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        keep_input(request, _FORM_KEY, ("team", "name", "environment", "default", "description"))
        return redirect("registry:endpoints")
    messages.success(request, f"Endpoint {endpoint.name} answers in {endpoint.environment}: every row goes to "
                     f"{endpoint.default_model.name if endpoint.default_model else '—'} until you add rules.")
    return redirect("registry:endpoint", endpoint_name=endpoint.name, env=endpoint.environment)


@login_required
@require_GET
def endpoint_page(request: HttpRequest, endpoint_name: str, env: str) -> HttpResponse:
    endpoint = selectors.endpoint_get(user=request.user, name=endpoint_name, environment=env)
    may_edit = has_capability(request.user, services.edit_capability(env))
    rules = selectors.endpoint_rules(endpoint)
    form_rows = [r for r in rules if r["position"] is not None] + [
        {"position": None, "kind": "", "key": "", "values": [], "percent": None, "model": ""}
        for _ in range(BLANK_RULE_ROWS)]
    return render(request, "registry/endpoint_detail.html", {
        "endpoint": endpoint, "rules": rules, "may_edit": may_edit, "form_rows": form_rows,
        "kinds": RuleKind.choices,
        "models": selectors.deployable_models(endpoint_team_id=endpoint.team_id, environment=env) if may_edit
        else [],
        "invocations": f"/api/v1/serve/endpoints/{endpoint.name}/{endpoint.environment}/invocations"})


def rules_from_form(post: Any) -> list[services.RuleInput]:
    """The form's rows (``kind-N``, ``model-N``, ``key-N``, ``values-N``, ``percent-N``) in order; a row without a
    kind is left out. Values of ``field_in`` are comma-separated; other kinds take the whole text as one value."""
    rules: list[services.RuleInput] = []
    for i in range(MAX_FORM_RULES + BLANK_RULE_ROWS):
        kind = post.get(f"kind-{i}", "").strip()
        if not kind:
            continue
        text = post.get(f"values-{i}", "")[:20000]
        values = [v.strip() for v in text.split(",") if v.strip()] if kind == RuleKind.FIELD_IN else (
            [text.strip()] if text.strip() else [])
        percent_text = post.get(f"percent-{i}", "").strip()
        try:
            percent = int(percent_text) if percent_text else None
        except ValueError:
            raise ValidationError({f"rules[{len(rules)}]": "The share is a whole number from 1 to 100."}) from None
        rules.append(services.RuleInput(kind=kind, model=post.get(f"model-{i}", "")[:100],
                                        key=post.get(f"key-{i}", "")[:200], values=tuple(values), percent=percent))
    return rules


@login_required
@require_POST
def endpoint_rules_page(request: HttpRequest, endpoint_name: str, env: str) -> HttpResponse:
    endpoint = selectors.endpoint_get(user=request.user, name=endpoint_name, environment=env,
                                      action=services.edit_capability(env))
    try:
        services.endpoint_update(endpoint=endpoint, actor=request.user, rules=rules_from_form(request.POST),
                                 default_model=request.POST.get("default", "")[:100] or None,
                                 description=request.POST.get("description", "")[:2000])
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, f"Nothing was changed: {error_text(exc)}")
        return redirect("registry:endpoint", endpoint_name=endpoint_name, env=env)
    messages.success(request, "The rules are saved; serving workers route by them within a second.")
    return redirect("registry:endpoint", endpoint_name=endpoint_name, env=env)


@login_required
@require_POST
def endpoint_delete_page(request: HttpRequest, endpoint_name: str, env: str) -> HttpResponse:
    endpoint = selectors.endpoint_get(user=request.user, name=endpoint_name, environment=env,
                                      action=services.edit_capability(env))
    services.endpoint_delete(endpoint=endpoint, actor=request.user)
    messages.success(request, f"Endpoint {endpoint_name} in {env} is deleted; its models still answer at their own routes.")
    return redirect("registry:endpoints")
