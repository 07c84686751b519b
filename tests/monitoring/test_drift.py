"""The drift statistics match scipy and numpy on the same bins."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import chisquare, ks_2samp

from monitoring import drift
from monitoring.drift import DEFAULT_THRESHOLDS, EPSILON

REFERENCE = np.array([120, 80, 100, 95, 105, 110, 90, 100, 100, 50, 50], dtype=float)
CURRENT = np.array([30, 60, 90, 100, 120, 140, 160, 150, 90, 40, 20], dtype=float)


def test_psi_is_the_documented_formula() -> None:
    p, q = REFERENCE / REFERENCE.sum(), CURRENT / CURRENT.sum()
    assert drift.psi(REFERENCE, CURRENT) == pytest.approx(float(np.sum((q - p) * np.log(q / p))))
    assert drift.psi(REFERENCE, REFERENCE) == 0.0


def test_an_empty_bin_counts_as_epsilon() -> None:
    reference, current = np.array([50.0, 50.0, 0.0]), np.array([40.0, 40.0, 20.0])
    expected = (0.4 - 0.5) * math.log(0.4 / 0.5) * 2 + (0.2 - EPSILON) * math.log(0.2 / EPSILON)
    assert drift.psi(reference, current) == pytest.approx(expected)
    assert math.isfinite(drift.psi(current, reference))


def test_jensen_shannon_distance_matches_scipy_base_2() -> None:
    assert drift.js_distance(REFERENCE, CURRENT) == pytest.approx(jensenshannon(REFERENCE, CURRENT, base=2))
    with_zero = CURRENT.copy()
    with_zero[0] = 0
    assert drift.js_distance(REFERENCE, with_zero) == pytest.approx(jensenshannon(REFERENCE, with_zero, base=2))


def test_binned_ks_matches_scipy_on_samples_at_the_bins() -> None:
    # Samples placed at one point per bin have exactly the binned CDFs as their empirical CDFs.
    points = np.arange(len(REFERENCE), dtype=float)
    a, b = np.repeat(points, REFERENCE.astype(int)), np.repeat(points, CURRENT.astype(int))
    assert drift.ks_binned(REFERENCE, CURRENT) == pytest.approx(ks_2samp(a, b).statistic)


def test_chi_square_matches_scipy() -> None:
    reference, current = np.array([500.0, 300.0, 200.0]), np.array([40.0, 35.0, 25.0])
    statistic, p_value = drift.chi_square(reference, current)
    expected = chisquare(current, f_exp=reference / reference.sum() * current.sum())
    assert statistic == pytest.approx(expected.statistic)
    assert p_value == pytest.approx(expected.pvalue)


def test_numeric_and_categorical_features_are_judged_against_the_thresholds() -> None:
    numeric = {"kind": "numeric", "edges": [1.0, 2.0, 3.0], "counts": [25, 25, 25, 25]}
    same = drift.feature_drift("x", numeric, [25, 25, 25, 25, 3], DEFAULT_THRESHOLDS)
    assert same["psi"] == 0 and same["status"] == "ok" and same["missing"] == 3 and same["ks"] == 0
    shifted = drift.feature_drift("x", numeric, [0, 0, 10, 90, 0], DEFAULT_THRESHOLDS)
    assert shifted["status"] == "alert" and shifted["psi"] > 0.25
    few = drift.feature_drift("x", numeric, [0, 0, 1, 9, 0], DEFAULT_THRESHOLDS)
    assert few["status"] == "insufficient" and few["psi"] is None, "below min_rows nothing is judged"

    colour = {"kind": "categorical", "frequencies": {"red": 60, "blue": 40}}
    unseen = drift.feature_drift("colour", colour, {"red": 50, "blue": 30, "__other__": 40, "__missing__": 2},
                                 DEFAULT_THRESHOLDS)
    assert unseen["chi2"] is not None and unseen["p_value"] < 1e-6 and unseen["missing"] == 2
    assert unseen["status"] == "alert", "a category never seen in the reference is drift"
    labels = drift.distribution(colour, {"red": 50, "blue": 30, "__other__": 40})["labels"]
    assert labels == ["red", "blue", "__other__"]


@pytest.mark.parametrize("edge_count", [1, 9, 60])
def test_numeric_bins_match_numpys_histogram_on_the_reference_bins(edge_count: int) -> None:
    rng = np.random.default_rng(edge_count)
    edges = np.unique(np.quantile(rng.normal(size=1000), np.linspace(0.05, 0.95, edge_count)))
    values = np.concatenate([rng.normal(0.3, 1.2, 5000), edges, [np.nan, np.nan, np.inf, -np.inf]])
    expected = np.histogram(values[~np.isnan(values)], bins=np.concatenate(([-np.inf], edges, [np.inf])))[0]
    assert drift.numeric_bins(values, edges) == [*expected.tolist(), 2]
    assert drift.numeric_bins(np.array([]), edges) == [0] * (len(edges) + 2)


def test_a_classifiers_reference_classes_are_read_from_its_profile() -> None:
    """A 0/1 target profiled as numbers (deciles deduplicated to edges [0, 1]) holds its classes in the bins [0, 1)
    and ≥ 1; categories hold them by name; bins that mix classes (edges 0 and 2) name none."""
    assert drift.class_shares({"kind": "numeric", "edges": [0.0, 1.0], "counts": [0, 30, 70]}) == {"0": 0.3, "1": 0.7}
    assert drift.class_shares({"kind": "numeric", "edges": [0, 1, 2], "counts": [0, 1, 1, 2]}) == {
        "0": 0.25, "1": 0.25, "2": 0.5}
    assert drift.class_shares({"kind": "categorical", "frequencies": {"yes": 3, "no": 1, "__other__": 4}}) == {
        "yes": 0.75, "no": 0.25}
    assert drift.class_shares({"kind": "numeric", "edges": [0.0, 2.0], "counts": [0, 5, 5]}) is None
    assert drift.class_shares({"kind": "numeric", "edges": [0.5, 1.5], "counts": [0, 5, 5]}) is None
    assert drift.class_shares({"kind": "numeric", "edges": [0.0, 1.0], "counts": [3, 5, 5]}) is None
