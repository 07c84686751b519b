"""Drift of live data against a version's reference profile, on the profile's own bins.

For a feature with reference counts ``r`` and current counts ``c`` on the same bins (missing values left out), with
proportions ``p = r / sum(r)`` and ``q = c / sum(c)``:

- **PSI** (population stability index) ``= sum((q_i - p_i) * ln(q_i / p_i))``, where a proportion of 0 is replaced
  by ``EPSILON`` = 1e-4 in both places (an empty bin would otherwise make it infinite). 0.1 is a warning and 0.25 an
  alert by default.
- **Jensen–Shannon distance**, base 2 (between 0 and 1): ``sqrt((KL(p || m) + KL(q || m)) / 2)`` with
  ``m = (p + q) / 2`` and ``KL`` in bits; the same as ``scipy.spatial.distance.jensenshannon(p, q, base=2)``.
- **Kolmogorov–Smirnov statistic on the binned CDF**: ``max_i |P_i - Q_i|`` with ``P``, ``Q`` the cumulative sums of
  ``p`` and ``q`` in bin order (numeric features only; categories have no order).
- **Chi-square** (categorical features): ``sum((c_i - e_i)^2 / e_i)`` with ``e_i = n * p_i``, ``n = sum(c)`` and
  ``p_i`` floored at ``EPSILON`` then renormalised (so a category unseen in the reference still counts); the p-value
  is the chi-square survival function with ``k - 1`` degrees of freedom.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

EPSILON = 1e-4
DEFAULT_THRESHOLDS: dict[str, Any] = {
    "psi_warning": 0.1,
    "psi_alert": 0.25,
    "min_rows": 100,  # fewer current rows than this: drift is not judged
    "error_rate_max": 0.05,
    "latency_p99_ms": 250.0,
    "accuracy_min": None,  # None: the version's recorded accuracy metric minus 0.05, when it has one
    "min_labelled": 50,
    "window_minutes": 60,
    "attribution_drift_max": 0.2,  # total variation between production's and the reference's attribution shares
}


def numeric_bins(values: np.ndarray, edges: np.ndarray) -> list[int]:
    """Counts of ``values`` on the reference bins ``(-inf, e0), [e0, e1) … [e_last, +inf)``, then the missing (NaN)
    count. With the few edges a profile has (deciles), counting ``values < e`` per edge and differencing is several
    times faster than a binary search per value and needs no index array; many edges take the binary search."""
    missing = int(np.count_nonzero(np.isnan(values)))
    if len(edges) > 32:
        present = values[~np.isnan(values)] if missing else values
        counts = np.bincount(np.searchsorted(edges, present, side="right"), minlength=len(edges) + 1)
        return [int(c) for c in counts] + [missing]
    below = [0] + [int(np.count_nonzero(values < e)) for e in edges] + [len(values) - missing]  # NaN is never <
    return [below[i + 1] - below[i] for i in range(len(below) - 1)] + [missing]


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    p = _proportions(reference)
    q = _proportions(current)
    p, q = np.where(p == 0, EPSILON, p), np.where(q == 0, EPSILON, q)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(reference: np.ndarray, current: np.ndarray) -> float:
    p, q = _proportions(reference), _proportions(current)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return math.sqrt(max(kl(p) + kl(q), 0.0) / 2)


def ks_binned(reference: np.ndarray, current: np.ndarray) -> float:
    return float(np.max(np.abs(np.cumsum(_proportions(reference)) - np.cumsum(_proportions(current)))))


def chi_square(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    from scipy.stats import chi2

    p = np.maximum(_proportions(reference), EPSILON)
    p = p / p.sum()
    n = float(np.sum(current))
    expected = n * p
    statistic = float(np.sum((np.asarray(current, dtype="float64") - expected) ** 2 / expected))
    return statistic, float(chi2.sf(statistic, max(len(p) - 1, 1)))


def _proportions(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype="float64")
    total = counts.sum()
    return counts / total if total else counts


def status_of(value: float | None, thresholds: dict[str, Any]) -> str:
    if value is None:
        return "insufficient"
    if value >= thresholds["psi_alert"]:
        return "alert"
    if value >= thresholds["psi_warning"]:
        return "warning"
    return "ok"


def aligned(reference_profile: dict[str, Any], current: Any) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """Bin labels, reference counts and current counts on the same bins, and the current missing count.

    ``current`` is what rollups hold: for a numeric feature a list of bin counts with the missing count last; for a
    categorical one a dict of category counts (``__missing__`` for missing values)."""
    if reference_profile.get("kind") == "numeric":
        edges = reference_profile.get("edges") or []
        labels = ([f"< {edges[0]:.4g}"] + [f"[{a:.4g}, {b:.4g})" for a, b in itertools.pairwise(edges)]
                  + [f"≥ {edges[-1]:.4g}"]) if edges else ["all"]
        stored = list(reference_profile.get("counts") or [])
        ref = np.asarray((stored + [0] * len(labels))[:len(labels)], dtype="float64")  # a malformed profile: no crash
        values = list(current or [])
        bins = values[:-1] if len(values) == len(labels) + 1 else (values + [0] * len(labels))[:len(labels)]
        return labels, ref, np.asarray(bins, dtype="float64"), int(values[-1]) if len(values) == len(labels) + 1 else 0
    frequencies = dict(reference_profile.get("frequencies") or {})
    counts = dict(current or {})
    missing = int(counts.pop("__missing__", 0))
    labels = list(frequencies) + [c for c in counts if c not in frequencies]
    ref = np.asarray([frequencies.get(c, 0) for c in labels], dtype="float64")
    return labels, ref, np.asarray([counts.get(c, 0) for c in labels], dtype="float64"), missing


def feature_drift(name: str, reference_profile: dict[str, Any], current: Any,
                  thresholds: dict[str, Any]) -> dict[str, Any]:
    _labels, ref, cur, missing = aligned(reference_profile, current)
    n = int(cur.sum())
    kind = reference_profile.get("kind", "numeric")
    result: dict[str, Any] = {"feature": name, "kind": kind, "rows": n, "missing": missing,
                              "psi": None, "js": None, "ks": None, "chi2": None, "p_value": None}
    if n >= int(thresholds["min_rows"]) and ref.sum() > 0:
        result["psi"] = round(psi(ref, cur), 6)
        result["js"] = round(js_distance(ref, cur), 6)
        if kind == "numeric":
            result["ks"] = round(ks_binned(ref, cur), 6)
        else:
            statistic, p_value = chi_square(ref, cur)
            result["chi2"], result["p_value"] = round(statistic, 4), p_value
    result["status"] = status_of(result["psi"], thresholds)
    return result


def distribution(reference_profile: dict[str, Any], current: Any) -> dict[str, Any]:
    """Reference and current proportions on the same bins, for the page's side-by-side chart."""
    labels, ref, cur, _missing = aligned(reference_profile, current)
    return {"labels": labels, "reference": [round(float(x), 6) for x in _proportions(ref)],
            "current": [round(float(x), 6) for x in _proportions(cur)]}


def class_shares(reference_profile: dict[str, Any]) -> dict[str, float] | None:
    """The share of each class in a reference target column, or None when the profile does not name them.

    A categorical profile's frequencies are the classes. A numeric one (0/1 labels read as integers) holds them
    when its deduplicated decile edges are consecutive integers ``k, k+1 … m`` with nothing below ``k``: the bin
    ``[k, k+1)`` is then class ``k`` and ``≥ m`` is class ``m`` (any other layout mixes classes in a bin)."""
    if reference_profile.get("kind") != "numeric":
        frequencies = {str(k): float(v) for k, v in (reference_profile.get("frequencies") or {}).items()
                       if k != "__other__"}
        total = sum(frequencies.values())
        return {k: v / total for k, v in frequencies.items()} if total else None
    edges = list(reference_profile.get("edges") or [])
    counts = list(reference_profile.get("counts") or [])
    if not edges or len(counts) < len(edges) + 1 or counts[0]:
        return None
    if any(float(e) != int(e) for e in edges) or any(b - a != 1 for a, b in itertools.pairwise(edges)):
        return None
    total = float(sum(counts[1:len(edges) + 1]))
    if not total:
        return None
    return {str(int(e)): counts[i + 1] / total for i, e in enumerate(edges)}

