"""What an experiment's page, API, promotion panel and stop rule read: its analysis, from the rollups only.

Per arm and time bucket the rollups hold the sufficient statistics of each metric (n, sum, sum of squares: see
``monitoring.rollups.outcome_sums``), the requests assigned and the errors, so an experiment over a billion
predictions costs what one over a thousand does: the buckets since it started (minutes up to the first whole hour
and after the last, hours between). Only predictions whose outcome is known count; the rest are reported as waiting.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
from django.db.models import Count, Q, QuerySet
from django.db.models.fields.json import KeyTransform
from django.utils import timezone

from monitoring.experiments import stats
from monitoring.experiments.models import Experiment, ExperimentStatus, ExperimentUnit, Metric, Verdict
from monitoring.models import Granularity, Rollup
from monitoring.rollups import MISSING, OTHER, minute_of, version_spec
from monitoring.selectors import _latency, _merge, drift_report, thresholds_for
from portal.permissions import get_object_for_user, scope_to_teams
from registry.models import ServingInterval

ARMS = ("champion", "challenger")
ROLE_OF = {"champion": "champion", "challenger": "canary"}
MAX_SERIES_POINTS = 400
MIN_ROWS_FOR_RATES = 20  # as the promotion evidence: an error rate or p99 is judged from 20 predictions

GUARDRAILS: dict[str, dict[str, Any]] = {
    "error_rate_max": {"label": "Error rate", "threshold": "error_rate_max", "fmt": lambda v: f"{v:.2%}"},
    "latency_p99_ms": {"label": "Latency p99", "threshold": "latency_p99_ms", "fmt": lambda v: f"{v:.1f} ms"},
    "drift_psi_max": {"label": "Worst drift (PSI)", "threshold": "psi_alert", "fmt": lambda v: f"{v:.3f}"},
}


def experiments_for(*, user: Any) -> QuerySet[Experiment]:
    return scope_to_teams(Experiment.objects.select_related("model__team", "promotion"), user)


def experiment_get(*, user: Any, uid: Any, action: str = "view_monitoring") -> Experiment:
    return get_object_for_user(user, experiments_for(user=user), action=action, uid=uid)


def running_experiment(model: Any, environment: str) -> Experiment | None:
    return Experiment.objects.filter(model=model, environment=environment, status=ExperimentStatus.RUNNING).first()


def metric_sums(truth: dict[str, Any] | None, metric: str) -> tuple[float, float, float]:
    """(n, sum, sum of squares) of ``metric``'s per-prediction values in one rollup's ``truth``."""
    if not truth:
        return 0.0, 0.0, 0.0
    if metric == Metric.ACCURACY:
        n, correct = float(truth.get("n") or 0), float(truth.get("correct") or 0)
        return n, correct, correct
    if metric == Metric.MAE:
        reg = truth.get("reg") or [0, 0.0, 0.0]
        return float(reg[0]), float(reg[1]), float(reg[2])
    key = "logloss" if metric == Metric.LOG_LOSS else "outcome"
    sums = truth.get(key) or [0, 0.0, 0.0]
    return float(sums[0]), float(sums[1]), float(sums[2])


def metric_display(metric: str, value: float | None, *, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if metric == Metric.ACCURACY:
        return f"{value * 100:+.1f} points" if signed else f"{value:.1%}"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def counted_from(experiment: Experiment) -> dt.datetime:
    """The first whole minute after the start: rollups are by minute, and the start's own minute holds predictions
    made before it (of the champion alone, or of a canary's earlier split). Dropping it drops both sides alike."""
    start = experiment.started_at.astimezone(dt.UTC)
    return minute_of(start) + (dt.timedelta(minutes=1) if start != minute_of(start) else dt.timedelta(0))


def _spans(start: dt.datetime, end: dt.datetime) -> list[tuple[str, dt.datetime, dt.datetime]]:
    """Minutes up to the first whole hour, hours between, minutes after the last whole hour."""
    first_hour = start if start.minute == 0 else start.replace(minute=0) + dt.timedelta(hours=1)
    last_hour = end.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    if first_hour >= last_hour:
        return [(Granularity.MINUTE, start, end)]
    return [(Granularity.MINUTE, start, first_hour), (Granularity.HOUR, first_hour, last_hour),
            (Granularity.MINUTE, last_hour, end)]


def arm_buckets(experiment: Experiment, end: dt.datetime) -> tuple[list[dt.datetime], dict[str, np.ndarray]]:
    """Bucket starts in time order and, per arm, a matrix with one row per bucket: predictions, errors, labelled,
    requests, n, sum, sum of squares."""
    versions = {"champion": experiment.champion_version, "challenger": experiment.challenger_version}
    rows: list[tuple[Any, ...]] = []
    for granularity, start, stop in _spans(counted_from(experiment), end):
        if start >= stop:
            continue
        rows.extend(Rollup.objects.filter(
            model_name=experiment.model.name, environment=experiment.environment, granularity=granularity,
            start__gte=start, start__lt=stop, role__in=list(ROLE_OF.values()),
            version__in=list(set(versions.values()))).values_list(
            "start", "version", "role", "count", "errors", "labelled", "data__truth", "data__requests"))
    times = sorted({r[0] for r in rows})
    index = {t: i for i, t in enumerate(times)}
    matrices = {arm: np.zeros((len(times), 7)) for arm in ARMS}
    for start, version, role, count, errors, labelled, truth, requests in rows:
        arm = next((a for a in ARMS if ROLE_OF[a] == role and versions[a] == version), None)
        if arm is None:
            continue
        n, total, squares = metric_sums(truth, experiment.metric)
        matrices[arm][index[start]] += (count, errors, labelled, requests if requests is not None else count,
                                        n, total, squares)
    return times, matrices


def traffic_phases(experiment: Experiment, end: dt.datetime) -> list[tuple[dt.datetime, dt.datetime, float]]:
    """The challenger's share of traffic over the experiment, as ``(from, to, share)``: what the router really did,
    read from the challenger's serving intervals (a change of share starts a new one), else the configured share."""
    start = experiment.started_at
    rows = (ServingInterval.objects.filter(deployment_id=experiment.challenger_id, role="canary", started_at__lt=end)
            .filter(Q(ended_at__isnull=True) | Q(ended_at__gt=start)).order_by("started_at")
            .values_list("started_at", "ended_at", "traffic_percent"))
    phases = []
    for began, ended, percent in rows:
        lower, upper = max(began, start), min(ended or end, end)
        if lower < upper:
            phases.append((lower, upper, percent / 100))
    return phases or [(start, end, experiment.traffic_percent / 100)]


def _ceil_minute(ts: dt.datetime) -> dt.datetime:
    floor = minute_of(ts.astimezone(dt.UTC))
    return floor if floor == ts else floor + dt.timedelta(minutes=1)


def assignment_check(experiment: Experiment, end: dt.datetime) -> dict[str, Any]:
    """The sample-ratio check on units, not requests: keyed units (routing keys, subjects) each once, in the arm and
    split of their first request (``monitoring.experiments.units``), and requests without a key from the rollups
    (each its own unit). Every unit is expected on the challenger's side with its split's share; a minute in which
    the split changed holds both splits, so its keyless requests are left out (as the start's own minute is)."""
    phases = traffic_phases(experiment, end)
    observed = {"champion": 0.0, "challenger": 0.0}
    expected_challenger = 0.0
    keyed = [0, 0]
    anonymous = [0, 0]
    aggregates: dict[str, Any] = {}
    for i, (lower, upper, _share) in enumerate(phases):
        for arm in ARMS:
            aggregates[f"p{i}_{arm}"] = Count("pk", filter=Q(arm=arm, first_seen__gte=lower, first_seen__lt=upper))
    counts = ExperimentUnit.objects.filter(experiment=experiment).aggregate(**aggregates)
    versions = {"champion": experiment.champion_version, "challenger": experiment.challenger_version}
    for i, (lower, upper, share) in enumerate(phases):
        phase_total = 0.0
        for j, arm in enumerate(ARMS):
            n = int(counts[f"p{i}_{arm}"] or 0)
            observed[arm] += n
            keyed[j] += n
            phase_total += n
        first = counted_from(experiment) if i == 0 else _ceil_minute(lower)
        last = minute_of(upper.astimezone(dt.UTC)) if i < len(phases) - 1 else end
        for granularity, span_start, span_end in (_spans(first, last) if first < last else []):
            if span_start >= span_end:
                continue
            rows = Rollup.objects.filter(
                model_name=experiment.model.name, environment=experiment.environment, granularity=granularity,
                start__gte=span_start, start__lt=span_end, role__in=list(ROLE_OF.values()),
                version__in=list(set(versions.values()))).values_list("version", "role", "count",
                                                                      "data__anonymous", "data__requests")
            for version, role, count, anon, requests in rows:
                side = next((a for a in ARMS if ROLE_OF[a] == role and versions[a] == version), None)
                if side is None:
                    continue
                # A bucket rolled up before units were logged holds only keyless requests.
                n = anon if anon is not None else (requests if requests is not None else count)
                observed[side] += n
                anonymous[ARMS.index(side)] += n
                phase_total += n
        expected_challenger += phase_total * share
    total = observed["champion"] + observed["challenger"]
    units = [int(observed["champion"]), int(observed["challenger"])]
    p_value = stats.srm_p_value_expected(units, [total - expected_challenger, expected_challenger])
    return {"p_value": p_value, "mismatch": p_value < stats.SRM_P,
            "expected_share": expected_challenger / total if total else phases[-1][2],
            "observed_share": units[1] / total if total else None, "units": units, "keyed_units": keyed,
            "anonymous_requests": anonymous,
            "splits": [{"from": lo.isoformat(), "to": hi.isoformat(), "share": share} for lo, hi, share in phases]}


def guardrail_report(experiment: Experiment, now: dt.datetime) -> list[dict[str, Any]]:
    """Each guardrail of the challenger over the model's alert window (or since the start, when shorter)."""
    thresholds = thresholds_for(experiment.model)
    window = dt.timedelta(minutes=int(thresholds.get("window_minutes") or 60))
    start = max(counted_from(experiment), minute_of(now - window))
    rows = list(Rollup.objects.filter(model_name=experiment.model.name, environment=experiment.environment,
                                      granularity=Granularity.MINUTE, start__gte=start, start__lt=now,
                                      role="canary", version=experiment.challenger_version))
    merged = _merge(rows)
    count, data = merged["count"], merged["data"]
    figures: dict[str, float | None] = {
        "error_rate_max": merged["errors"] / count if count >= MIN_ROWS_FOR_RATES else None,
        "latency_p99_ms": _latency(data)["p99"] if count >= MIN_ROWS_FOR_RATES else None,
        "drift_psi_max": None,
    }
    if "drift_psi_max" in experiment.guardrails:
        spec = version_spec(experiment.model.name, experiment.challenger_version)
        if spec.features:
            figures["drift_psi_max"] = drift_report(spec, data, thresholds)["drift"]["worst"]
    report = []
    for key, meta in GUARDRAILS.items():
        limit = experiment.guardrails.get(key)
        if limit is None:
            continue
        value = figures[key]
        status = "insufficient" if value is None else ("breach" if value > float(limit) else "pass")
        report.append({"name": key, "label": meta["label"], "limit": float(limit), "value": value,
                       "display": meta["fmt"](value) if value is not None else "—",
                       "limit_display": "≤ " + meta["fmt"](float(limit)), "status": status,
                       "window": f"from {start:%H:%M} to {now:%H:%M} UTC", "predictions": count})
    return report


def _thin(values: list[Any]) -> list[Any]:
    if len(values) <= MAX_SERIES_POINTS:
        return values
    step = math.ceil(len(values) / MAX_SERIES_POINTS)
    return values[::step] + ([values[-1]] if (len(values) - 1) % step else [])


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def experiment_analysis(experiment: Experiment, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """The experiment as it stands: per arm counts and means, the difference with its always-valid interval over
    time, the sample-ratio check, the guardrails and the verdict they lead to, in one sentence."""
    end = now or timezone.now()
    if experiment.status == ExperimentStatus.ENDED and experiment.ended_at is not None:
        end = min(end, experiment.ended_at + dt.timedelta(minutes=1))
    times, m = arm_buckets(experiment, end)
    cum = {arm: np.cumsum(m[arm], axis=0) if len(times) else np.zeros((0, 7)) for arm in ARMS}
    a, b = cum["champion"], cum["challenger"]
    series: dict[str, list[Any]] = {"t": [], "difference": [], "low": [], "high": [], "n_champion": [],
                                    "n_challenger": []}
    low = high = math.nan
    significant = False
    if len(times):
        sig, lows, highs = stats.msprt_arrays(a[:, 4], a[:, 5], a[:, 6], b[:, 4], b[:, 5], b[:, 6],
                                              tau2=experiment.tau2, alpha=experiment.alpha)
        with np.errstate(divide="ignore", invalid="ignore"):
            diffs = b[:, 5] / b[:, 4] - a[:, 5] / a[:, 4]
        run_low, run_high = np.maximum.accumulate(lows), np.minimum.accumulate(highs)
        significant = bool(sig.any())
        low, high = float(run_low[-1]), float(run_high[-1])
        shown = [i for i in range(len(times)) if math.isfinite(run_low[i]) and math.isfinite(run_high[i])]
        shown = _thin(shown)
        series = {"t": [times[i].isoformat() for i in shown],
                  "difference": [_finite(diffs[i]) for i in shown],
                  "low": [_finite(run_low[i]) for i in shown], "high": [_finite(run_high[i]) for i in shown],
                  "n_champion": [int(a[i, 4]) for i in shown], "n_challenger": [int(b[i, 4]) for i in shown]}

    last = {arm: (cum[arm][-1] if len(times) else np.zeros(7)) for arm in ARMS}
    arms: dict[str, Any] = {}
    for arm in ARMS:
        predictions, errors, labelled, requests, n, total, _sq = (float(x) for x in last[arm])
        mean = total / n if n else None
        arms[arm] = {"version": experiment.champion_version if arm == "champion" else experiment.challenger_version,
                     "predictions": int(predictions), "errors": int(errors), "requests": int(requests),
                     "labelled": int(labelled), "outcomes": int(n),
                     "waiting": max(0, int(predictions - errors - labelled)),
                     "mean": mean, "mean_display": metric_display(experiment.metric, mean)}
    difference = (arms["challenger"]["mean"] - arms["champion"]["mean"]
                  if arms["challenger"]["mean"] is not None and arms["champion"]["mean"] is not None else None)
    srm = assignment_check(experiment, end)
    srm["requests"] = [arms["champion"]["requests"], arms["challenger"]["requests"]]
    guardrails = guardrail_report(experiment, end) if experiment.status == ExperimentStatus.RUNNING else \
        (experiment.analysis or {}).get("guardrails", [])
    smaller = min(arms["champion"]["outcomes"], arms["challenger"]["outcomes"])
    analysis = {
        "as_of": end.isoformat(), "metric": experiment.metric,
        "metric_label": Metric(experiment.metric).label, "higher_is_better": experiment.higher_is_better,
        "alpha": experiment.alpha, "level": 1 - experiment.alpha, "mde": experiment.mde, "planned_sample": experiment.planned_sample,
        "fixed_horizon_sample": experiment.fixed_horizon_sample,
        "progress": min(1.0, smaller / experiment.planned_sample) if experiment.planned_sample else None,
        "arms": arms, "difference": difference,
        "difference_display": metric_display(experiment.metric, difference, signed=True),
        "interval": [_finite(low), _finite(high)] if len(times) else [None, None],
        "interval_display": (f"{metric_display(experiment.metric, low, signed=True)} to "
                             f"{metric_display(experiment.metric, high, signed=True)}")
        if len(times) and math.isfinite(low) and math.isfinite(high) else "not yet (too few outcomes)",
        "significant": significant, "srm": srm, "guardrails": guardrails, "series": series,
        "waiting": arms["champion"]["waiting"] + arms["challenger"]["waiting"],
    }
    if experiment.segment_column:
        analysis["segments"] = segment_analysis(experiment, end)
    verdict, sentence = proposed_verdict(experiment, analysis)
    analysis["proposed_verdict"], analysis["proposed_sentence"] = verdict, sentence
    return analysis


def proposed_verdict(experiment: Experiment, analysis: dict[str, Any]) -> tuple[str, str]:
    """What the numbers say now, as a verdict and one sentence a non-statistician can act on."""
    arms, metric = analysis["arms"], experiment.metric
    champ, chall = arms["champion"], arms["challenger"]
    counts = (f"on {champ['outcomes']:,} and {chall['outcomes']:,} predictions with a known outcome"
              + (f" ({analysis['waiting']:,} more wait for theirs)" if analysis["waiting"] else ""))
    level = f"{1 - experiment.alpha:.0%}"
    breached = [g for g in analysis["guardrails"] if g["status"] == "breach"]
    if breached:
        g = breached[0]
        return Verdict.GUARDRAIL, (f"Stopped by a guardrail: the challenger v{chall['version']}'s "
                                   f"{g['label'].lower()} reached {g['display']} (limit {g['limit_display']}) "
                                   f"{g['window']}, so its traffic was stopped.")
    srm = analysis["srm"]
    if srm["mismatch"]:
        return Verdict.INVALID, (f"Invalid: the challenger was assigned {srm['observed_share']:.1%} of "
                                 f"{sum(srm['units']):,} users (routing keys, subjects or keyless requests) where "
                                 f"{srm['expected_share']:.0%} was set (sample-ratio mismatch, p = "
                                 f"{srm['p_value']:.2g}). Assignment or logging is broken, so no verdict can be "
                                 f"trusted; fix it and start a new experiment.")
    names = f"{Metric(metric).label.split(' (')[0].lower()}"
    means = f"{chall['mean_display']} against the champion v{champ['version']}'s {champ['mean_display']}"
    interval = f"{analysis['difference_display']} ({level} interval {analysis['interval_display']})"
    if analysis["significant"]:
        better = (analysis["difference"] or 0) > 0
        if not experiment.higher_is_better:
            better = not better
        if better:
            return Verdict.CHALLENGER_WINS, (f"The challenger v{chall['version']} wins: its {names} is {means}, a "
                                             f"difference of {interval}, {counts}.")
        return Verdict.CHAMPION_HOLDS, (f"The champion holds: the challenger v{chall['version']}'s {names} is "
                                        f"{means}, worse by {interval}, {counts}.")
    smaller = min(champ["outcomes"], chall["outcomes"])
    if smaller >= experiment.planned_sample:
        return Verdict.NO_DIFFERENCE, (
            f"No difference at this size: after the planned {experiment.planned_sample:,} outcomes per side the "
            f"{names} differs by {interval}, which includes zero; a difference of "
            f"{metric_display(metric, experiment.mde, signed=True).lstrip('+')} would have been found 8 times in 10.")
    return Verdict.RUNNING, (
        f"Too early to tell: so far the difference in {names} is {interval}, {counts}; "
        f"{smaller:,} of the planned {experiment.planned_sample:,} per side. Looking every day does not spoil "
        "the result.")


def segment_sums(experiment: Experiment, end: dt.datetime) -> dict[str, dict[str, list[float]]]:
    """Per category of the experiment's segment column and per arm: (n, sum, sum of squares) of the metric, from the
    rollups' per-segment sums (``monitoring.rollups.summarise``) over the buckets the analysis reads."""
    versions = {"champion": experiment.champion_version, "challenger": experiment.challenger_version}
    path = KeyTransform(experiment.segment_column, KeyTransform("segments", KeyTransform("truth", "data")))
    out: dict[str, dict[str, list[float]]] = {}
    for granularity, start, stop in _spans(counted_from(experiment), end):
        if start >= stop:
            continue
        rows = (Rollup.objects.filter(
            model_name=experiment.model.name, environment=experiment.environment, granularity=granularity,
            start__gte=start, start__lt=stop, role__in=list(ROLE_OF.values()),
            version__in=list(set(versions.values()))).annotate(segments=path)
            .values_list("version", "role", "segments"))
        for version, role, segments in rows:
            arm = next((a for a in ARMS if ROLE_OF[a] == role and versions[a] == version), None)
            if arm is None or not isinstance(segments, dict):
                continue
            for category, truth in segments.items():
                sums = out.setdefault(category, {a: [0.0, 0.0, 0.0] for a in ARMS})[arm]
                n, total, squares = metric_sums(truth, experiment.metric)
                sums[0] += n
                sums[1] += total
                sums[2] += squares
    return out


def segment_label(category: str) -> str:
    return {OTHER: "(any other value)", MISSING: "(missing)"}.get(category, category)


def segment_analysis(experiment: Experiment, end: dt.datetime) -> dict[str, Any]:
    """Per segment of the experiment's categorical column: outcomes and means per arm, the difference, its interval
    and what it means, each at a Bonferroni-corrected level over the segments (the column's reference categories
    and any other value seen), so that together they keep the experiment's error rate however often one looks."""
    sums = segment_sums(experiment, end)
    spec = version_spec(experiment.model.name, experiment.challenger_version)
    feature = next((f for f in spec.features if f.name == experiment.segment_column), None)
    known = sorted(feature.categories) if feature is not None else []
    names = sorted(set(known) | set(sums), key=lambda c: (c in (OTHER, MISSING), c))
    k = max(1, len(names))
    alpha_each = experiment.alpha / k
    level = 1 - alpha_each
    empty = {a: [0.0, 0.0, 0.0] for a in ARMS}
    table = np.array([[sums.get(c, empty)[a] for a in ARMS] for c in names], dtype="float64").reshape(k if names
                                                                                                      else 0, 2, 3)
    rows: list[dict[str, Any]] = []
    sig, lows, highs = np.zeros(0, dtype=bool), np.zeros(0), np.zeros(0)
    if names:
        sig, lows, highs = stats.segment_msprt(table[:, 0, 0], table[:, 0, 1], table[:, 0, 2], table[:, 1, 0],
                                               table[:, 1, 1], table[:, 1, 2], tau2=experiment.tau2,
                                               alpha=experiment.alpha, segments=k)
    metric, version = experiment.metric, experiment.challenger_version
    for i, category in enumerate(names):
        (n_a, s_a, _q_a), (n_b, s_b, _q_b) = table[i, 0], table[i, 1]
        mean_a = s_a / n_a if n_a else None
        mean_b = s_b / n_b if n_b else None
        difference = mean_b - mean_a if mean_a is not None and mean_b is not None else None
        low, high = float(lows[i]), float(highs[i])
        enough = math.isfinite(low) and math.isfinite(high)
        if not enough:
            verdict, sentence = "insufficient", (f"Too few outcomes to tell ({int(n_a)} and {int(n_b)}; "
                                                 f"{stats.MIN_PER_ARM} per side are needed).")
        elif bool(sig[i]):
            better = (difference or 0) > 0
            if not experiment.higher_is_better:
                better = not better
            verdict = "challenger_better" if better else "champion_better"
            sentence = (f"v{version} is {'better' if better else 'worse'} in this segment: "
                        f"{metric_display(metric, difference, signed=True)} ({level:.1%} interval "
                        f"{metric_display(metric, low, signed=True)} to {metric_display(metric, high, signed=True)}).")
        else:
            verdict, sentence = "no_clear_difference", (
                f"No clear difference here yet: {metric_display(metric, difference, signed=True)} ({level:.1%} "
                f"interval {metric_display(metric, low, signed=True)} to {metric_display(metric, high, signed=True)}"
                ", which includes zero).")
        rows.append({"segment": category, "label": segment_label(category),
                     "champion": {"outcomes": int(n_a), "mean": mean_a,
                                  "mean_display": metric_display(metric, mean_a)},
                     "challenger": {"outcomes": int(n_b), "mean": mean_b,
                                    "mean_display": metric_display(metric, mean_b)},
                     "difference": difference, "difference_display": metric_display(metric, difference, signed=True),
                     "interval": [_finite(low), _finite(high)], "significant": bool(sig[i]) if enough else False,
                     "verdict": verdict, "sentence": sentence})
    return {"column": experiment.segment_column, "segments": k, "alpha_each": alpha_each, "level": level,
            "caveat": (f"Each of the {k} segments is judged at the {level:.2%} level (Bonferroni: "
                       f"{experiment.alpha:g} shared over {k}), so that all of them together are wrong less than "
                       f"{experiment.alpha:.0%} of the time however often you look. A segment that differs is a lead "
                       "to confirm with its own experiment; the verdict above rests on all traffic."),
            "rows": rows}


def experiment_json(experiment: Experiment) -> dict[str, Any]:
    analysis = experiment.analysis or {}
    return {
        "id": str(experiment.uid), "model": experiment.model.name, "environment": experiment.environment,
        "name": experiment.name, "status": experiment.status, "verdict": experiment.verdict,
        "verdict_label": Verdict(experiment.verdict).label, "sentence": experiment.verdict_sentence,
        "champion_version": experiment.champion_version, "challenger_version": experiment.challenger_version,
        "traffic_percent": experiment.traffic_percent, "metric": experiment.metric, "mde": experiment.mde,
        "alpha": experiment.alpha, "baseline_mean": experiment.baseline_mean, "baseline_sd": experiment.baseline_sd,
        "planned_sample": experiment.planned_sample, "fixed_horizon_sample": experiment.fixed_horizon_sample,
        "guardrails": experiment.guardrails, "segment_column": experiment.segment_column or None,
        "started_by": experiment.started_by.get_username() if experiment.started_by else None,
        "started_at": experiment.started_at.isoformat(),
        "ended_at": experiment.ended_at.isoformat() if experiment.ended_at else None,
        "analysed_at": experiment.analysed_at.isoformat() if experiment.analysed_at else None,
        "promotion": str(experiment.promotion.uid) if experiment.promotion else None,
        "analysis": {k: v for k, v in analysis.items() if k not in ("proposed_verdict", "proposed_sentence")},
    }
