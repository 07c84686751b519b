"""Deployment pages: deploying a version to dev, and a deployment's live progress, log and error."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from registry.deployments.selectors import cold_load_summary
from registry.deployments.services import deployment_start
from registry.versions import selectors
from registry.versions.views import keep_input


@login_required
@require_POST
def version_deploy(request: HttpRequest, name: str, number: int) -> HttpResponse:
    version = selectors.version_get(user=request.user, name=name, number=number, action="deploy_dev")
    try:
        deployment = deployment_start(version=version, environment="dev",
                                      strategy=request.POST.get("strategy", "replace"),
                                      traffic_percent=int(request.POST.get("traffic_percent") or 100),
                                      reason=request.POST.get("reason", "")[:2000], actor=request.user)
    except (ValidationError, ValueError) as exc:
        messages.error(request, " ".join(getattr(exc, "messages", [str(exc)])))
        keep_input(request, f"deploy:{version.pk}", ("strategy", "traffic_percent"))
        return redirect("registry:version", name=name, number=number)
    return redirect("registry:deployment", uid=deployment.uid)


@login_required
@require_GET
def deployment_detail(request: HttpRequest, uid: str) -> HttpResponse:
    deployment = selectors.deployment_get(user=request.user, uid=uid)
    return render(request, "registry/deployment_detail.html", {"deployment": deployment,
                                                                "model": deployment.model,
                                                                "cold": cold_load_summary(deployment)})
