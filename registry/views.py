"""Registry pages: model list, registration, model and version detail, the upload page, trust decisions."""

from __future__ import annotations

import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from portal.permissions import has_capability, require_capability
from portal.selectors import team_list
from registry import selectors, services
from registry.promotions import PROMOTION_TARGETS
from registry.forms import ModelRegisterForm, TrustDecisionForm


@login_required
@require_GET
def model_list(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "view_models")
    search = request.GET.get("q", "").strip()[:100]
    team = request.GET.get("team", "").strip()[:64]
    page = Paginator(selectors.model_list(user=request.user, search=search, team=team), 50).get_page(
        request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "registry/model_list.html", {
        "page": page, "q": search, "team": team, "teams": team_list(user=request.user), "query": query.urlencode(),
        "can_register": has_capability(request.user, "register_model"),
    })


@login_required
@require_http_methods(["GET", "POST"])
def model_register(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "register_model")
    teams = team_list(user=request.user)
    form = ModelRegisterForm(request.POST if request.method == "POST" else None, teams=teams)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                model = services.model_register(
                    name=form.cleaned_data["name"], team=form.cleaned_data["team"],
                    description=form.cleaned_data["description"],
                    tags=[t for t in form.cleaned_data["tags"].split(",") if t.strip()], actor=request.user)
                messages.success(request, f"Model {model.name} is registered. Upload its first version.")
                return redirect("registry:upload", name=model.name)
            except ValidationError as exc:
                for field, errs in exc.message_dict.items():
                    form.add_error(field if field in form.fields else None, errs)
        status = 400
    return render(request, "registry/model_register.html", {"form": form}, status=status)


@login_required
@require_GET
def model_detail(request: HttpRequest, name: str) -> HttpResponse:
    model = selectors.model_get(user=request.user, name=name, action="view_models")
    versions = list(selectors.version_list(model=model))
    metric_names = sorted({k for v in versions for k in (v.metrics or {})})
    chart = {"versions": [v.number for v in reversed(versions)],
             "metrics": {m: [v.metrics.get(m) for v in reversed(versions)] for m in metric_names}}
    return render(request, "registry/model_detail.html", {
        "model": model, "versions": versions, "metric_names": metric_names, "chart": chart,
        "environments": selectors.environment_overview(model=model),
        "can_upload": has_capability(request.user, "register_model"),
        "can_view_audit": has_capability(request.user, "view_audit"),
    })


@login_required
@require_GET
def upload_page(request: HttpRequest, name: str) -> HttpResponse:
    model = selectors.model_get(user=request.user, name=name, action="register_model")
    from django.conf import settings

    return render(request, "registry/upload.html", {"model": model,
                                                     "max_upload_mb": settings.PORTAL_MAX_UPLOAD_BYTES // 2**20,
                                                     "mlflow_configured": bool(settings.PORTAL_MLFLOW_TRACKING_URI)})


@login_required
@require_GET
def version_detail(request: HttpRequest, name: str, number: int) -> HttpResponse:
    version = selectors.version_get(user=request.user, name=name, number=number, action="view_models")
    can_decide = (has_capability(request.user, "decide_trust") and version.trust_state == "pending"
                  and version.uploaded_by_id != request.user.pk)
    inputs = (version.signature or {}).get("inputs") or []
    return render(request, "registry/version_detail.html", {
        "version": version, "model": version.model,
        "inputs": inputs if isinstance(inputs, list) else [],
        "outputs": (version.signature or {}).get("outputs") or [],
        "findings": version.scan_findings,
        "timeline": selectors.version_audit_timeline(version=version),
        "can_download": has_capability(request.user, "download_artifact") and version.artifact_id is not None,
        "can_deploy": has_capability(request.user, "deploy_dev") and version.status == "ready",
        "dev_serves": selectors.environment_overview(model=version.model)["dev"]["champion"] is not None,
        "can_decide": can_decide,
        "can_promote": has_capability(request.user, "request_promotion") and version.status == "ready",
        "promote_targets": PROMOTION_TARGETS,
        "open_promotions": version.promotions.filter(status__in=["pending", "approved", "deploying"]),
        "trust_form": TrustDecisionForm() if can_decide else None,
        "sandbox": json.dumps(version.sandbox_report, indent=2, default=str) if version.sandbox_report else "",
    })


@login_required
@require_POST
def version_trust(request: HttpRequest, name: str, number: int) -> HttpResponse:
    version = selectors.version_get(user=request.user, name=name, number=number, action="decide_trust")
    form = TrustDecisionForm(request.POST)
    if not form.is_valid():
        for field, errs in form.errors.items():
            messages.error(request, f"{field}: {' '.join(str(e) for e in errs)}")
        return redirect("registry:version", name=name, number=number)
    try:
        services.version_trust_decide(version=version, trust=form.cleaned_data["decision"] == "trust",
                                      reason=form.cleaned_data["reason"],
                                      remember_for_team=form.cleaned_data["remember_for_team"], actor=request.user)
        messages.success(request, "Your decision is recorded.")
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, " ".join(getattr(exc, "messages", [str(exc)])))
    return redirect("registry:version", name=name, number=number)




@login_required
@require_POST
def version_import(request: HttpRequest, name: str) -> HttpResponse:
    from registry.mlflow_import import version_import_from_mlflow
    from registry.scanning.findings import UploadRejected

    model = selectors.model_get(user=request.user, name=name, action="register_model")
    try:
        version = version_import_from_mlflow(model=model, uri=request.POST.get("uri", ""), actor=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("registry:upload", name=name)
    except UploadRejected as exc:
        messages.error(request, "The imported model was refused: " + "; ".join(f.message for f in exc.findings[:3]))
        return redirect("registry:upload", name=name)
    messages.success(request, f"Imported as version {version.number}; it is being scanned.")
    return redirect("registry:version", name=name, number=version.number)


@login_required
@require_POST
def version_deploy(request: HttpRequest, name: str, number: int) -> HttpResponse:
    from registry.deployments import deployment_start

    version = selectors.version_get(user=request.user, name=name, number=number, action="deploy_dev")
    try:
        deployment = deployment_start(version=version, environment="dev",
                                      strategy=request.POST.get("strategy", "replace"),
                                      traffic_percent=int(request.POST.get("traffic_percent") or 100),
                                      reason=request.POST.get("reason", "")[:2000], actor=request.user)
    except (ValidationError, ValueError) as exc:
        messages.error(request, " ".join(getattr(exc, "messages", [str(exc)])))
        return redirect("registry:version", name=name, number=number)
    return redirect("registry:deployment", uid=deployment.uid)


@login_required
@require_GET
def deployment_detail(request: HttpRequest, uid: str) -> HttpResponse:
    deployment = selectors.deployment_get(user=request.user, uid=uid)
    return render(request, "registry/deployment_detail.html", {"deployment": deployment,
                                                                "model": deployment.model})
