"""GDPR subject rights over what the portal holds about a person: access (Art. 15) and erasure (Art. 17).

Subjects are known only by the keyed hash of their id (``PORTAL_SUBJECT_HASH_KEY``); the raw id is never stored,
not even in the audit events these requests write. Both first drain the prediction buffer, so records still on
their way to the log are included in an access export and cannot come back after an erasure.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.db.models import Case, Count, Value, When
from django.dispatch import Signal
from django.utils import timezone

from monitoring.datasets import erasure
from monitoring.experiments.units import ERASED_UNIT, units_unlink
from monitoring.flush import drain
from monitoring.models import Feedback, PredictionLog, SubjectAccessReport, SubjectReportStatus
from monitoring.sensitive import decrypt_value, encrypt_value, reveal_row
from portal import context
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import Membership
from portal.permissions import has_capability, require_capability
from registry.models import EnvironmentState, ModelVersion, RegisteredModel
from registry.serving.views import subject_hash

logger = logging.getLogger(__name__)

MAX_SUBJECT_ID = 256
PURGE_SLICE = 10_000


def _target(digest: str) -> Target:
    return Target(type="subject", id=digest, repr=f"subject {digest[:12]}…")


def subject_export(*, subject_id: str, actor: Any) -> dict[str, Any]:
    """Everything held about the subject, compiled in this process (the API's export). The pages ask a worker for
    it instead (``subject_report_request``): explaining the decisions takes seconds per model version."""
    require_capability(actor, "manage_subjects")
    return _export(subject_hash(subject_id), actor)


def _export(digest: str, actor: Any, *, progress: Callable[[int, int], None] | None = None,
            report: str = "") -> dict[str, Any]:
    drain()
    predictions: list[dict[str, Any]] = [dict(p) for p in PredictionLog.objects.filter(
        subject_hash=digest).order_by("created_at").values(
        "id", "model_name", "version", "environment", "role", "created_at", "inputs", "output", "error")]

    may_see = has_capability(actor, "view_sensitive")
    plain = {p["id"]: reveal_row(p["inputs"], may_see=True) for p in predictions}
    for p in predictions:
        p["inputs"] = reveal_row(p["inputs"], may_see=may_see)
    explained = decision_explanations(predictions, plain, progress=progress)
    for p in predictions:
        p["explanation"] = explained.get(p["id"])
    feedback = list(Feedback.objects.filter(prediction_id__in=[p["id"] for p in predictions]).values(
        "prediction_id", "actual", "received_at"))
    snapshots = erasure.subject_snapshots(digest)
    with transaction.atomic():
        audit_record(AuditAction.GDPR_SUBJECT_ACCESS, actor=actor, target=_target(digest),
                     metadata={"predictions": len(predictions), "feedback": len(feedback),
                               "snapshots": len(snapshots), **({"report": report} if report else {})})
    return {"subject_hash": digest, "generated_at": timezone.now(), "predictions": predictions,
            "feedback": feedback, "training_snapshots": snapshots,
            "stores": ["prediction log (inputs, outputs)", "ground truth (feedback)",
                       "dataset snapshots (training data cut from the log)"]}


MAX_EXPLAINED_DECISIONS = 200
TOP_FEATURES = 3
EXPLAIN_SLICE = 20  # decisions explained per call of the version's explainer (each call has the explain budget)


def decision_explanations(predictions: list[dict[str, Any]], plain: dict[str, Any], *,
                          progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, Any]]:
    """For each logged decision, why it came out as it did (GDPR Art. 15(1)(h), 22): recomputed by the version's
    explainer in a sandboxed host (the model is a program; nothing of it runs here) from the logged inputs
    (``plain``: decrypted, used only for the computation; the words show the values as ``predictions`` shows
    them, masked for a reader without ``view_sensitive``). Per prediction id: the prediction, the model version,
    the method and the top features in plain words, or ``{"unavailable": why}``. ``progress(done, total)`` is told
    the decisions settled so far after each model version."""
    import numpy as np

    from registry.sandbox import hosts
    from registry.serving import runtime

    out: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for p in predictions:
        if p.get("error") or p.get("output") is None:
            continue
        if plain.get(p["id"]) is None:
            out[p["id"]] = {"unavailable": "its inputs were erased"}
        elif len(groups) <= MAX_EXPLAINED_DECISIONS and sum(map(len, groups.values())) < MAX_EXPLAINED_DECISIONS:
            groups.setdefault((p["model_name"], p["version"]), []).append(p)
        else:
            out[p["id"]] = {"unavailable": f"the report explains the first {MAX_EXPLAINED_DECISIONS} decisions"}
    total = sum(map(len, groups.values()))
    done = 0
    if progress is not None:
        progress(0, total)
    for (model_name, number), items in groups.items():
        version = (ModelVersion.objects.select_related("artifact", "model")
                   .filter(model__name=model_name, number=number).first())
        why = ""
        if version is None or version.artifact is None:
            why = "the model version's file is no longer held"
        elif (version.explanation or {}).get("pending"):
            why = "the version's explainer is still being prepared from its reference data; ask again in a minute"
        elif (version.explanation or {}).get("no_explainer"):
            why = f"no explainer fits this model ({version.explanation.get('error')})"
        elif (version.explanation or {}).get("error"):
            why = f"the version's explainer could not be prepared ({version.explanation.get('error')})"
        matrix = None
        if not why:
            try:
                matrix = np.asarray([plain[p["id"]] for p in items], dtype="float64")
            except (TypeError, ValueError):
                why = "its inputs are not all numbers"
        if why or version is None or matrix is None:
            out.update({p["id"]: {"unavailable": why} for p in items})
            done += len(items)
            if progress is not None:
                progress(done, total)
            continue
        info = version.explanation or {}
        columns = [str(c) for c in info.get("columns") or runtime.input_columns(version)]
        background = np.asarray(info["background"], dtype="float64") if info.get("background") else None
        if len(columns) != matrix.shape[1] or (background is not None and background.shape[1] != matrix.shape[1]):
            columns, background = runtime.input_columns(version), None
        loaded = runtime.load_serving_model(version=version, kind="native", blob=None,
                                            key=f"subject-explain-{version.pk}")
        try:
            # In slices, each with the explain budget: a model-agnostic explainer answers a few rows per budget,
            # and the report's page shows the count going up.
            for first in range(0, len(items), EXPLAIN_SLICE):
                part = items[first:first + EXPLAIN_SLICE]
                try:
                    answer = loaded.explain(matrix[first:first + EXPLAIN_SLICE], background, columns or None,
                                            budget=settings.PORTAL_EXPLAIN_BUDGET_SECONDS)
                except (hosts.NoExplainer, hosts.ExplainOverBudget, hosts.HostUnavailable,
                        hosts.HostModelError) as exc:
                    out.update({p["id"]: {"unavailable": f"the explainer could not run ({exc})"} for p in part})
                else:
                    out.update(_words(model_name, number, part, answer, columns))
                done += len(part)
                if progress is not None:
                    progress(done, total)
        finally:
            loaded.close()
    return out


def _words(model_name: str, number: int, items: list[dict[str, Any]], answer: dict[str, Any],
           columns: list[str]) -> dict[str, dict[str, Any]]:
    """Each decision's explanation in plain words: its three weightiest features and what they did."""
    out: dict[str, dict[str, Any]] = {}
    names = [str(c) for c in answer.get("columns") or columns]
    for p, row in zip(items, answer["rows"], strict=True):
        shown = p["inputs"] if isinstance(p["inputs"], list) else [None] * len(names)
        order = sorted(range(len(names)), key=lambda i: -abs(row["attributions"][i]))[:TOP_FEATURES]
        what = answer["output"] + (f" of class {row['class']}" if row.get("class") is not None else "")
        top = [{"feature": names[i], "value": shown[i] if i < len(shown) else None,
                "attribution": row["attributions"][i],
                "words": f"{names[i]} = {_value_words(shown[i] if i < len(shown) else None)} "
                         f"{'raised' if row['attributions'][i] > 0 else 'lowered'} the {what} by "
                         f"{abs(row['attributions'][i]):.3g}"}
               for i in order]
        out[p["id"]] = {"prediction": p["output"], "model": model_name, "version": number,
                        "method": answer["method"], "approximate": answer["approximate"],
                        "explains": what, "output": row["output"], "base_value": row["base_value"],
                        "top_features": top,
                        "summary": (f"Version {number} of {model_name} decided {p['output']}; its {what} was "
                                    f"{row['output']:.3g} against an average of {row['base_value']:.3g}, "
                                    "mostly because " + "; ".join(t["words"] for t in top) + ".")}
    return out


def _value_words(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --- Subject access reports compiled by a worker (the pages) -------------------------------------------------

STALLED_SECONDS = 600  # a report no worker finished in this long is shown as failed (its worker stopped)


def reports_expire(*, now: Any = None) -> int:
    """Compiled reports are copies of a subject's data: gone once older than ``SubjectAccessReport.KEEP_SECONDS``
    (asked again, a report is compiled afresh and audited again)."""
    now = now or timezone.now()
    return SubjectAccessReport.objects.filter(
        created_at__lt=now - dt.timedelta(seconds=SubjectAccessReport.KEEP_SECONDS)).delete()[0]


# Sent once the transaction that asked for a subject access report commits (``report_id``, ``request_ctx``):
# monitoring.tasks enqueues its compilation.
subject_report_requested = Signal()


def subject_report_request(*, subject_id: str, actor: Any) -> SubjectAccessReport:
    """Ask a worker for the subject's access report (``subject_report_compile``): a row the page follows. Only the
    keyed hash of ``subject_id`` is stored. The access itself is audited when the worker reads the data, under this
    request's id."""
    require_capability(actor, "manage_subjects")
    digest = subject_hash(subject_id)
    reports_expire()
    with transaction.atomic():
        report = SubjectAccessReport.objects.create(subject_hash=digest, requested_by=actor)
        ctx = context.current().as_task_kwargs()
        pk = report.pk
        transaction.on_commit(lambda: subject_report_requested.send(sender=SubjectAccessReport, report_id=pk,
                                                                    request_ctx=ctx))
    return report


def subject_report_compile(*, report_id: int) -> SubjectAccessReport | None:
    """The worker's side: claims the report, compiles it as the API's export does (audited as a subject access by
    the officer who asked), counting decisions explained as it goes, and stores it encrypted. A report erased
    meanwhile (the subject's erasure deletes it) stays gone: its result is dropped."""
    now = timezone.now()
    if not SubjectAccessReport.objects.filter(pk=report_id, status=SubjectReportStatus.PENDING).update(
            status=SubjectReportStatus.RUNNING, started_at=now):
        return SubjectAccessReport.objects.filter(pk=report_id).first()
    report = SubjectAccessReport.objects.select_related("requested_by").get(pk=report_id)
    actor = report.requested_by
    if actor is None or not actor.is_active or not has_capability(actor, "manage_subjects"):
        SubjectAccessReport.objects.filter(pk=report_id).update(
            status=SubjectReportStatus.FAILED, finished_at=timezone.now(),
            error="The officer who asked for it may no longer answer subject access requests.")
        return SubjectAccessReport.objects.filter(pk=report_id).first()

    def progress(done: int, total: int) -> None:
        SubjectAccessReport.objects.filter(pk=report_id).update(decisions_done=done, decisions_total=total)

    try:
        data = _export(report.subject_hash, actor, progress=progress, report=str(report.uid))
    except Exception as exc:
        logger.exception("Subject access report %s failed", report.uid)
        SubjectAccessReport.objects.filter(pk=report_id).update(
            status=SubjectReportStatus.FAILED, finished_at=timezone.now(),
            error=f"The report could not be compiled ({type(exc).__name__}); ask again, or use the API's export.")
        return SubjectAccessReport.objects.filter(pk=report_id).first()
    SubjectAccessReport.objects.filter(pk=report_id, status=SubjectReportStatus.RUNNING).update(
        status=SubjectReportStatus.READY, report=encrypt_value(data), finished_at=timezone.now(),
        decisions_done=models.F("decisions_total"))
    return SubjectAccessReport.objects.filter(pk=report_id).first()


def subject_report_get(*, uid: Any, actor: Any) -> SubjectAccessReport | None:
    """The report ``uid`` if ``actor`` asked for it (another officer's report is not theirs to read: None) and it
    has not expired."""
    require_capability(actor, "manage_subjects")
    reports_expire()
    return SubjectAccessReport.objects.filter(uid=uid, requested_by=actor).first()


def subject_report_stalled(report: SubjectAccessReport) -> bool:
    started = report.started_at or report.created_at
    return report.running and (timezone.now() - started).total_seconds() > STALLED_SECONDS


def subject_report_data(report: SubjectAccessReport) -> dict[str, Any]:
    """The compiled report, decrypted (ready reports only)."""
    assert report.status == SubjectReportStatus.READY and report.report
    data: dict[str, Any] = decrypt_value(report.report)
    return data


def subject_report_download(*, report: SubjectAccessReport, actor: Any) -> dict[str, Any]:
    """The ready report for download: a further access to the subject's data, audited as the search was."""
    require_capability(actor, "manage_subjects")
    data = subject_report_data(report)
    with transaction.atomic():
        audit_record(AuditAction.GDPR_SUBJECT_ACCESS, actor=actor, target=_target(report.subject_hash),
                     metadata={"predictions": len(data["predictions"]), "feedback": len(data["feedback"]),
                               "snapshots": len(data["training_snapshots"]), "report": str(report.uid),
                               "download": True})
    return data


ERASED_FIELDS = ("inputs", "output", "error", "subject link")


def _unit_erased() -> Case:
    """A row's routing-key hash goes with its payload; a keyed row stays marked as keyed (``ERASED_UNIT``) so the
    roll-up never recounts its request as a keyless unit of an experiment (the unit itself stays counted there)."""
    return Case(When(unit_hash="", then=Value("")), default=Value(ERASED_UNIT))


def subject_holdings(*, subject_id: str, actor: Any) -> dict[str, Any]:
    """What an erasure of ``subject_id`` would remove, counted (no payload is read): the prediction rows per model
    and environment whose inputs, output, error and subject link go, and the ground truth that goes with them. For
    the erasure page's confirmation step; the erasure itself counts again under its lock."""
    require_capability(actor, "manage_subjects")
    digest = subject_hash(subject_id)
    drain()
    rows = list(PredictionLog.objects.filter(subject_hash=digest).values("model_name", "environment").annotate(
        n=Count("id")).order_by("model_name", "environment"))
    ids = PredictionLog.objects.filter(subject_hash=digest).values("id")
    return {"subject_hash": digest, "by_model": rows, "predictions": sum(r["n"] for r in rows),
            "feedback": Feedback.objects.filter(prediction_id__in=ids).count(), "fields": ERASED_FIELDS,
            "kept": ("model", "version", "environment", "time", "latency")}


def subject_erase(*, subject_id: str, actor: Any, reason: str = "") -> dict[str, Any]:
    """Erase the subject's payloads everywhere they are held. Prediction rows keep their non-personal facts
    (model, version, time, latency) so aggregates stay right; inputs, outputs, ground truth and the subject link go.
    Training data too: the subject's rows leave every dataset snapshot (a new content hash, the old one kept in the
    snapshot's manifest chain with this receipt) and each version trained on such a snapshot is flagged until a
    compliance officer decides (``monitoring.datasets.erasure``).
    The receipt is the audit event that records the erasure: its sequence number and hash."""
    require_capability(actor, "manage_subjects")
    digest = subject_hash(subject_id)
    drain()
    plan = erasure.erasure_prepare(digest)  # new snapshot files written before the transaction, no lock held
    try:
        with transaction.atomic():
            rows = list(PredictionLog.objects.select_for_update().filter(subject_hash=digest).values_list(
                "id", "model_name"))
            ids = [pk for pk, _model in rows]
            feedback = Feedback.objects.filter(prediction_id__in=ids).delete()[0]
            erased = PredictionLog.objects.filter(id__in=ids).update(inputs=None, output=None, subject_hash="",
                                                                     error="", unit_hash=_unit_erased())
            units_unlink(digest)
            # Access reports compiled (or being compiled) for the subject are copies of their data: they go too.
            reports = SubjectAccessReport.objects.filter(subject_hash=digest).delete()[0]
            summary = plan.summary()
            event = audit_record(AuditAction.GDPR_ERASURE, actor=actor, target=_target(digest),
                                 after={"predictions_erased": erased, "feedback_erased": feedback,
                                        "training_data": summary},
                                 metadata={"reason": reason[:1000], "access_reports_deleted": reports})
            training = erasure.erasure_apply(plan, models={m for _pk, m in rows}, event=event, actor=actor)
    except BaseException:
        erasure.erasure_abandon(plan)
        raise
    erasure.erasure_cleanup(plan)  # the old files held the subject's rows
    return {"receipt": {"audit_event_seq": event.seq, "audit_event_hash": event.hash},
            "subject_hash": digest, "erased": {"predictions": erased, "feedback": feedback},
            "training_data": training,
            "at": event.timestamp, "by": actor.get_username()}


def payloads_purge(*, now: Any = None) -> dict[str, dict[str, int]]:
    """Purge prediction payloads past each environment's retention (``PORTAL_RETENTION_DAYS_*``): inputs, outputs,
    errors, the subject link and ground truth go; model, version, time and latency stay. One audit event per
    environment that had anything to purge, with the counts."""

    from django.conf import settings

    now = now or timezone.now()
    done: dict[str, dict[str, int]] = {}
    for environment, days in settings.PORTAL_PAYLOAD_RETENTION_DAYS.items():
        cutoff = now - dt.timedelta(days=days)
        purged = feedback = 0
        with transaction.atomic():  # one per environment, with its audit event; ids are read in slices
            while True:
                ids = list(PredictionLog.objects.filter(environment=environment, created_at__lt=cutoff).exclude(
                    inputs=None, output=None, subject_hash="", unit_hash__in=("", ERASED_UNIT))
                    .values_list("id", flat=True)[:PURGE_SLICE])
                if not ids:
                    break
                feedback += Feedback.objects.filter(prediction_id__in=ids).delete()[0]
                purged += PredictionLog.objects.filter(id__in=ids).update(inputs=None, output=None,
                                                                          subject_hash="", error="",
                                                                          unit_hash=_unit_erased())
            if purged:
                audit_record(AuditAction.RETENTION_PURGE, actor=None,
                             target=Target("environment", environment, f"prediction payloads in {environment}"),
                             after={"predictions_purged": purged, "feedback_purged": feedback},
                             metadata={"retention_days": days, "older_than": cutoff.isoformat()})
                done[environment] = {"predictions": purged, "feedback": feedback}
    return done


SUBJECT_LOOKBACK_DAYS = 30


def records_of_processing() -> dict[str, Any]:
    """GDPR Art. 30 from the registry: per model its purpose, categories of data, where it serves, how long
    payloads are kept and who can see them. Users, memberships, versions and serving states take one query each
    whatever their number; whether subject ids are logged is one EXISTS per model over the last 30 days of its
    log (a range of the (model, environment, time) index, stopping at the first hit), never the whole table."""

    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db.models import Q


    retention = settings.PORTAL_PAYLOAD_RETENTION_DAYS
    users = get_user_model().objects.filter(is_active=True).prefetch_related("groups")
    labels = {u.pk: f"{u.get_username()} ({', '.join(sorted(g.name for g in u.groups.all())) or 'no role'})"
              for u in users}
    everywhere = sorted(labels[pk] for pk in users.filter(
        Q(is_superuser=True) | Q(groups__permissions__codename="view_all_teams")).values_list("pk", flat=True)
        .distinct() if pk in labels)
    members: dict[int, list[str]] = {}
    for team_id, user_id in Membership.objects.filter(user__is_active=True).values_list("team_id", "user_id"):
        members.setdefault(team_id, []).append(labels[user_id])
    versions: dict[int, list[Any]] = {}
    for v in ModelVersion.objects.order_by("number").values("model_id", "sensitive_columns", "intended_use"):
        versions.setdefault(v["model_id"], []).append(v)
    serving: dict[int, dict[str, int]] = {}
    for model_id, env, number in EnvironmentState.objects.filter(champion__isnull=False).values_list(
            "model_id", "environment", "champion__version__number"):
        serving.setdefault(model_id, {})[env] = number
    since = timezone.now() - dt.timedelta(days=SUBJECT_LOOKBACK_DAYS)
    rows = []
    for model in RegisteredModel.objects.select_related("team").order_by("name"):
        own = versions.get(model.pk, [])
        rows.append({
            "model": model,
            "purpose": next((v["intended_use"] for v in reversed(own) if v["intended_use"]), model.description),
            "categories": sorted({kind for v in own for kind in (v["sensitive_columns"] or {}).values()}),
            "subject_ids": PredictionLog.objects.filter(model_name=model.name, created_at__gte=since).exclude(
                subject_hash="").exists(),
            "serving": serving.get(model.pk, {}),
            "retention": {env: retention[env] for env in serving.get(model.pk, {})},
            "access": sorted(members.get(model.team_id, [])),
        })
    return {"rows": rows, "everywhere": everywhere, "retention": retention,
            "subject_lookback_days": SUBJECT_LOOKBACK_DAYS}
