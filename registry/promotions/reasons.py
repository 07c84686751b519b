"""Does the request's reason agree with the figures? The reason is free text, so this reads only what it can read
honestly: direction words ("higher", "better", "lower", "worse", ...) and the metric names next to them, compared
with the sign of each metric's change against the baseline. A claim it cannot pin to a figure is left alone; the
figures are shown either way, so an approver reads them rather than the verdict."""

from __future__ import annotations

import re
from typing import Any

# Literal direction: the number went up or down. Judged on the raw delta when a metric is named.
UP = ("higher", "increase", "increased", "increases", "up", "more", "raises", "raised", "gains", "gained", "rises")
DOWN = ("lower", "decrease", "decreased", "decreases", "down", "less", "fewer", "drops", "dropped", "reduced",
        "reduces", "falls")
# Evaluative: the model got better or worse, whatever the metric's direction.
BETTER = ("better", "improves", "improved", "improvement", "beats", "outperforms", "stronger", "best")
WORSE = ("worse", "regresses", "regressed", "regression", "weaker", "degrades", "degraded")
NEGATIONS = ("not", "no", "never", "isn't", "isnt", "doesn't", "doesnt", "without")
_WORD = re.compile(r"[a-z0-9_']+")
_CLAUSE = re.compile(r"[.;!?\n]|,\s*(?:but|while|although)\b")


def _improvement(row: dict[str, Any]) -> float:
    delta = float(row["delta"])
    return -delta if row["direction"] == "lower is better" else delta


def _mentions(clause: str, name: str) -> bool:
    parts = [p for p in re.split(r"[_\-\s]+", name.lower()) if p]
    return bool(parts) and re.search(r"\b" + r"[_\-\s]*".join(map(re.escape, parts)) + r"\b", clause) is not None


def reason_check(reason: str, metric_rows: list[dict[str, Any]], *, baseline: str) -> dict[str, Any]:
    """``claims`` found in ``reason`` (each: the words, the metric or None, what it claims, whether the figures
    agree) and ``contradictions`` (sentences for the page). ``metric_rows`` are ``compare.metric_diff``'s rows
    against ``baseline`` (a label such as "v1 (serves dev)")."""
    compared = [r for r in metric_rows if r.get("delta") is not None]
    claims: list[dict[str, Any]] = []
    for clause in _CLAUSE.split(reason.lower()):
        words = _WORD.findall(clause)
        for i, word in enumerate(words):
            kind = ("up" if word in UP else "down" if word in DOWN else "better" if word in BETTER else
                    "worse" if word in WORSE else None)
            if kind is None or (i and words[i - 1] in NEGATIONS) or (i > 1 and words[i - 2] in NEGATIONS):
                continue
            named = [r for r in compared if _mentions(clause, r["name"])]
            if named:
                for row in named:
                    if kind in ("up", "down"):
                        agrees = row["delta"] > 0 if kind == "up" else row["delta"] < 0
                    else:
                        agrees = _improvement(row) > 0 if kind == "better" else _improvement(row) < 0
                    if row["delta"] == 0:
                        agrees = False
                    claims.append({"words": word, "metric": row["name"], "claims": kind, "agrees": agrees,
                                   "candidate": row["candidate"], "baseline": row["champion"],
                                   "delta": row["delta"]})
            elif compared and kind in ("up", "better", "worse"):
                # "scores higher", "better model": a claim about the model as a whole, judged on every figure.
                improving = [r for r in compared if _improvement(r) > 0]
                agrees = bool(improving) if kind != "worse" else len(improving) < len(compared)
                claims.append({"words": word, "metric": None, "claims": "better" if kind == "up" else kind,
                               "agrees": agrees, "candidate": None, "baseline": None, "delta": None})
    contradictions = []
    for claim in claims:
        if claim["agrees"]:
            continue
        if claim["metric"] is not None:
            said = {"up": "went up", "down": "went down", "better": "improved", "worse": "got worse"}[claim["claims"]]
            contradictions.append(
                f"The reason says {claim['metric']} {said} (“{claim['words']}”), but it is {claim['candidate']:.4g} "
                f"against {claim['baseline']:.4g} for {baseline} (Δ {claim['delta']:+.4g}).")
        else:
            figures = ", ".join(f"{r['name']} {r['candidate']:.4g} vs {r['champion']:.4g}" for r in compared)
            said = "better" if claim["claims"] == "better" else "worse"
            contradictions.append(f"The reason says the model does {said} (“{claim['words']}”), but against "
                                  f"{baseline} the figures say otherwise: {figures}.")
    return {"claims": claims, "contradictions": list(dict.fromkeys(contradictions)), "baseline": baseline,
            "compared": len(compared)}
