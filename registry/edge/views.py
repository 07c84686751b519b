"""Edge pages: a model's packages (build one, follow it live, download it) and its device tokens."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from portal.permissions import has_capability
from portal.views import error_text
from registry.edge import selectors, services, signing
from registry.models import Environment, VersionStatus
from registry.versions import selectors as version_selectors


def _edge_page(request: HttpRequest, model: Any, *, new_token: str = "", status: int = 200) -> HttpResponse:
    packages = list(selectors.package_list(model=model)[:50])
    tokens = list(selectors.token_list(model=model))
    return render(request, "registry/edge.html", {
        "model": model, "packages": packages, "tokens": tokens, "new_token": new_token,
        "ready_versions": list(model.versions.filter(status=VersionStatus.READY).order_by("-number")),
        "environments": Environment.values, "can_build": has_capability(request.user, "deploy_dev"),
        "can_download": has_capability(request.user, "download_artifact"),
        "last_report": services.last_reports(model), "fingerprint": _fingerprint(),
    }, status=status)


def _fingerprint() -> str:
    """The edge key's fingerprint, or "" where none is configured (builds then fail saying so)."""
    try:
        return signing.public_key_fingerprint()
    except ImproperlyConfigured:
        return ""


@login_required
@require_GET
def edge_page(request: HttpRequest, name: str) -> HttpResponse:
    model = version_selectors.model_get(user=request.user, name=name, action="view_models")
    return _edge_page(request, model)


@login_required
@require_POST
def package_create(request: HttpRequest, name: str) -> HttpResponse:
    model = version_selectors.model_get(user=request.user, name=name, action="deploy_dev")
    try:
        number = int(request.POST.get("version", ""))
    except ValueError:
        messages.error(request, "Choose a version to package.")
        return redirect("registry:edge", name=model.name)
    version = version_selectors.version_get(user=request.user, name=model.name, number=number)
    try:
        package = services.edge_package_request(version=version, int8=request.POST.get("int8") == "on",
                                                actor=request.user)
    except ValidationError as exc:
        messages.error(request, error_text(exc))
        return redirect("registry:edge", name=model.name)
    return redirect("registry:edge-package", uid=package.uid)


@login_required
@require_GET
def package_page(request: HttpRequest, uid: str) -> HttpResponse:
    package = selectors.package_get(user=request.user, uid=uid)
    return render(request, "registry/edge_package.html", {
        "package": package, "model": package.model,
        "can_download": has_capability(request.user, "download_artifact")})


@login_required
@require_POST
def token_create(request: HttpRequest, name: str) -> HttpResponse:
    model = version_selectors.model_get(user=request.user, name=name, action="deploy_dev")
    try:
        _token, plaintext = services.device_token_create(
            model=model, name=request.POST.get("name", ""), environment=request.POST.get("environment", "prod"),
            actor=request.user)
    except ValidationError as exc:
        messages.error(request, error_text(exc))
        return _edge_page(request, model, status=400)
    # The token is shown on this answer only (never stored in clear, never in a redirect's URL or session).
    return _edge_page(request, model, new_token=plaintext)


@login_required
@require_POST
def token_revoke(request: HttpRequest, uid: str) -> HttpResponse:
    token = selectors.token_get(user=request.user, uid=uid, action="deploy_dev")
    try:
        services.device_token_revoke(token=token, actor=request.user)
        messages.success(request, f"Device token {token.name} ({token.prefix}…) is revoked: its uploads are refused.")
    except ValidationError as exc:
        messages.error(request, error_text(exc))
    return redirect("registry:edge", name=token.model.name)
