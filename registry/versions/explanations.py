"""What the pages show of a version's SHAP global importance (computed in the sandbox once the scan made the version ready, stored on
``ModelVersion.explanation``): its top features, and a champion against a candidate in words."""

from __future__ import annotations

from typing import Any

from registry.models import ModelVersion

TOP_FEATURES = 15
LEANS_RATIO = 1.5  # a feature whose share of attribution moved by this factor either way is named in words
MIN_SHARE = 0.02  # ...when it carries at least this share in one of the two versions


def importance(version: ModelVersion | None, top: int = TOP_FEATURES) -> dict[str, Any] | None:
    """The version's global importance for a page: method, approximate, cost, what output it explains, and its
    top features by mean |SHAP| (share of the total); {"error": why} when none could be computed; None before
    the scan (or for no version)."""
    if version is None or not version.explanation:
        return None
    data = version.explanation
    if data.get("pending"):
        return {"pending": True}
    if data.get("error"):
        return {"error": str(data["error"])}
    features = sorted(data.get("features") or [], key=lambda f: -float(f.get("mean_abs") or 0))
    return {"method": data.get("method", ""), "approximate": bool(data.get("approximate")),
            "output": data.get("output", ""), "cost": data.get("cost") or {}, "note": data.get("note", ""),
            "features": features[:top], "feature_count": len(features),
            "chart": {"series": [{"name": f"v{version.number}",
                                  "values": [round(float(f["share"]), 6) for f in features[:top]]}],
                      "features": [str(f["name"]) for f in features[:top]]}}


def _shares(version: ModelVersion | None) -> dict[str, float]:
    if version is None or not version.explanation or version.explanation.get("error") \
            or version.explanation.get("pending"):
        return {}
    return {str(f["name"]): float(f.get("share") or 0) for f in version.explanation.get("features") or []}


def comparison(champion: ModelVersion | None, candidate: ModelVersion, top: int = TOP_FEATURES, *,
               names: tuple[str, str] = ("the champion", "the candidate")) -> dict[str, Any]:
    """Champion against candidate: each feature's share of attribution in both (the candidate's top features and
    the champion's), and sentences for the features the candidate leans on far more or far less ("the candidate
    leans on `income` 2.1× as much as the champion")."""
    theirs, ours = _shares(champion), _shares(candidate)
    old, new = names
    if not ours:
        why = (candidate.explanation or {}).get("error") or (
            "the candidate's global importance is still being computed in the sandbox"
            if (candidate.explanation or {}).get("pending") else "the candidate has no global importance yet")
        return {"available": False, "why": str(why), "rows": [], "sentences": []}
    if not theirs:
        why = "nothing to compare with" if champion is None else \
            (champion.explanation or {}).get("error") or (
                f"v{champion.number}'s global importance is still being computed in the sandbox"
                if (champion.explanation or {}).get("pending")
                else f"v{champion.number} has no global importance (scanned before explanations existed)")
        return {"available": False, "why": str(why), "rows": [], "sentences": []}
    features = sorted(set(ours) | set(theirs), key=lambda n: -max(ours.get(n, 0.0), theirs.get(n, 0.0)))[:top]
    rows, sentences = [], []
    for name in features:
        a, b = theirs.get(name, 0.0), ours.get(name, 0.0)
        ratio = (b / a) if a > 0 else None
        rows.append({"name": name, "champion": a, "candidate": b, "ratio": ratio})
        if max(a, b) < MIN_SHARE:
            continue
        if a == 0:
            sentences.append(f"{new} leans on `{name}`, which {old} does not use")
        elif b == 0:
            sentences.append(f"{new} does not use `{name}`, which {old} does")
        elif ratio is not None and ratio >= LEANS_RATIO:
            sentences.append(f"{new} leans on `{name}` {ratio:.1f}× as much as {old}")
        elif ratio is not None and ratio <= 1 / LEANS_RATIO:
            sentences.append(f"{new} leans on `{name}` {1 / ratio:.1f}× less than {old}")
    assert champion is not None
    return {"available": True, "rows": rows, "sentences": sentences, "champion": champion.number,
            "chart": {"features": features,
                      "series": [{"name": f"v{champion.number}", "values": [r["champion"] for r in rows]},
                                 {"name": f"v{candidate.number}", "values": [r["candidate"] for r in rows]}]}}
