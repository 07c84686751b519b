"""The MLflow connections page: each team's tracking servers, what their webhooks and the reconcile have done, the
sync jobs that failed (with a retry), and connecting or disabling a server. Everyone in a team who sees its models
sees its connections; only those who manage teams connect, disable and retry (checked again by the services)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from portal.models import Team
from portal.permissions import get_object_for_user, has_capability, require_capability, scope_to_teams
from portal.views import error_text
from registry.mlflow_sync import selectors, services
from registry.models import MlflowConnection, MlflowSyncJob
from registry.versions.mlflow_import import TrackingServerUnavailable
from registry.versions.views import keep_input, kept_input

_FORM_KEY = "mlflow-connect"


@login_required
@require_GET
def connections_page(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "view_models")
    may_manage = has_capability(request.user, "manage_teams")
    teams = list(scope_to_teams(Team.objects.all(), request.user).order_by("slug")) if may_manage else []
    kept = kept_input(request, _FORM_KEY)
    return render(request, "registry/mlflow_connections.html", {
        "overview": selectors.connections_overview(user=request.user), "may_manage": may_manage, "teams": teams,
        "kept": kept, "webhook_path": services.WEBHOOK_PATH,
    })


@login_required
@require_POST
def connection_create(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "manage_teams")
    try:
        team = get_object_for_user(request.user, Team.objects.all(), action="manage_teams",
                                   slug=request.POST.get("team", "")[:64])
        connection = services.mlflow_connect(team=team, tracking_uri=request.POST.get("tracking_uri", "")[:500],
                                             write_back=request.POST.get("write_back") == "on", actor=request.user,
                                             portal_url=request.POST.get("portal_url", "")[:300])
    except (ValidationError, PermissionDenied, TrackingServerUnavailable) as exc:
        messages.error(request, str(exc) if isinstance(exc, TrackingServerUnavailable) else error_text(exc))
        keep_input(request, _FORM_KEY, ("team", "tracking_uri", "portal_url", "write_back"))
        return redirect("registry:mlflow-connections")
    messages.success(request, f"Team {team.slug} is connected to {connection.tracking_uri}: its webhook is "
                     "registered there, and new versions of its registered models will be imported.")
    return redirect("registry:mlflow-connections")


def _connection(request: HttpRequest, uid: str) -> MlflowConnection:
    """Another team's connection is a 404; a role that does not manage teams, a 403."""
    return get_object_for_user(request.user, MlflowConnection.objects.select_related("team"), action="manage_teams",
                               uid=uid)


@login_required
@require_POST
def connection_disable(request: HttpRequest, uid: str) -> HttpResponse:
    connection = _connection(request, uid)
    try:
        connection = services.mlflow_disconnect(connection=connection, actor=request.user)
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        return redirect("registry:mlflow-connections")
    messages.success(request, f"The connection to {connection.tracking_uri} is disabled: its webhook deliveries "
                     "are refused and nothing more is imported or written back.")
    return redirect("registry:mlflow-connections")


@login_required
@require_POST
def sync_job_retry(request: HttpRequest, uid: str) -> HttpResponse:
    job = get_object_for_user(request.user, MlflowSyncJob.objects.select_related("connection__team"),
                              action="manage_teams", uid=uid)
    try:
        services.sync_job_retry(job=job, actor=request.user)
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        return redirect("registry:mlflow-connections")
    messages.success(request, f"{job.registered_model}/{job.mlflow_version} is queued again.")
    return redirect("registry:mlflow-connections")
