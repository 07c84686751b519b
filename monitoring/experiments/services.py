"""A/B experiments: planning, starting, stopping, and the stop rule that turns the numbers into a verdict.

An experiment compares the environment's champion with its canary challenger on one metric of ground truth. Beat
evaluates every running experiment (``experiments_check``): its analysis comes from the rollups
(``monitoring.experiments.selectors``), its guardrails are checked each time, and a verdict change is recorded in
the transaction that makes it, with what follows from it: a guardrail breach or a champion that holds stops the
challenger's traffic (through the registry's deployment service, audited there too); a win opens a promotion
request with the experiment attached as evidence; every terminal verdict is notified (email and webhooks).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from monitoring.experiments import stats
from monitoring.experiments.models import Experiment, ExperimentStatus, Metric, Verdict
from monitoring.experiments.selectors import GUARDRAILS, experiment_analysis, metric_sums, running_experiment
from monitoring.models import Granularity, Rollup
from monitoring.rollups import MAX_SEGMENTS, segment_count, task_of, version_spec
from monitoring.selectors import thresholds_for
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import AuditOutcome
from portal.permissions import require_capability
from portal.tasks import send_email_task
from portal.webhooks import webhooks_notify
from registry.deployments.services import canary_share_change, challenger_stop
from registry.models import ENVIRONMENT_ORDER, Deployment, EnvironmentState, ModelVersion, ServingMode
from registry.promotions.services import promotion_request
from registry.serving.runtime import input_columns
from registry.versions.selectors import environment_param

logger = logging.getLogger(__name__)

BASELINE_DAYS = 7
TERMINAL = (Verdict.CHALLENGER_WINS, Verdict.CHAMPION_HOLDS, Verdict.NO_DIFFERENCE, Verdict.GUARDRAIL,
            Verdict.INVALID)
# Which predictions a metric needs, said to a person when there is no ground truth for it.
METRIC_NEEDS = {
    Metric.ACCURACY: "ground truth labels for a classifier's predictions",
    Metric.LOG_LOSS: "a predicted probability of class 1 (a number from 0 to 1) with a 0/1 ground truth",
    Metric.MAE: "numeric predictions with numeric ground truth",
    Metric.OUTCOME: "a numeric outcome sent as ground truth (converted 0/1, revenue)",
}


def experiment_target(experiment: Experiment) -> Target:
    return Target("experiment", str(experiment.uid),
                  f"{experiment.model.name} {experiment.environment}: v{experiment.champion_version} vs "
                  f"v{experiment.challenger_version}", experiment.model.team.slug)


def _capability(environment: str) -> str:
    return "deploy_dev" if environment == "dev" else "rollback_environment"


# --- Planning -----------------------------------------------------------------------------------------------------

def baseline(*, model: Any, environment: str, version: int, metric: str,
             now: dt.datetime | None = None) -> dict[str, Any]:
    """The champion's metric over the last week, from hourly rollups: outcomes, mean and spread, and how many
    predictions and outcomes arrive a day (for "how many days will this take")."""
    end = now or timezone.now()
    start = (end - dt.timedelta(days=BASELINE_DAYS)).replace(minute=0, second=0, microsecond=0)
    n = total = squares = 0.0
    predictions = labelled = 0
    rows = Rollup.objects.filter(model_name=model.name, environment=environment, granularity=Granularity.HOUR,
                                 start__gte=start, start__lt=end, role__in=("champion", "canary")).values_list(
        "version", "role", "count", "labelled", "data__truth")
    for row_version, role, count, row_labelled, truth in rows:
        predictions += count
        labelled += row_labelled
        if row_version == version and role == "champion":
            rn, rs, rq = metric_sums(truth, metric)
            n, total, squares = n + rn, total + rs, squares + rq
    arm = stats.Arm(n, total, squares)
    mean = arm.mean if n else None
    sd: float | None
    if metric == Metric.ACCURACY:
        sd = stats.bernoulli_sd(mean if mean is not None else 0.5)
    else:
        sd = math.sqrt(arm.variance) if n >= 2 else None
    span_days = max((end - start).total_seconds() / 86400, 1 / 24)
    return {"outcomes": int(n), "mean": mean, "sd": sd, "predictions_per_day": predictions / span_days,
            "outcomes_per_day": labelled / span_days}


def experiment_plan(*, model: Any, environment: str, metric: str, mde: float, alpha: float,
                    traffic_percent: int, now: dt.datetime | None = None) -> dict[str, Any]:
    """The sample the experiment needs for 80 % power at ``mde`` and the days that takes at today's traffic."""
    _check_numbers(metric=metric, mde=mde, alpha=alpha, traffic_percent=traffic_percent)
    state = _canary_state(model, environment)
    champion = Deployment.objects.select_related("version").get(pk=int(state.champion_id or 0))
    base = baseline(model=model, environment=environment, version=champion.version.number, metric=metric, now=now)
    _check_ground_truth(model, environment, champion.version, metric, base)
    share = traffic_percent / 100
    planned = stats.plan(sd=float(base["sd"]), mde=mde, alpha=alpha, share=share)
    per_day_smaller = base["outcomes_per_day"] * min(share, 1 - share)
    return {"baseline_mean": base["mean"], "baseline_sd": base["sd"], "baseline_outcomes": base["outcomes"],
            "tau2": planned.tau2, "planned_sample": planned.planned_sample,
            "fixed_horizon_sample": planned.fixed_horizon_sample,
            "outcomes_per_day": base["outcomes_per_day"],
            "days": planned.planned_sample / per_day_smaller if per_day_smaller > 0 else None,
            "champion": champion, "challenger_id": state.challenger_id}


# --- Input checks: each refusal says what to do --------------------------------------------------------------------

def _check_numbers(*, metric: str, mde: Any, alpha: Any, traffic_percent: Any) -> None:
    errors: dict[str, str] = {}
    if metric not in Metric.values:
        errors["metric"] = f"Choose one of {', '.join(Metric.values)}."
    if isinstance(traffic_percent, bool) or not isinstance(traffic_percent, int) or not 1 <= traffic_percent <= 99:
        errors["traffic_percent"] = (f"The challenger's share must be a whole percentage from 1 to 99, not "
                                     f"{traffic_percent!r}: with 0 or 100 one side gets no traffic to compare.")
    if not isinstance(mde, int | float) or isinstance(mde, bool) or not math.isfinite(mde) or mde <= 0:
        errors["mde"] = ("Give the minimum detectable effect as a positive number in the metric's units "
                         "(for accuracy, 0.02 is two percentage points).")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0.001 <= alpha <= 0.2:
        errors["alpha"] = "The significance level is between 0.001 and 0.2 (0.05 is usual)."
    if errors:
        raise ValidationError(errors)


def _canary_state(model: Any, environment: str) -> EnvironmentState:
    state = EnvironmentState.objects.filter(model=model, environment=environment).first()
    if state is None or state.champion_id is None:
        raise ValidationError({"environment": f"Nothing serves {model.name} in {environment}: deploy a champion, "
                                              "then the challenger with strategy canary."})
    if state.mode != ServingMode.CANARY or state.challenger_id is None:
        raise ValidationError({"environment": (
            f"No canary challenger runs beside the champion of {model.name} in {environment}: deploy the challenger "
            f"with strategy canary first (POST /api/v1/models/{model.name}/versions/N/deploy with "
            '{"environment": "' + environment + '", "strategy": "canary", "traffic_percent": 50}).')})
    return state


def _check_ground_truth(model: Any, environment: str, version: Any, metric: str, base: dict[str, Any]) -> None:
    task = task_of(version.signature or {})
    wrong = {Metric.ACCURACY: task == "regression", Metric.MAE: task == "classification",
             Metric.LOG_LOSS: task == "classification", Metric.OUTCOME: False}[Metric(metric)]
    if wrong:
        other = "mae" if metric == Metric.ACCURACY else "accuracy"
        if metric == Metric.LOG_LOSS:
            raise ValidationError({"metric": f"log_loss needs a predicted probability, and v{version.number} "
                                             "answers class labels: use accuracy or a business outcome."})
        raise ValidationError({"metric": f"{metric} does not fit v{version.number}, a {task} model: use {other} "
                                         "or a business outcome."})
    if base["outcomes"] < 2 or base["sd"] is None:
        raise ValidationError({"metric": (
            f"No ground truth for {metric} yet: v{version.number} in {environment} has "
            f"{base['outcomes']} prediction(s) with it in the last {BASELINE_DAYS} days, and {metric} needs "
            f"{METRIC_NEEDS[Metric(metric)]}. Send outcomes to POST /api/v1/serve/{model.name}/{environment}/"
            "feedback first (the experiment counts only predictions whose outcome is known).")})


def clean_guardrails(raw: Any, model: Any) -> dict[str, float]:
    """``{"error_rate_max", "latency_p99_ms", "drift_psi_max"}`` with their limits; a missing error rate or p99 takes
    the model's monitoring threshold, a missing drift limit is off; ``null`` turns one off."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValidationError({"guardrails": "Give an object such as {\"error_rate_max\": 0.05}."})
    unknown = sorted(set(raw) - set(GUARDRAILS))
    if unknown:
        raise ValidationError({"guardrails": f"Unknown guardrail(s) {', '.join(unknown)}; use "
                                             f"{', '.join(GUARDRAILS)}."})
    thresholds = thresholds_for(model)
    out: dict[str, float] = {}
    for key, meta in GUARDRAILS.items():
        # Error rate and p99 default to the model's alert thresholds; drift (of inputs both sides share) only when
        # asked for.
        value = raw[key] if key in raw else (thresholds.get(meta["threshold"]) if key != "drift_psi_max" else None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0 \
                or (key == "error_rate_max" and value > 1):
            raise ValidationError({"guardrails": f"{key} is a positive number"
                                                 + (" no greater than 1" if key == "error_rate_max" else "") + "."})
        out[key] = float(value)
    return out


def clean_segment_column(raw: Any, *, model: Any, versions: list[int]) -> str:
    """The categorical input column to analyse per segment, checked against both versions' inputs and reference
    profiles: it must exist, be categorical (its reference has categories, not bins), not be personal data (stored
    encrypted, so never summed per value) and have at most ``MAX_SEGMENTS`` categories. Empty: no segments."""
    if raw is None or raw == "":
        return ""
    if not isinstance(raw, str) or len(raw) > 200:
        raise ValidationError({"segment_column": "Name one input column (a string)."})
    column = raw.strip()
    for number in versions:
        version = ModelVersion.objects.filter(model=model, number=number).first()
        columns = input_columns(version) if version is not None else []
        if column not in columns:
            shown = ", ".join(columns[:12]) + (" …" if len(columns) > 12 else "")
            raise ValidationError({"segment_column": (
                f"v{number} of {model.name} has no input column {column!r}; its inputs are: {shown or 'none named'}.")})
        if version is not None and column in set(version.sensitive_columns or {}):
            raise ValidationError({"segment_column": (
                f"{column!r} is personal data, kept encrypted in the log: it cannot be analysed per value.")})
        feature = next((f for f in version_spec(model.name, number).features if f.name == column), None)
        if feature is None:
            raise ValidationError({"segment_column": (
                f"v{number} has no reference profile for {column!r}, so its categories are unknown: register the "
                "version with reference data (POST …/versions/N/reference) first.")})
        if feature.kind != "categorical":
            raise ValidationError({"segment_column": (
                f"{column!r} is numeric in v{number}'s reference data; segments need a categorical column (such as "
                "a region or a plan).")})
        if segment_count(feature) > MAX_SEGMENTS:
            raise ValidationError({"segment_column": (
                f"{column!r} has {segment_count(feature)} categories in v{number}'s reference data; at most "
                f"{MAX_SEGMENTS} can be analysed per segment (each would need its own share of the error rate).")})
    return column


def segment_options(model: Any, state: EnvironmentState) -> list[str]:
    """The input columns the start form offers for segments: categorical in both sides' reference data, not personal,
    with few enough categories (what ``clean_segment_column`` accepts)."""
    numbers = list(Deployment.objects.filter(pk__in=[state.champion_id, state.challenger_id])
                   .values_list("version__number", flat=True))
    offered: list[str] | None = None
    for number in numbers:
        names = [f.name for f in version_spec(model.name, number).features
                 if f.kind == "categorical" and segment_count(f) <= MAX_SEGMENTS]
        offered = names if offered is None else [n for n in offered if n in names]
    return offered or []


# --- Writes -------------------------------------------------------------------------------------------------------

def experiment_start(*, model: Any, environment: str, metric: str, mde: float, actor: Any, alpha: float = 0.05,
                     traffic_percent: int | None = None, guardrails: Any = None, name: str = "",
                     segment_column: str | None = None) -> Experiment:
    """Start an experiment of the environment's champion against its canary challenger. Refuses, saying what to do:
    an unknown environment, no canary, overlapping experiments, a share outside 1-99 %, a metric without ground
    truth, nonsense numbers."""
    environment_param(environment)
    require_capability(actor, _capability(environment))
    state = _canary_state(model, environment)
    share = state.challenger_percent if traffic_percent is None else traffic_percent
    _check_numbers(metric=metric, mde=mde, alpha=alpha, traffic_percent=share)
    existing = running_experiment(model, environment)
    if existing is not None:
        raise ValidationError({"environment": (
            f"Experiment {existing.uid} already runs on {model.name} in {environment} (v{existing.champion_version} "
            f"against v{existing.challenger_version}, since {existing.started_at:%Y-%m-%d %H:%M} UTC): two at once "
            f"would share one traffic split. Stop it first (portal experiment stop {existing.uid}).")})
    guard = clean_guardrails(guardrails, model)
    planned = experiment_plan(model=model, environment=environment, metric=metric, mde=float(mde),
                              alpha=float(alpha), traffic_percent=share)
    champion: Deployment = planned["champion"]
    challenger = Deployment.objects.select_related("version").get(pk=planned["challenger_id"])
    segment = clean_segment_column(segment_column, model=model,
                                   versions=[champion.version.number, challenger.version.number])
    try:
        with transaction.atomic():
            if share != state.challenger_percent:
                canary_share_change(model=model, environment=environment, traffic_percent=share, actor=actor,
                                    reason="experiment start")
            experiment = Experiment.objects.create(
                model=model, environment=environment, name=name.strip()[:200], champion=champion,
                challenger=challenger, champion_version=champion.version.number,
                challenger_version=challenger.version.number, traffic_percent=share, metric=metric, mde=float(mde),
                alpha=float(alpha), baseline_mean=planned["baseline_mean"], baseline_sd=planned["baseline_sd"],
                tau2=planned["tau2"], planned_sample=planned["planned_sample"],
                fixed_horizon_sample=planned["fixed_horizon_sample"], guardrails=guard, segment_column=segment,
                started_by=actor if getattr(actor, "is_authenticated", False) else None,
                verdict_sentence="Just started: no outcomes counted yet.")
            audit_record(AuditAction.EXPERIMENT_START, actor=actor, target=experiment_target(experiment),
                         after=_settings(experiment))
    except IntegrityError as exc:  # a second start racing this one: the partial unique constraint holds
        raise ValidationError({"environment": f"Another experiment on {model.name} in {environment} started "
                                              "meanwhile; stop it first."}) from exc
    return experiment


def _settings(experiment: Experiment) -> dict[str, Any]:
    return {"champion_version": experiment.champion_version, "challenger_version": experiment.challenger_version,
            "traffic_percent": experiment.traffic_percent, "metric": experiment.metric, "mde": experiment.mde,
            "alpha": experiment.alpha, "guardrails": experiment.guardrails, "name": experiment.name,
            "planned_sample": experiment.planned_sample, "fixed_horizon_sample": experiment.fixed_horizon_sample,
            "baseline_mean": experiment.baseline_mean, "baseline_sd": experiment.baseline_sd,
            "tau2": experiment.tau2, "segment_column": experiment.segment_column}


def experiment_settings_change(*, experiment: Experiment, actor: Any, guardrails: Any = None,
                               name: str | None = None, traffic_percent: Any = None) -> Experiment:
    """Change what may change while it runs: the guardrails, the name and the challenger's share of traffic (the
    metric and effect are fixed: changing them would void the statistics).

    A new share is what the router gives the challenger's deployment from then on: the environment's canary split
    changes (through the deployment service, audited there as a traffic switch) in the same transaction as the
    experiment's record and its audit event, so the two never disagree. Units keep their side unless the cut moves
    past them; the sample-ratio check expects each unit on the split in force at its first request
    (``selectors.traffic_phases``), and the planned sample is recomputed for the new split (the test's mixing
    variance stays as planned: it must not depend on the data)."""
    require_capability(actor, _capability(experiment.environment))
    guard = clean_guardrails(guardrails, experiment.model) if guardrails is not None else None
    if traffic_percent is not None and (isinstance(traffic_percent, bool) or not isinstance(traffic_percent, int)
                                        or not 1 <= traffic_percent <= 99):
        raise ValidationError({"traffic_percent": (
            f"The challenger's share must be a whole percentage from 1 to 99, not {traffic_percent!r}: with 0 or "
            "100 one side gets no traffic to compare (stop the experiment to end it).")})
    with transaction.atomic():
        locked = Experiment.objects.select_for_update().select_related("model__team").get(pk=experiment.pk)
        if locked.status != ExperimentStatus.RUNNING:
            raise ValidationError({"status": "The experiment has ended; start a new one to change its settings."})
        before = _settings(locked)
        if guard is not None:
            locked.guardrails = guard
        if name is not None:
            locked.name = name.strip()[:200]
        if traffic_percent is not None and traffic_percent != locked.traffic_percent:
            state = EnvironmentState.objects.select_for_update().filter(
                model=locked.model, environment=locked.environment).first()
            if state is None or state.mode != ServingMode.CANARY or state.challenger_id != locked.challenger_id:
                raise ValidationError({"traffic_percent": (
                    f"The challenger v{locked.challenger_version} no longer serves as the canary of "
                    f"{locked.model.name} in {locked.environment}, so its share cannot change; the experiment ends "
                    "at its next analysis.")})
            canary_share_change(model=locked.model, environment=locked.environment, traffic_percent=traffic_percent,
                                actor=actor, reason=f"experiment {locked.uid}: share changed")
            locked.traffic_percent = traffic_percent
            locked.planned_sample = stats.planned_sample(
                tau2=locked.tau2, sd=locked.baseline_sd, mde=locked.mde, alpha=locked.alpha,
                share=traffic_percent / 100)
        locked.save(update_fields=["guardrails", "name", "traffic_percent", "planned_sample"])
        audit_record(AuditAction.EXPERIMENT_SETTINGS_CHANGE, actor=actor, target=experiment_target(locked),
                     before=before, after=_settings(locked))
    return locked


def experiment_stop(*, experiment: Experiment, actor: Any, reason: str = "",
                    stop_traffic: bool = False) -> Experiment:
    """End a running experiment by hand (its verdict so far is kept in the record); optionally send all traffic back
    to the champion."""
    require_capability(actor, _capability(experiment.environment))
    with transaction.atomic():
        locked = Experiment.objects.select_for_update().select_related("model__team").get(pk=experiment.pk)
        if locked.status != ExperimentStatus.RUNNING:
            raise ValidationError({"status": f"The experiment already ended ({Verdict(locked.verdict).label})."})
        analysis = experiment_analysis(locked)
        before = {"status": locked.status, "verdict": locked.verdict}
        locked.status, locked.verdict, locked.ended_at = ExperimentStatus.ENDED, Verdict.STOPPED, timezone.now()
        locked.analysis, locked.analysed_at = analysis, locked.ended_at
        locked.verdict_sentence = (f"Stopped by {actor.get_username()}"
                                   + (f" ({reason.strip()[:200]})" if reason.strip() else "")
                                   + f" before a verdict. When stopped: {analysis['proposed_sentence']}")
        locked.save()
        audit_record(AuditAction.EXPERIMENT_STOP, actor=actor, target=experiment_target(locked), before=before,
                     after={"status": locked.status, "verdict": locked.verdict, "reason": reason.strip()[:1000],
                            "stop_traffic": stop_traffic, **_summary(analysis)})
        if stop_traffic:
            try:
                challenger_stop(model=locked.model, environment=locked.environment, actor=actor,
                                reason=f"experiment {locked.uid} stopped", only_deployment=locked.challenger_id)
            except ValidationError:
                pass  # the challenger no longer serves: nothing to stop
    return locked


def _summary(analysis: dict[str, Any]) -> dict[str, Any]:
    """What the audit trail keeps of an analysis: the figures a verdict rests on."""
    arms = analysis["arms"]
    return {"difference": analysis["difference"], "interval": analysis["interval"],
            "outcomes": [arms["champion"]["outcomes"], arms["challenger"]["outcomes"]],
            "waiting": analysis["waiting"], "srm_p": analysis["srm"]["p_value"],
            "guardrails": {g["name"]: g["value"] for g in analysis["guardrails"]}}


def _next_environment(environment: str) -> str | None:
    order = [str(e) for e in ENVIRONMENT_ORDER]
    i = order.index(environment)
    return order[i + 1] if i + 1 < len(order) else None


def experiment_evaluate(*, experiment_id: int, now: dt.datetime | None = None) -> Experiment | None:
    """Analyse one running experiment and act on its verdict (beat, through ``experiments_check``). The row is
    locked so two workers never act twice on one verdict; the verdict change, its consequences in the database and
    their audit events commit together."""
    with transaction.atomic():
        experiment = (Experiment.objects.select_for_update(skip_locked=True, of=("self",))
                      .select_related("model__team", "started_by").filter(pk=experiment_id,
                                                                          status=ExperimentStatus.RUNNING).first())
        if experiment is None:
            return None
        state = EnvironmentState.objects.filter(model=experiment.model, environment=experiment.environment).first()
        analysis = experiment_analysis(experiment, now=now)
        verdict, sentence = analysis["proposed_verdict"], analysis["proposed_sentence"]
        if verdict != Verdict.GUARDRAIL and (state is None or state.challenger_id != experiment.challenger_id):
            verdict, sentence = Verdict.STOPPED, ("Ended without a verdict: the challenger stopped serving "
                                                  "(its traffic was changed outside the experiment). When it "
                                                  f"stopped: {analysis['proposed_sentence']}")
        before = {"verdict": experiment.verdict, "status": experiment.status}
        experiment.analysis = {k: v for k, v in analysis.items() if k not in ("proposed_verdict",
                                                                             "proposed_sentence")}
        experiment.analysed_at = timezone.now()
        experiment.verdict_sentence = sentence
        changed = verdict != experiment.verdict
        experiment.verdict = verdict
        if verdict in (*TERMINAL, Verdict.STOPPED):
            experiment.status, experiment.ended_at = ExperimentStatus.ENDED, experiment.analysed_at
        experiment.save()
        if not changed:
            return experiment
        target = experiment_target(experiment)
        if verdict == Verdict.GUARDRAIL:
            breached = [g for g in analysis["guardrails"] if g["status"] == "breach"]
            audit_record(AuditAction.EXPERIMENT_GUARDRAIL_BREACH, actor=None, target=target,
                         outcome=AuditOutcome.FAILURE,
                         after={"guardrails": breached, "challenger_version": experiment.challenger_version})
        audit_record(AuditAction.EXPERIMENT_VERDICT, actor=None, target=target, before=before,
                     after={"verdict": verdict, "status": experiment.status, "sentence": sentence,
                            **_summary(analysis)})
        if verdict in (Verdict.GUARDRAIL, Verdict.CHAMPION_HOLDS):
            try:
                challenger_stop(model=experiment.model, environment=experiment.environment, actor=None, system=True,
                                reason=f"experiment {experiment.uid}: {Verdict(verdict).label.lower()}",
                                only_deployment=experiment.challenger_id)
            except ValidationError:
                logger.warning("Experiment %s: the challenger had already stopped", experiment.uid)
        if verdict == Verdict.CHALLENGER_WINS:
            _open_promotion(experiment)
        if verdict in TERMINAL:
            _notify(experiment)
    return experiment


def _open_promotion(experiment: Experiment) -> None:
    """A win asks for promotion of the challenger to the next environment, on behalf of whoever started the
    experiment, with the experiment attached. A refusal (an open request already, a gate) is kept in the analysis
    for the page, never raised: the verdict stands."""
    target = _next_environment(experiment.environment)
    if target is None or experiment.started_by is None:
        experiment.analysis["promotion_note"] = ("No promotion opened: prod is the last environment."
                                                 if target is None else "No promotion opened: its starter is gone.")
        experiment.save(update_fields=["analysis"])
        return
    try:
        with transaction.atomic():
            promotion = promotion_request(
                version=experiment.challenger.version, target=target, actor=experiment.started_by,
                reason=f"A/B experiment {experiment.uid} in {experiment.environment}: {experiment.verdict_sentence}")
    except (ValidationError, PermissionDenied) as exc:
        text = "; ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
        experiment.analysis["promotion_note"] = f"No promotion opened: {text}"
        experiment.save(update_fields=["analysis"])
        return
    experiment.promotion = promotion
    experiment.save(update_fields=["promotion"])


def _recipients(experiment: Experiment) -> list[str]:
    users = get_user_model().objects.filter(
        Q(groups__permissions__codename__in=("deploy_dev", "approve_promotion")) | Q(is_superuser=True),
        is_active=True, memberships__team=experiment.model.team).exclude(email="").distinct()
    return sorted({u.email for u in users})


def _notify(experiment: Experiment) -> None:
    link = settings.PORTAL_BASE_URL + reverse("monitoring:experiment", args=[experiment.uid])
    what = (f"{experiment.model.name} in {experiment.environment}: v{experiment.champion_version} against "
            f"v{experiment.challenger_version}")
    label = Verdict(experiment.verdict).label
    recipients = _recipients(experiment)
    if recipients:
        subject, body = f"Experiment {label.lower()}: {what}", f"{experiment.verdict_sentence}\n\n{link}\n"
        transaction.on_commit(lambda: send_email_task.delay(subject, body, recipients))
    webhooks_notify(team=experiment.model.team, event="experiment.verdict", payload={
        "event": "experiment.verdict", "experiment": str(experiment.uid), "model": experiment.model.name,
        "environment": experiment.environment, "verdict": experiment.verdict, "sentence": experiment.verdict_sentence,
        "champion_version": experiment.champion_version, "challenger_version": experiment.challenger_version,
        "promotion": str(experiment.promotion.uid) if experiment.promotion else None, "url": link})


def experiments_check(*, now: dt.datetime | None = None) -> dict[str, int]:
    """Evaluate every running experiment (beat, every ``PORTAL_EXPERIMENT_SECONDS``); one that fails is logged and
    left for the next run, never stopping the others."""
    done = failed = 0
    for pk in list(Experiment.objects.filter(status=ExperimentStatus.RUNNING).values_list("pk", flat=True)):
        try:
            experiment_evaluate(experiment_id=pk, now=now)
            done += 1
        except Exception:
            logger.exception("Evaluating experiment %s failed", pk)
            failed += 1
    return {"evaluated": done, "failed": failed}
