"""Promotion pages: request a promotion, the approver queue, one request with its gates and diffs, decisions,
the environment timeline with "what served at T", and rollback."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from portal.permissions import get_object_for_user, has_capability, require_capability
from portal.views import error_text
from registry.hooks import promotion_experiment
from registry.models import Environment, PromotionRequest, PromotionStatus
from registry.promotions import services as promotions
from registry.promotions.services import EVIDENCE_WINDOWS
from registry.serving import call_examples
from registry.versions import explanations, selectors
from registry.versions.views import keep_input

_KEPT_KEY = "promotion-decision-{uid}"


def _promotion(request: HttpRequest, uid: str) -> PromotionRequest:
    return get_object_for_user(request.user, promotions.promotion_queue(user=request.user), action="view_models",
                               uid=uid)


@login_required
@require_POST
def version_promote(request: HttpRequest, name: str, number: int) -> HttpResponse:
    version = selectors.version_get(user=request.user, name=name, number=number, action="request_promotion")
    try:
        promotion = promotions.promotion_request(
            version=version, target=request.POST.get("target", ""), reason=request.POST.get("reason", "")[:5000],
            override_reason=request.POST.get("override_reason", "")[:5000], actor=request.user)
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        keep_input(request, f"promote:{version.pk}", ("reason", "override_reason", "target"))
        return redirect(reverse("registry:version", args=[name, number]) + "#promote")
    blocked = [g for g in promotion.gates if g.get("blocks")]
    if blocked:
        messages.warning(request, f"Promotion to {promotion.target} requested, but it is blocked: "
                         + " ".join(f"{g['label']}: {g['detail']}" for g in blocked)
                         + " Approvers have not been notified; it cannot be approved until every gate passes, and "
                         "they will be notified then.")
    else:
        messages.success(request, f"Promotion to {promotion.target} requested; approvers have been notified.")
    return redirect("registry:promotion", uid=promotion.uid)


@login_required
@require_GET
def promotion_queue(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "view_models")
    wanted = request.GET.get("status", "pending")
    if wanted not in PromotionStatus.values and wanted != "all":
        wanted = "pending"
    qs = promotions.promotion_queue(user=request.user, status="" if wanted == "all" else wanted)
    page = Paginator(qs, 50).get_page(request.GET.get("page"))
    champions = promotions.champions_now({(p.model_id, p.target) for p in page if p.status == PromotionStatus.LIVE})
    rows = [{"p": p, "blocking": [g for g in p.gates if g.get("blocks")] if p.status == PromotionStatus.PENDING
             else [], "live": promotions.live_state(p, champions),
             "may_decide": promotions.can_approve(p, request.user)[0]} for p in page]
    return render(request, "registry/promotion_queue.html", {
        "page": page, "rows": rows, "status": wanted, "statuses": ["pending", *[s for s in PromotionStatus.values
                                                                               if s != "pending"], "all"],
        "query": f"status={wanted}"})


@login_required
@require_GET
def promotion_detail(request: HttpRequest, uid: str) -> HttpResponse:
    promotion = _promotion(request, uid)
    may_decide, why_not = promotions.can_approve(promotion, request.user)
    review = promotions.promotion_review(promotion)
    notified = promotion.approvers_notified_at is not None
    window = request.GET.get("window", "24h")
    if window not in EVIDENCE_WINDOWS:
        window = "24h"
    approvals = list(promotion.approvals.all())  # prefetched with their approvers
    # What the approver typed survives a refused decision (a wrong password, a missing reason).
    kept = request.session.pop(_KEPT_KEY.format(uid=promotion.uid), None) or {}
    live = promotions.live_state(promotion, promotions.champions_now({(promotion.model_id, promotion.target)}))
    may_rollback, rollback_why_not = promotions.may_roll_back(request.user, promotion.target)
    return render(request, "registry/promotion_detail.html", {
        "live": live, "may_rollback": may_rollback, "rollback_why_not": rollback_why_not,
        "rollback_candidates": promotions.rollback_candidates(promotion.model, promotion.target)
        if may_rollback and live else [], "env": promotion.target,
        "promotion": promotion, "model": promotion.model, "version": promotion.version, **review, "notified": notified,
        "signature": promotions.signature_comparison(promotion.version, promotion.champion_version,
                                                     promotion.target),
        "evidence": promotions.live_evidence(promotion=promotion, window=window),
        "evidence_window": window, "evidence_windows": EVIDENCE_WINDOWS,
        "experiment": promotion_experiment(promotion),
        **_importance(promotion),
        "kept_comment": kept.get("comment", ""), "kept_decision": kept.get("decision", ""),
        "approvals": approvals,
        "approved_count": sum(1 for a in approvals if a.decision == "approve"),
        "may_decide": may_decide, "why_not": why_not if has_capability(request.user, "approve_promotion") else "",
        "needs_password": promotion.target == Environment.PROD,
        "may_cancel": promotion.status == PromotionStatus.PENDING and promotion.requested_by_id == request.user.pk,
    })


def _importance(promotion: Any) -> dict[str, Any]:
    """The candidate's global importance against the version it is judged by: the target's champion, or, when
    nothing serves the target, the nearest environment's (which the page says)."""
    baseline = promotions.promotion_baseline(promotion)
    if baseline is None:
        return {"importance": explanations.comparison(None, promotion.version), "importance_baseline": None}
    own = baseline.environment == promotion.target
    names = ("the champion" if own else f"v{baseline.version.number} ({baseline.why})", "the candidate")
    return {"importance": explanations.comparison(baseline.version, promotion.version, names=names),
            "importance_baseline": baseline, "importance_elsewhere": not own}


@login_required
@require_POST
def promotion_decide(request: HttpRequest, uid: str) -> HttpResponse:
    promotion = _promotion(request, uid)
    decision = request.POST.get("decision")
    if decision not in ("approve", "reject"):
        messages.error(request, "Choose Approve or Reject.")
        return redirect("registry:promotion", uid=uid)
    try:
        promotion = promotions.promotion_decide(promotion=promotion, actor=request.user,
                                                approve=decision == "approve",
                                                comment=request.POST.get("comment", "")[:5000],
                                                password=request.POST.get("password", "")[:512],
                                                request=request)
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        request.session[_KEPT_KEY.format(uid=uid)] = {"comment": request.POST.get("comment", "")[:5000],
                                                      "decision": decision}
        return redirect(reverse("registry:promotion", args=[uid]) + "#decide")
    if promotion.status == PromotionStatus.DEPLOYING:
        messages.success(request, "Approved. The policy is met and the deployment has started.")
    elif decision == "approve":
        messages.success(request, "Your approval is recorded; more approvals are needed.")
    else:
        messages.success(request, "Rejected. The requester has been told why.")
    return redirect("registry:promotion", uid=uid)


@login_required
@require_POST
def promotion_cancel(request: HttpRequest, uid: str) -> HttpResponse:
    try:
        promotions.promotion_cancel(promotion=_promotion(request, uid), actor=request.user)
        messages.success(request, "The request is cancelled.")
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
    return redirect("registry:promotion", uid=uid)


def _parse_at(raw: str) -> dt.datetime | None:
    if not raw:
        return None
    try:
        return promotions.parse_at(raw, naive_is_utc=True)
    except ValidationError:
        return None


@login_required
@require_GET
def environment_page(request: HttpRequest, name: str, env: str) -> HttpResponse:
    model = selectors.model_get(user=request.user, name=name, action="view_models")
    if env not in Environment.values:
        raise Http404("No such environment.")
    raw_at = request.GET.get("at", "").strip()[:40]
    at = _parse_at(raw_at)
    may_rollback, rollback_why_not = promotions.may_roll_back(request.user, env)
    serving = call_examples.serving_version(model=model, environment=env)
    url = request.build_absolute_uri(reverse("serve-invocations", args=[model.name, env]))
    return render(request, "registry/environment.html", {
        "call": call_examples.call_example(version=serving, url=url) if serving is not None else None,
        "call_url": url, "call_version": serving, "may_score": has_capability(request.user, "score"),
        "model": model, "env": env, "history": promotions.serving_history(model, env),
        "state": selectors.environment_overview(model=model)[env],
        "at_raw": raw_at, "at_invalid": bool(raw_at) and at is None,
        "served_at": promotions.serving_at(model, env, at) if at else None,
        "may_rollback": may_rollback, "rollback_why_not": rollback_why_not,
        "rollback_candidates": promotions.rollback_candidates(model, env) if may_rollback else [],
    })


@login_required
@require_POST
def environment_rollback(request: HttpRequest, name: str, env: str) -> HttpResponse:
    """Two steps: the form (on the environment and promotion pages) leads to a confirmation that names what serves
    now and what comes back; only the confirmed POST rolls back."""
    model = selectors.model_get(user=request.user, name=name, action="view_models")
    if env not in Environment.values:
        messages.error(request, f"There is no environment {env!r}.")
        return redirect("registry:model", name=name)
    allowed, why_not = promotions.may_roll_back(request.user, env)
    if not allowed:
        messages.error(request, why_not)
        return redirect("registry:environment", name=name, env=env)
    raw = request.POST.get("to_version", "")
    to_version = int(raw) if raw.isdigit() else None
    reason = request.POST.get("reason", "")[:5000]
    confirmed = request.POST.get("confirm") == "yes"
    if not confirmed or not reason.strip():
        try:
            current, chosen = promotions.rollback_plan(model, env, to_version)
        except ValidationError as exc:
            messages.error(request, error_text(exc))
            return redirect("registry:environment", name=name, env=env)
        return render(request, "registry/rollback_confirm.html", {
            "model": model, "env": env, "current": current, "chosen": chosen, "reason": reason,
            "reason_missing": confirmed and not reason.strip()}, status=400 if confirmed else 200)
    try:
        deployment = promotions.environment_rollback(model=model, environment=env, to_version=to_version,
                                                     reason=reason, actor=request.user)
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        return redirect("registry:environment", name=name, env=env)
    messages.success(request, f"Rolling {env} back to v{deployment.version.number}.")
    return redirect("registry:deployment", uid=deployment.uid)
