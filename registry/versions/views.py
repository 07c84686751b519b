"""Registry pages: model list, registration, model and version detail, the upload page, trust decisions."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from portal.permissions import has_capability, require_capability
from portal.selectors import team_list
from registry.models import PROMOTION_TARGETS, ModelVersion
from registry.scanning.findings import UploadRejected
from registry.versions import explanations, selectors, services
from registry.versions.forms import ModelRegisterForm, TagsForm, TrustDecisionForm, messages_of
from registry.versions.mlflow_import import TrackingServerUnavailable, mlflow_import

_KEPT = "kept-input:{key}"


def keep_input(request: HttpRequest, key: str, fields: tuple[str, ...], errors: dict[str, list[str]] | None = None
               ) -> None:
    """Remember what was typed in a form whose POST redirects back on an error, for the page that follows."""
    request.session[_KEPT.format(key=key)] = {"values": {f: request.POST.get(f, "")[:5000] for f in fields},
                                              "errors": errors or {}}


def kept_input(request: HttpRequest, key: str) -> dict[str, Any]:
    """What ``keep_input`` remembered (once): ``{"values": {...}, "errors": {...}}``, empty when nothing was."""
    return request.session.pop(_KEPT.format(key=key), None) or {"values": {}, "errors": {}}


@login_required
@require_GET
def model_list(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "view_models")
    search = request.GET.get("q", "").strip()[:100]
    team = request.GET.get("team", "").strip()[:64]
    sort = request.GET.get("sort", "name")
    if sort not in selectors.MODEL_SORTS:
        sort = "name"
    page = Paginator(selectors.model_list(user=request.user, search=search, team=team, sort=sort), 50).get_page(
        request.GET.get("page"))
    live = selectors.where_live(models=list(page.object_list))
    aliases = selectors.aliases_of(models=list(page.object_list))
    query = request.GET.copy()
    query.pop("page", None)
    filters = request.GET.copy()
    for key in ("page", "sort"):
        filters.pop(key, None)
    return render(request, "registry/model_list.html", {
        "page": page, "rows": [(m, live.get(m.pk, []), aliases.get(m.pk, [])) for m in page.object_list],
        "q": search, "team": team,
        "teams": team_list(user=request.user), "query": query.urlencode(), "filters": filters.urlencode(),
        "sort": sort, "sort_choices": [("name", "name (A-Z)"), ("-name", "name (Z-A)"), ("team", "team"),
                                       ("versions", "most versions"), ("updated", "latest upload")],
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
    kept = kept_input(request, f"model-tags:{model.pk}")
    return render(request, "registry/model_detail.html", {
        "model": model, "versions": versions, "metric_names": metric_names, "chart": chart,
        "environments": selectors.environment_overview(model=model),
        "can_upload": has_capability(request.user, "register_model"),
        "can_edit_tags": has_capability(request.user, "register_model"),
        "tags_value": kept["values"].get("tags", ", ".join(model.tags or [])), "tags_errors": kept["errors"],
        "can_view_audit": has_capability(request.user, "view_audit"),
        "mlflow_sync_problems": selectors.mlflow_sync_problems(model=model),
        "aliases": selectors.aliases_of(models=[model]).get(model.pk, []),
        "ready_versions": [v for v in versions if v.status == "ready"],
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
    kept_trust = kept_input(request, f"trust:{version.pk}")["values"]
    kept_tags = kept_input(request, f"version-tags:{version.pk}")
    previous = version.model.versions.filter(number__lt=version.number).order_by("-number").first()
    return render(request, "registry/version_detail.html", {
        "version": version, "model": version.model,
        "kept_promote": kept_input(request, f"promote:{version.pk}")["values"],
        "kept_deploy": kept_input(request, f"deploy:{version.pk}")["values"],
        "can_edit_tags": has_capability(request.user, "register_model"),
        "tags_value": kept_tags["values"].get("tags", ", ".join(version.tags or [])),
        "tags_errors": kept_tags["errors"],
        "profile": selectors.reference_profile_rows(version=version),
        "profile_rows": (version.reference.profile or {}).get("rows") if version.reference else None,
        "compare_with": previous.number if previous else None,
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
        # A refused decision comes back bound to what was typed, so its errors show beside the fields.
        "trust_form": (TrustDecisionForm(kept_trust) if kept_trust else TrustDecisionForm()) if can_decide else None,
        "sandbox": json.dumps(version.sandbox_report, indent=2, default=str) if version.sandbox_report else "",
        "importance": explanations.importance(version),
    })


@login_required
@require_POST
def version_trust(request: HttpRequest, name: str, number: int) -> HttpResponse:
    version = selectors.version_get(user=request.user, name=name, number=number, action="decide_trust")
    form = TrustDecisionForm(request.POST)
    if not form.is_valid():
        messages.error(request, "The decision was not recorded: correct the fields marked below.")
        keep_input(request, f"trust:{version.pk}", ("decision", "reason", "remember_for_team"))
        return redirect("registry:version", name=name, number=number)
    try:
        services.version_trust_decide(version=version, trust=form.cleaned_data["decision"] == "trust",
                                      reason=form.cleaned_data["reason"],
                                      remember_for_team=form.cleaned_data["remember_for_team"], actor=request.user)
        messages.success(request, "Your decision is recorded.")
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, " ".join(getattr(exc, "messages", [str(exc)])))
        keep_input(request, f"trust:{version.pk}", ("decision", "reason", "remember_for_team"))
    return redirect("registry:version", name=name, number=number)


@login_required
@require_POST
def version_import(request: HttpRequest, name: str) -> HttpResponse:
    model = selectors.model_get(user=request.user, name=name, action="register_model")
    try:
        result = mlflow_import(model=model, uri=request.POST.get("uri", ""), actor=request.user)
    except (ValidationError, TrackingServerUnavailable) as exc:
        messages.error(request, " ".join(getattr(exc, "messages", [str(exc)])))
        return redirect("registry:upload", name=name)
    except UploadRejected as exc:
        messages.error(request, "The imported model was refused: " + "; ".join(f.message for f in exc.findings[:3]))
        return redirect("registry:upload", name=name)
    version = result.version
    if result.created:
        messages.success(request, f"Imported as version {version.number}; it is being scanned.")
    else:
        messages.info(request, f"This artifact is already version {version.number} of {name} (same SHA-256); "
                               "no new version was made.")
    return redirect("registry:version", name=name, number=version.number)


@login_required
@require_POST
def model_tags(request: HttpRequest, name: str) -> HttpResponse:
    model = selectors.model_get(user=request.user, name=name, action="register_model")
    form = TagsForm(request.POST)
    if form.is_valid():
        try:
            services.model_tags_set(model=model, tags=form.cleaned_data["tags"], actor=request.user)
            messages.success(request, "Tags saved.")
            return redirect("registry:model", name=name)
        except ValidationError as exc:
            form.add_error("tags", exc.messages)
    messages.error(request, "The tags were not saved: " + " ".join(str(e) for e in form.errors.get("tags", [])))
    keep_input(request, f"model-tags:{model.pk}", ("tags",),
               errors={field: [str(e) for e in errs] for field, errs in form.errors.items()})
    return redirect("registry:model", name=name)


@login_required
@require_POST
def model_alias_set(request: HttpRequest, name: str) -> HttpResponse:
    model = selectors.model_get(user=request.user, name=name, action="register_model")
    raw = request.POST.get("version", "")
    alias = request.POST.get("alias", "")[:80]
    try:
        if not raw.isdigit():
            raise ValidationError({"version": "Choose the version the alias points at."})
        version = selectors.version_get(user=request.user, name=name, number=int(raw))
        services.alias_set(model=model, name=alias, version=version, actor=request.user)
        messages.success(request, f"@{alias.strip().lstrip('@')} now points at v{version.number}.")
    except ValidationError as exc:
        messages.error(request, "The alias was not set: " + " ".join(messages_of(exc)))
    return redirect(reverse("registry:model", args=[name]) + "#aliases")


@login_required
@require_POST
def model_alias_delete(request: HttpRequest, name: str, alias: str) -> HttpResponse:
    model = selectors.model_get(user=request.user, name=name, action="register_model")
    try:
        services.alias_delete(model=model, name=alias, actor=request.user)
        messages.success(request, f"@{alias} is removed.")
    except ValidationError as exc:
        messages.error(request, " ".join(messages_of(exc)))
    return redirect(reverse("registry:model", args=[name]) + "#aliases")


@login_required
@require_POST
def version_tags(request: HttpRequest, name: str, number: int) -> HttpResponse:
    version = selectors.version_get(user=request.user, name=name, number=number, action="register_model")
    form = TagsForm(request.POST)
    if form.is_valid():
        try:
            services.version_tags_set(version=version, tags=form.cleaned_data["tags"], actor=request.user)
            messages.success(request, "Tags saved.")
            return redirect("registry:version", name=name, number=number)
        except ValidationError as exc:
            form.add_error("tags", exc.messages)
    messages.error(request, "The tags were not saved: " + " ".join(str(e) for e in form.errors.get("tags", [])))
    keep_input(request, f"version-tags:{version.pk}", ("tags",),
               errors={field: [str(e) for e in errs] for field, errs in form.errors.items()})
    return redirect("registry:version", name=name, number=number)


@login_required
@require_GET
def version_compare(request: HttpRequest, name: str) -> HttpResponse:
    model = selectors.model_get(user=request.user, name=name, action="view_models")
    versions = list(selectors.version_list(model=model).select_related("reference"))
    numbers = [v.number for v in versions]
    status = 200

    def pick(key: str, default: int | None) -> ModelVersion | None:
        raw = request.GET.get(key, "")
        number = int(raw) if raw.isdigit() else default
        return next((v for v in versions if v.number == number), None)

    a = pick("a", numbers[1] if len(numbers) > 1 else None)
    b = pick("b", numbers[0] if numbers else None)
    problem = ""
    if len(versions) < 2:
        problem = f"{model.name} has {len(versions)} version{'s' if len(versions) != 1 else ''}: comparing needs two."
    elif a is None or b is None:
        problem = f"Choose two of the versions {', '.join(f'v{n}' for n in reversed(numbers))}."
        status = 400
    elif a.pk == b.pk:
        problem = "Choose two different versions."
        status = 400
    return render(request, "registry/version_compare.html", {
        "model": model, "numbers": numbers, "a": a, "b": b, "problem": problem,
        "comparison": selectors.version_compare(a=a, b=b) if a and b and not problem else None,
        "importance": explanations.comparison(a, b, names=(f"v{a.number}", f"v{b.number}"))
        if a and b and not problem else None,
    }, status=status)

