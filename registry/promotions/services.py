"""Promotion dev → stage → prod: requests, gates, four-eyes approval, rollback and the history of what served.

A request names a ready version and a target. Its gates (scan and trust, the path through stage, signature
compatibility with what the target serves, metrics against the champion, the sandbox's smoke test) are evaluated
when it is made, shown to approvers, checked again at each approval and once more when the deployment starts.
People other than the requester and the version's uploader approve it; the approval that meets the policy starts
exactly one deployment, because approvals take the request's row lock and a unique constraint forbids a second
vote by the same person.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.dispatch import receiver
from django.urls import reverse
from django.utils import timezone

from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import AuditOutcome
from portal.permissions import has_capability, require_capability, scope_to_teams
from portal.services import reauthenticate
from portal.tasks import send_email_task
from portal.webhooks import webhooks_notify
from registry.deployments.services import deployment_finished, deployment_gates, deployment_start
from registry.models import (
    DEFAULT_APPROVALS,
    DEFAULT_METRIC_TOLERANCE,
    ENVIRONMENT_ORDER,
    PROMOTION_TARGETS,
    ApprovalDecision,
    Deployment,
    DeploymentPurpose,
    Environment,
    EnvironmentState,
    ModelVersion,
    PromotionApproval,
    PromotionPolicy,
    PromotionRequest,
    PromotionStatus,
    RegisteredModel,
    ServingInterval,
    Strategy,
    TrustState,
    VersionStatus,
)
from registry.promotions.reasons import reason_check
from registry.versions.compare import metric_diff, signature_diff
from registry.versions.selectors import environment_param

logger = logging.getLogger(__name__)

OPEN_STATUSES = (PromotionStatus.PENDING, PromotionStatus.APPROVED, PromotionStatus.DEPLOYING)


# --- Policy -------------------------------------------------------------------------------------------------------

def policy_for(model: RegisteredModel, environment: str) -> tuple[int, float]:
    """(approvals required, metric tolerance) for promoting ``model`` to ``environment``: model row, team row,
    global row, then the defaults."""
    rows = {(p.model_id is not None, p.team_id is not None): p for p in PromotionPolicy.objects.filter(
        Q(model=model) | Q(model__isnull=True, team=model.team) | Q(model__isnull=True, team__isnull=True),
        environment=environment)}
    for key in ((True, False), (True, True), (False, True), (False, False)):
        if key in rows:
            return rows[key].approvals_required, rows[key].metric_tolerance
    return DEFAULT_APPROVALS[environment], DEFAULT_METRIC_TOLERANCE


# --- Gates --------------------------------------------------------------------------------------------------------

@dataclass
class Gate:
    name: str
    label: str
    ok: bool
    detail: str
    overridable: bool = False
    overridden: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def blocks(self) -> bool:
        return not self.ok and not self.overridden


def champion_version(model: RegisteredModel, environment: str) -> ModelVersion | None:
    state = EnvironmentState.objects.filter(model=model, environment=environment).select_related(
        "champion__version").first()
    return state.champion.version if state and state.champion else None


def _served_in(version: ModelVersion, environment: str) -> bool:
    return ServingInterval.objects.filter(version=version, environment=environment,
                                          role__in=("champion", "canary")).exists()


_ORDER: list[str] = [str(e) for e in ENVIRONMENT_ORDER]


def min_predictions() -> int:
    """Live predictions a candidate must have answered in the environment before the target (dev for stage, stage
    for prod) before a promotion may be approved (``PORTAL_PROMOTION_MIN_PREDICTIONS``; 0 turns the gate off, and
    with it the accuracy-on-ground-truth gate)."""
    return int(getattr(settings, "PORTAL_PROMOTION_MIN_PREDICTIONS", 0))


def previous_environment(target: str) -> str:
    return _ORDER[_ORDER.index(target) - 1]


@dataclass(frozen=True)
class Baseline:
    """The version a candidate is judged against, and why: the target's champion, or else (nothing serves the
    target) the champion of the nearest environment below it, or the version the candidate replaced there."""

    version: ModelVersion
    environment: str
    why: str

    @property
    def label(self) -> str:
        return f"v{self.version.number} ({self.why})"


def baseline_for(candidate: ModelVersion, target: str) -> Baseline | None:
    champion = champion_version(candidate.model, target)
    if champion is not None:
        return Baseline(champion, target, f"serves {target}")
    for env in reversed(_ORDER[:_ORDER.index(target)]):
        nearest = champion_version(candidate.model, env)
        if nearest is None:
            continue
        if nearest.pk != candidate.pk:
            return Baseline(nearest, env, f"serves {env}")
        # The candidate serves the nearest environment itself: the version it replaced there is the one to beat.
        own = ServingInterval.objects.filter(version=candidate, environment=env, role="champion").order_by(
            "started_at").first()
        before = ServingInterval.objects.filter(
            model=candidate.model, environment=env, role="champion", started_at__lte=own.started_at if own else
            timezone.now()).exclude(version=candidate).select_related("version").order_by("-started_at").first()
        return Baseline(before.version, env, f"served {env} before v{candidate.number}") if before else None
    return None


# Counts a version's live (champion and canary) predictions in one environment, all time; monitoring registers it.
TrafficCounter = Callable[[RegisteredModel, str, int], int]
_traffic_counter: TrafficCounter | None = None


def register_traffic_counter(counter: TrafficCounter) -> None:
    global _traffic_counter
    _traffic_counter = counter


def live_predictions(model: RegisteredModel, environment: str, version: int) -> int:
    return _traffic_counter(model, environment, version) if _traffic_counter is not None else 0


@dataclass(frozen=True)
class GroundTruth:
    """A version's live predictions in one environment that have ground truth, all time, and what the accuracy gate
    holds them to (monitoring's settings for the model): ``minimum`` labelled to judge, ``floor`` to reach."""

    labelled: int
    minimum: int
    accuracy: float | None
    floor: float | None


# Reads a version's ground truth in one environment against its model's accuracy floor (the baseline it is judged
# against, when any, sets a floor from its recorded accuracy); monitoring registers it. None (or a floor of None): no
# accuracy is judged for the model (a regressor, or no floor set and no recorded accuracy).
GroundTruthReader = Callable[[ModelVersion, str, "ModelVersion | None"], "GroundTruth | None"]
_ground_truth_reader: GroundTruthReader | None = None


def register_ground_truth_reader(reader: GroundTruthReader) -> None:
    global _ground_truth_reader
    _ground_truth_reader = reader


def ground_truth(version: ModelVersion, environment: str, baseline: ModelVersion | None) -> GroundTruth | None:
    return _ground_truth_reader(version, environment, baseline) if _ground_truth_reader is not None else None


def _accuracy_gate(version: ModelVersion, target: str, before: str, served_before: bool) -> Gate | None:
    """Accuracy on live ground truth where the candidate served before ``target``: "too little data" blocks, as a
    figure below the floor does. None where no accuracy is judged for the model."""
    baseline = baseline_for(version, target)
    truth = ground_truth(version, before, baseline.version if baseline else None)
    if truth is None or truth.floor is None:
        return None
    name, label = "ground_truth", f"Accuracy on ground truth in {before}"
    rows = [{"environment": before, "labelled": truth.labelled, "minimum": truth.minimum,
             "accuracy": truth.accuracy, "floor": truth.floor}]
    if not served_before:
        return Gate(name, label, False, f"Too little data: v{version.number} has never served {before}, so none of "
                    f"its predictions has ground truth; {truth.minimum:,} labelled predictions are needed to judge "
                    f"its accuracy against the floor of {truth.floor:.3f}.", rows=rows)
    if truth.labelled < truth.minimum or truth.accuracy is None:
        return Gate(name, label, False, f"Too little data: {truth.labelled:,} of v{version.number}'s live predictions "
                    f"in {before} have ground truth; {truth.minimum:,} are needed to judge its accuracy against the "
                    f"floor of {truth.floor:.3f}. Send ground truth to the feedback endpoint.", rows=rows)
    if truth.accuracy < truth.floor:
        return Gate(name, label, False, f"Accuracy {truth.accuracy:.3f} on {truth.labelled:,} labelled predictions in "
                    f"{before} is below the floor of {truth.floor:.3f}.", rows=rows)
    return Gate(name, label, True, f"Accuracy {truth.accuracy:.3f} on {truth.labelled:,} labelled predictions in "
                f"{before} (floor {truth.floor:.3f}).", rows=rows)


def signature_comparison(candidate: ModelVersion, champion: ModelVersion | None, target: str) -> dict[str, Any]:
    """The signature panel's summary and table from one comparison, so the two cannot disagree."""
    rows = signature_diff(candidate, champion)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["change"]] = counts.get(row["change"], 0) + 1
    changed = sum(n for change, n in counts.items() if change not in ("unchanged", "new"))
    n = len(rows)
    if not rows:
        summary = "No signature recorded."
    elif champion is None:
        summary = f"Nothing serves {target} yet: all {n} input{'s' if n != 1 else ''} are new there."
    elif not changed:
        summary = f"All {n} input{'s' if n != 1 else ''} unchanged from v{champion.number}."
    else:
        parts = [f"{counts[c]} {c}" for c in ("added", "removed", "retyped") if counts.get(c)]
        summary = (f"{changed} of {n} input{'s' if n != 1 else ''} changed from v{champion.number}: "
                   + ", ".join(parts) + ".")
    return {"rows": rows, "counts": counts, "changed": changed, "summary": summary}


# --- Live evidence (computed by monitoring, which registers into this hook when it starts) -------------------------

EVIDENCE_WINDOWS = ("1h", "24h", "7d")
LiveEvidence = Callable[..., dict[str, Any]]
_live_evidence: LiveEvidence | None = None


def register_live_evidence(provider: LiveEvidence) -> None:
    global _live_evidence
    _live_evidence = provider


def live_evidence(*, promotion: PromotionRequest, window: str = "24h") -> dict[str, Any] | None:
    """The candidate's live figures where it served against the target's champion, or None when no monitoring is
    installed. Raises ValidationError for an unknown window."""
    if _live_evidence is None:
        return None
    try:
        return _live_evidence(promotion=promotion, window=window)
    except ValueError as exc:
        raise ValidationError({"window": str(exc)}) from exc


def gates_evaluate(version: ModelVersion, target: str, *, override_reason: str = "",
                   tolerance: float | None = None) -> list[Gate]:
    model = version.model
    if tolerance is None:
        tolerance = policy_for(model, target)[1]
    champion = champion_version(model, target)
    gates: list[Gate] = []

    scan_ok = version.status == VersionStatus.READY and version.trust_state in (TrustState.NOT_NEEDED,
                                                                                   TrustState.TRUSTED)
    if version.status != VersionStatus.READY:
        scan_detail = f"The version is {version.status}."
    elif version.trust_state == TrustState.PENDING:
        scan_detail = "An approver has not yet decided on the file's untrusted types."
    elif version.trust_state == TrustState.REFUSED:
        scan_detail = "An approver refused the file's untrusted types."
    else:
        scan_detail = "Scan clean" + (" and its untrusted types were trusted by an approver." if
                                      version.trust_state == TrustState.TRUSTED else ".")
    gates.append(Gate("scan", "Scan and trust", scan_ok, scan_detail))

    minimum = min_predictions()
    before = previous_environment(target)
    served_before = _served_in(version, before)
    if target == Environment.PROD:
        gates.append(Gate("path", "Live in stage first", served_before,
                          "It has served in stage." if served_before else "It has never been live in stage: "
                          "promote it to stage first."))
    if minimum > 0:
        answered = live_predictions(model, before, version.number) if served_before else 0
        enough = answered >= minimum
        if not served_before:
            traffic_detail = (f"Too little data: v{version.number} has never served {before}, so it has answered no "
                              f"live predictions there; {minimum:,} are needed before {target}.")
        elif enough:
            traffic_detail = f"It answered {answered:,} live predictions in {before} (at least {minimum:,} needed)."
        else:
            traffic_detail = (f"Too little data: v{version.number} answered {answered:,} live prediction"
                              f"{'s' if answered != 1 else ''} in {before}; {minimum:,} are needed before {target}.")
        gates.append(Gate("traffic", f"Enough live traffic in {before}", enough, traffic_detail,
                          rows=[{"environment": before, "predictions": answered, "minimum": minimum}]))
        accuracy = _accuracy_gate(version, target, before, served_before)
        if accuracy is not None:
            gates.append(accuracy)

    sig_rows = signature_diff(version, champion)
    breaking = [r for r in sig_rows if r["change"] != "unchanged"]
    if champion is None:
        gates.append(Gate("signature", "Signature compatible", True, f"Nothing serves {target} yet.",
                          rows=sig_rows))
    else:
        detail = (f"Same inputs as v{champion.number}." if not breaking else
                  "; ".join(f"{r['name']} {r['change']}" + (f" ({r['champion']} → {r['candidate']})"
                                                             if r["change"] == "retyped" else "")
                            for r in breaking[:8]) + f" compared with v{champion.number}, which serves {target} now.")
        gate = Gate("signature", "Signature compatible", not breaking, detail, overridable=True, rows=sig_rows)
        if breaking and override_reason.strip():
            gate.overridden = True
            gate.detail += f" Overridden: “{override_reason.strip()[:300]}”"
        gates.append(gate)

    baseline = baseline_for(version, target)
    reference = baseline.version if baseline else None
    m_rows = metric_diff(version, reference, tolerance)
    worse = [r for r in m_rows if r["worse"]]
    compared = [r for r in m_rows if r["delta"] is not None]
    if baseline is None:
        m_ok, m_detail = True, f"Nothing serves {target} or an environment below it: nothing to compare with."
    elif not compared:
        m_ok, m_detail = True, f"No metric in common with {baseline.label} to compare."
    elif worse:
        m_ok = False
        m_detail = "; ".join(f"{r['name']} {r['candidate']:.4g} vs {r['champion']:.4g}" for r in worse) + \
            f": worse than {baseline.label} by more than the tolerance of {tolerance:g}."
    else:
        m_ok, m_detail = True, f"{len(compared)} metric(s) within {tolerance:g} of {baseline.label} or better."
    gates.append(Gate("metrics", "Metrics vs champion" if baseline is None or baseline.environment == target else
                      f"Metrics vs {baseline.environment}'s champion", m_ok, m_detail, rows=m_rows))

    report = version.sandbox_report or {}
    smoke_ok = bool(report.get("ok")) and version.status == VersionStatus.READY
    gates.append(Gate("smoke_test", "Sandboxed smoke test", smoke_ok,
                      f"Loaded in the sandbox and answered {len(report.get('predictions') or [])} example row(s)."
                      if smoke_ok else "The sandbox's smoke test has not passed."))
    return gates


def promotion_baseline(promotion: PromotionRequest) -> Baseline | None:
    """What the request's candidate is judged against: the target's champion when it was requested, else (for a
    pending request) the nearest environment's champion now."""
    if promotion.champion_version is not None:
        return Baseline(promotion.champion_version, promotion.target, f"serves {promotion.target}"
                        if promotion.status == PromotionStatus.PENDING else f"served {promotion.target} when requested")
    baseline = baseline_for(promotion.version, promotion.target)
    if baseline is None or baseline.version.pk == promotion.version.pk:
        return None
    return baseline


def promotion_review(promotion: PromotionRequest) -> dict[str, Any]:
    """What an approver decides on, for the page and the API alike: the gates (as they stand now while pending),
    the metrics against the baseline, whether the reason agrees with them, and what stops an approval."""
    if promotion.status == PromotionStatus.PENDING:
        gates = gates_as_json(gates_evaluate(promotion.version, promotion.target,
                                             override_reason=promotion.override_reason,
                                             tolerance=promotion.metric_tolerance))
    else:
        gates = promotion.gates
    baseline = promotion_baseline(promotion)
    rows = metric_diff(promotion.version, baseline.version if baseline else None, promotion.metric_tolerance)
    blockers = [f"{g['label']}: {g['detail']}" for g in gates if g.get("blocks")]
    return {
        "gates": gates, "blocking": [g for g in gates if g.get("blocks")], "blockers": blockers,
        "baseline": ({"version": baseline.version.number, "environment": baseline.environment, "why": baseline.why,
                      "label": baseline.label} if baseline else None),
        "metric_rows": rows,
        "reason_check": reason_check(promotion.reason, rows, baseline=baseline.label if baseline else ""),
        "approvable": promotion.status == PromotionStatus.PENDING and not blockers,
        "min_predictions": min_predictions(),
    }


def gates_as_json(gates: list[Gate]) -> list[dict[str, Any]]:
    return [{**asdict(g), "blocks": g.blocks} for g in gates]


def blocking(gates: list[Gate]) -> list[Gate]:
    return [g for g in gates if g.blocks]


# --- Requests -----------------------------------------------------------------------------------------------------

def promotion_target(promotion: PromotionRequest) -> Target:
    return Target(type="promotion", id=str(promotion.uid),
                  repr=f"{promotion.model.name} v{promotion.version.number} to {promotion.target}",
                  team_slug=promotion.model.team.slug)


def promotion_request(*, version: ModelVersion, target: str, reason: str, actor: Any,
                      override_reason: str = "") -> PromotionRequest:
    require_capability(actor, "request_promotion")
    if target not in PROMOTION_TARGETS:
        raise ValidationError({"target": f"Promote to stage or prod, not {target!r}."})
    if not reason.strip():
        raise ValidationError({"reason": "Say why this version should go to " + target + "."})
    approvals, tolerance = policy_for(version.model, target)
    gates = gates_evaluate(version, target, override_reason=override_reason, tolerance=tolerance)
    hard = [g for g in gates if g.name in ("scan", "path", "smoke_test") and not g.ok]
    if hard:
        raise ValidationError({"version": [g.detail for g in hard]})
    champion = champion_version(version.model, target)
    if champion is not None and champion.pk == version.pk:
        raise ValidationError({"version": f"v{version.number} already serves {target}."})
    try:
        with transaction.atomic():
            promotion = PromotionRequest.objects.create(
                model=version.model, version=version, target=target, requested_by=actor, reason=reason.strip(),
                override_reason=override_reason.strip(), approvals_required=approvals, metric_tolerance=tolerance,
                champion_version=champion, gates=gates_as_json(gates),
                approvers_notified_at=None if blocking(gates) else timezone.now())
            audit_record(AuditAction.PROMOTION_REQUEST, actor=actor, target=promotion_target(promotion),
                         after={"version": version.number, "target": target, "reason": promotion.reason,
                                "approvals_required": approvals,
                                "champion": champion.number if champion else None,
                                "blocking_gates": [g.name for g in blocking(gates)]})
            if any(g.overridden for g in gates):
                audit_record(AuditAction.PROMOTION_GATE_OVERRIDE, actor=actor, target=promotion_target(promotion),
                             after={"gate": "signature", "reason": promotion.override_reason})
            # A request a gate blocks waits in the queue marked blocked: nobody is asked to approve what cannot be,
            # until its gates clear (promotions_recheck_blocked asks them then).
            if promotion.approvers_notified_at is not None:
                _notify(promotion, "promotion.requested")
    except IntegrityError as exc:
        existing = PromotionRequest.objects.filter(version=version, target=target, status__in=OPEN_STATUSES).first()
        raise ValidationError({"version": f"v{version.number} already has an open request to {target}"
                               + (f" ({existing.uid})." if existing else ".")}) from exc
    return promotion


def promotion_recheck(*, promotion: PromotionRequest, now: dt.datetime | None = None) -> bool:
    """Evaluate a blocked pending request's gates again; once none blocks (the version has answered enough live
    traffic, its ground truth arrived, an approver trusted its types…), record the gates, audit that it became
    approvable, and ask its approvers, exactly once (the row lock and ``approvers_notified_at`` see to that).
    Returns whether approvers were notified now."""
    with transaction.atomic():
        locked = PromotionRequest.objects.select_for_update().select_related("model__team", "version__model").filter(
            pk=promotion.pk, status=PromotionStatus.PENDING, approvers_notified_at__isnull=True).first()
        if locked is None:
            return False
        gates = gates_evaluate(locked.version, locked.target, override_reason=locked.override_reason,
                               tolerance=locked.metric_tolerance)
        if blocking(gates):
            return False
        before = [g.get("name") for g in locked.gates if g.get("blocks")]
        locked.gates = gates_as_json(gates)
        locked.approvers_notified_at = locked.updated_at = now or timezone.now()
        locked.save(update_fields=["gates", "approvers_notified_at", "updated_at"])
        audit_record(AuditAction.PROMOTION_UNBLOCKED, actor=None, target=promotion_target(locked),
                     before={"blocking_gates": before}, after={"blocking_gates": [],
                                                               "approvers_notified": _approver_emails(locked)})
        _notify(locked, "promotion.requested")
        return True


def promotions_recheck_blocked() -> list[str]:
    """Every blocked pending request checked again (beat, ``registry.tasks.promotions_recheck``); the uids of those
    whose approvers were notified now."""
    unblocked = []
    for promotion in PromotionRequest.objects.filter(status=PromotionStatus.PENDING,
                                                     approvers_notified_at__isnull=True).order_by("created_at"):
        try:
            if promotion_recheck(promotion=promotion):
                unblocked.append(str(promotion.uid))
        except Exception:  # one request's failure (a version deleted under it) must not stop the others
            logger.exception("Rechecking promotion %s failed", promotion.uid)
    return unblocked


def can_approve(promotion: PromotionRequest, user: Any) -> tuple[bool, str]:
    """Whether ``user`` may decide on ``promotion``, and why not."""
    if not has_capability(user, "approve_promotion"):
        return False, "Your role does not allow approving promotions."
    if promotion.requested_by_id == user.pk:
        return False, "You requested this promotion; someone else has to approve it."
    if promotion.version.uploaded_by_id == user.pk:
        return False, "You uploaded this version; someone else has to approve it."
    if promotion.status != PromotionStatus.PENDING:
        return False, f"The request is {promotion.status}, no longer pending."
    if any(a.approver_id == user.pk for a in promotion.approvals.all()):
        return False, "You have already decided on this request."
    return True, ""


def _reauthenticate(promotion: PromotionRequest, actor: Any, password: str, request: Any) -> None:
    """Approving a promotion to prod takes the approver's password (``portal.services.reauthenticate``)."""
    if promotion.target != Environment.PROD:
        return
    reauthenticate(actor=actor, password=password, request=request, purpose="promotion.approve",
                   what="Approving a promotion to prod", target=promotion_target(promotion))


def promotion_decide(*, promotion: PromotionRequest, actor: Any, approve: bool, comment: str = "",
                     password: str = "", request: Any = None) -> PromotionRequest:
    """Record one approver's decision. The approval that meets the policy starts the deployment."""
    if approve:
        _reauthenticate(promotion, actor, password, request)
    with transaction.atomic():
        locked = PromotionRequest.objects.select_for_update().select_related(
            "model__team", "version__model").get(pk=promotion.pk)
        allowed, why = can_approve(locked, actor)
        if not allowed:
            raise PermissionDenied(why)
        if not approve and not comment.strip():
            raise ValidationError({"comment": "Say why you reject it, so the requester can act on it."})
        gates: list[Gate] = []
        if approve:
            gates = gates_evaluate(locked.version, locked.target, override_reason=locked.override_reason,
                                   tolerance=locked.metric_tolerance)
            locked.gates = gates_as_json(gates)
            if blocking(gates):
                raise ValidationError({"gates": [f"{g.label}: {g.detail}" for g in blocking(gates)]})
        PromotionApproval.objects.create(promotion=locked, approver=actor, comment=comment.strip()[:5000],
                                         decision=ApprovalDecision.APPROVE if approve else ApprovalDecision.REJECT,
                                         reauthenticated=approve and locked.target == Environment.PROD)
        now = timezone.now()
        if not approve:
            locked.status, locked.decided_at = PromotionStatus.REJECTED, now
            audit_record(AuditAction.PROMOTION_REJECT, actor=actor, target=promotion_target(locked),
                         before={"status": "pending"}, after={"status": "rejected", "comment": comment.strip()})
            locked.updated_at = now
            locked.save(update_fields=["status", "decided_at", "updated_at"])
            _notify(locked, "promotion.rejected")
            return locked
        count = locked.approvals.filter(decision=ApprovalDecision.APPROVE).count()
        audit_record(AuditAction.PROMOTION_APPROVE, actor=actor, target=promotion_target(locked),
                     after={"approvals": count, "required": locked.approvals_required, "comment": comment.strip(),
                            "reauthenticated": locked.target == Environment.PROD})
        locked.updated_at = now
        if count >= locked.approvals_required:
            locked.status, locked.decided_at = PromotionStatus.APPROVED, now
            _start_deployment(locked, actor)
            _notify(locked, "promotion.approved")
        locked.save(update_fields=["status", "decided_at", "updated_at", "gates", "deployment"])
        return locked


def _start_deployment(promotion: PromotionRequest, actor: Any) -> None:
    deployment = deployment_start(version=promotion.version, environment=promotion.target,
                                  strategy=Strategy.REPLACE, actor=actor, via_promotion=True,
                                  purpose=DeploymentPurpose.PROMOTION,
                                  reason=f"Promotion requested by {promotion.requested_by}: {promotion.reason}")
    promotion.deployment = deployment
    promotion.status = PromotionStatus.DEPLOYING
    audit_record(AuditAction.PROMOTION_DEPLOY, actor=actor, target=promotion_target(promotion),
                 before={"status": "approved"}, after={"status": "deploying", "deployment": str(deployment.uid)})


def promotion_cancel(*, promotion: PromotionRequest, actor: Any) -> PromotionRequest:
    with transaction.atomic():
        locked = PromotionRequest.objects.select_for_update().get(pk=promotion.pk)
        if locked.requested_by_id != actor.pk and not has_capability(actor, "manage_teams"):
            raise PermissionDenied("Only the requester (or an administrator) cancels a request.")
        if locked.status != PromotionStatus.PENDING:
            raise ValidationError({"status": f"The request is {locked.status}; only pending requests are cancelled."})
        locked.status, locked.decided_at = PromotionStatus.CANCELLED, timezone.now()
        locked.updated_at = locked.decided_at
        locked.save(update_fields=["status", "decided_at", "updated_at"])
        audit_record(AuditAction.PROMOTION_CANCEL, actor=actor, target=promotion_target(promotion),
                     before={"status": "pending"}, after={"status": "cancelled"})
    return locked


# --- Called by the deployment service, inside its transactions ----------------------------------------------------

@receiver(deployment_gates, dispatch_uid="promotions.deployment_gate_problems")
def deployment_gate_problems(sender: Any, *, deployment: Deployment, **kwargs: Any) -> list[str]:
    """Gates checked again when a promotion's deployment starts: the world may have moved since approval."""
    promotion = PromotionRequest.objects.filter(deployment=deployment).first()
    if promotion is None:
        return []
    gates = gates_evaluate(deployment.version, deployment.environment, override_reason=promotion.override_reason,
                           tolerance=promotion.metric_tolerance)
    return [f"{g.label}: {g.detail}" for g in blocking(gates)]


@receiver(deployment_finished, dispatch_uid="promotions.deployment_finished")
def promotion_deployment_finished(sender: Any, *, deployment: Deployment, live: bool, error: str = "",
                                  **kwargs: Any) -> None:
    """The promotion a deployment carried out goes live or fails with it (and is recorded, in the same transaction)."""
    updated = PromotionRequest.objects.filter(deployment=deployment, status=PromotionStatus.DEPLOYING).update(
        status=PromotionStatus.LIVE if live else PromotionStatus.FAILED, updated_at=timezone.now())
    if not updated:
        return
    promotion = PromotionRequest.objects.select_related("model__team", "version").get(deployment=deployment)
    audit_record(AuditAction.PROMOTION_LIVE if live else AuditAction.PROMOTION_FAIL, actor=None,
                 target=promotion_target(promotion), before={"status": "deploying"},
                 after={"status": promotion.status, **({"error": error[:500]} if error else {})},
                 outcome=AuditOutcome.SUCCESS if live else AuditOutcome.FAILURE)
    _notify(promotion, "promotion.live" if live else "promotion.failed")


# --- Rollback -----------------------------------------------------------------------------------------------------

def rollback_candidates(model: RegisteredModel, environment: str) -> list[ModelVersion]:
    """Versions that served ``environment`` as champion before, newest first, without the one serving now."""
    current = champion_version(model, environment)
    seen: list[ModelVersion] = []
    for interval in ServingInterval.objects.filter(model=model, environment=environment, role="champion").exclude(
            version=current).select_related("version").order_by("-started_at"):
        if interval.version not in seen and interval.version.status == VersionStatus.READY:
            seen.append(interval.version)
    return seen


ROLLBACK_WHO: dict[str, str] = {Environment.DEV: "data scientists and administrators (rolling dev back is a dev deployment)",
                                Environment.STAGE: "approvers and administrators",
                                Environment.PROD: "approvers and administrators"}


def may_roll_back(user: Any, environment: str) -> tuple[bool, str]:
    """Whether ``user`` may roll ``environment`` back, and the one sentence every page and refusal uses to say who
    may, so the environment page, the promotion page and the error agree word for word."""
    capability = "deploy_dev" if environment == Environment.DEV else "rollback_environment"
    if has_capability(user, capability):
        return True, ""
    return False, f"Rolling {environment} back is for {ROLLBACK_WHO.get(environment, 'approvers')}; your role is not."


def rollback_plan(model: RegisteredModel, environment: str,
                  to_version: int | None) -> tuple[ModelVersion, ModelVersion]:
    """(what serves now, what a rollback to ``to_version`` (None: the previous one) would put back), or the
    ValidationError the rollback itself would raise; the confirmation page shows it before anything happens."""
    current = champion_version(model, environment)
    if current is None:
        raise ValidationError({"environment": f"Nothing serves {environment}; there is nothing to roll back."})
    candidates = rollback_candidates(model, environment)
    if to_version is None:
        if not candidates:
            raise ValidationError({"to_version": f"No earlier version served {environment}."})
        return current, candidates[0]
    matches = [v for v in candidates if v.number == to_version]
    if not matches:
        raise ValidationError({"to_version": f"v{to_version} never served {environment} before (or it serves "
                               "now); roll back to one of: " + (", ".join(f"v{v.number}" for v in candidates)
                                                               or "none") + "."})
    return current, matches[0]


def environment_rollback(*, model: RegisteredModel, environment: str, reason: str, actor: Any,
                         to_version: int | None = None) -> Deployment:
    environment_param(environment)
    allowed, why_not = may_roll_back(actor, environment)
    if not allowed:
        raise PermissionDenied(why_not)
    if not reason.strip():
        raise ValidationError({"reason": "Say why you roll back; it goes into the timeline and the audit trail."})
    current, chosen = rollback_plan(model, environment, to_version)
    with transaction.atomic():
        deployment = deployment_start(version=chosen, environment=environment, strategy=Strategy.REPLACE,
                                      actor=actor, via_promotion=True, purpose=DeploymentPurpose.ROLLBACK,
                                      reason=f"Rollback from v{current.number}: {reason.strip()}")
        audit_record(AuditAction.ENVIRONMENT_ROLLBACK, actor=actor,
                     target=Target("environment", f"{model.name}/{environment}", f"{model.name} {environment}",
                                   model.team.slug),
                     before={"version": current.number}, after={"version": chosen.number, "reason": reason.strip(),
                                                                "deployment": str(deployment.uid)})

        webhooks_notify(team=model.team, event="environment.rollback", payload={
            "event": "environment.rollback", "model": model.name, "environment": environment,
            "from_version": current.number, "to_version": chosen.number, "reason": reason.strip(),
            "by": actor.get_username(), "deployment": str(deployment.uid)})
    return deployment


# --- History ------------------------------------------------------------------------------------------------------

def _interval_row(interval: ServingInterval) -> dict[str, Any]:
    deployment = interval.deployment
    promotion = getattr(deployment, "promotion", None)
    approvals = [a for a in promotion.approvals.all() if a.decision == ApprovalDecision.APPROVE] if promotion else []
    return {
        "version": interval.version.number, "role": interval.role, "traffic_percent": interval.traffic_percent,
        "from": interval.started_at, "to": interval.ended_at, "deployment": str(deployment.uid),
        "how": deployment.purpose,
        "requested_by": (promotion.requested_by.get_username() if promotion and promotion.requested_by else
                         deployment.requested_by.get_username() if deployment.requested_by else None),
        "approved_by": [a.approver.get_username() for a in approvals],
        "reason": promotion.reason if promotion else deployment.reason,
        "promotion": str(promotion.uid) if promotion else None,
    }


def _intervals(model: RegisteredModel, environment: str) -> QuerySet[ServingInterval]:
    return ServingInterval.objects.filter(model=model, environment=environment).select_related(
        "version", "deployment__requested_by", "deployment__promotion__requested_by").prefetch_related(
        "deployment__promotion__approvals__approver")


def parse_at(raw: str, *, naive_is_utc: bool) -> dt.datetime:
    """An ISO 8601 instant for "what served at T". Without a zone it is taken as UTC when ``naive_is_utc`` (the
    page's field), refused otherwise (the API, where an ambiguous time would give a wrong answer silently)."""
    from django.utils.dateparse import parse_datetime

    try:
        parsed = parse_datetime(raw.strip().replace(" ", "+"))  # a literal '+' arrives as a space in a query
    except ValueError:  # well-formed but impossible, such as month 13
        parsed = None
    if parsed is None:
        raise ValidationError({"at": "Give an ISO 8601 time such as 2026-03-03T14:05:00Z."})
    if parsed.tzinfo is None:
        if not naive_is_utc:
            raise ValidationError({"at": "Give the time zone too (Z or +01:00), so the answer is unambiguous."})
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed


def serving_history(model: RegisteredModel, environment: str) -> list[dict[str, Any]]:
    """Every interval in which a version served ``environment``, newest first."""
    return [_interval_row(i) for i in _intervals(model, environment).order_by("-started_at", "-pk")]


def serving_at(model: RegisteredModel, environment: str, at: dt.datetime) -> dict[str, Any]:
    """What served ``environment`` at ``at``: the champion as ``serving`` (None if nothing), others as ``also``."""
    live = [_interval_row(i) for i in _intervals(model, environment).filter(
        Q(ended_at__isnull=True) | Q(ended_at__gt=at), started_at__lte=at).order_by("started_at")]
    champion = next((r for r in live if r["role"] == "champion"), None)
    return {"at": at, "serving": champion, "also": [r for r in live if r is not champion]}


def champions_now(pairs: set[tuple[int, str]]) -> dict[tuple[int, str], int]:
    """The version number serving each (model id, environment) now, in one query: list pages say what serves now,
    not what served when a request went live (a later rollback or promotion replaced it)."""
    if not pairs:
        return {}
    query = Q()
    for model_id, environment in pairs:
        query |= Q(model_id=model_id, environment=environment)
    return {(m, e): n for m, e, n in EnvironmentState.objects.filter(query, champion__isnull=False).values_list(
        "model_id", "environment", "champion__version__number")}


def live_state(promotion: PromotionRequest, champions: dict[tuple[int, str], int]) -> dict[str, Any] | None:
    """For a live request: whether its version still serves the target, and what replaced it."""
    if promotion.status != PromotionStatus.LIVE:
        return None
    now = champions.get((promotion.model_id, promotion.target))
    return {"serving": now == promotion.version.number, "now": now}


def promotion_queue(*, user: Any, status: str = "") -> QuerySet[PromotionRequest]:
    qs = scope_to_teams(PromotionRequest.objects.select_related(
        "model__team", "version__uploaded_by", "requested_by", "champion_version", "deployment__model",
        "deployment__version", "deployment__requested_by").prefetch_related("approvals__approver"),
        user)
    if status:
        qs = qs.filter(status=status)
    return qs


# --- Notifications ------------------------------------------------------------------------------------------------

def _approver_emails(promotion: PromotionRequest) -> list[str]:
    users = get_user_model().objects.filter(
        Q(groups__permissions__codename="approve_promotion") | Q(is_superuser=True), is_active=True,
        memberships__team=promotion.model.team).exclude(email="").exclude(
        pk__in=[promotion.requested_by_id or 0, promotion.version.uploaded_by_id or 0]).distinct()
    return sorted({u.email for u in users})


def _notify(promotion: PromotionRequest, event: str) -> None:
    """Email and webhooks for ``event``, sent after the transaction commits (never for a rolled-back change)."""
    link = settings.PORTAL_BASE_URL + reverse("registry:promotion", args=[promotion.uid])
    what = f"{promotion.model.name} v{promotion.version.number} to {promotion.target}"
    requester = promotion.requested_by
    if event == "promotion.requested":
        recipients = _approver_emails(promotion)
        subject = f"Approval needed: {what}"
        body = (f"{requester} asks to promote {what}.\n\nReason: {promotion.reason}\n\n"
                f"Approvals needed: {promotion.approvals_required}\nReview the gates and decide: {link}\n")
    else:
        recipients = [requester.email] if requester and requester.email else []
        outcome = {"promotion.approved": "was approved and is deploying", "promotion.rejected": "was rejected",
                   "promotion.live": "is live", "promotion.failed": "failed to deploy"}[event]
        subject = f"Your promotion of {what} {outcome}"
        comments = "\n".join(f"- {a.approver}: {a.get_decision_display()}. {a.comment}"
                             for a in promotion.approvals.select_related("approver"))
        body = f"Your request to promote {what} {outcome}.\n\n{comments}\n\n{link}\n"
    if recipients:
        transaction.on_commit(lambda: send_email_task.delay(subject, body, recipients))
    webhooks_notify(team=promotion.model.team, event=event, payload={
        "event": event, "promotion": str(promotion.uid), "model": promotion.model.name,
        "version": promotion.version.number, "target": promotion.target, "status": promotion.status,
        "requested_by": requester.get_username() if requester else None, "reason": promotion.reason, "url": link})
