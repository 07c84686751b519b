"""The statistics of an A/B experiment, on sufficient statistics only (per arm: n, sum, sum of squares). No Django.

**Always-valid test.** The mixture sequential probability ratio test (mSPRT) of Johari, Pekelis and Walsh ("Always
valid inference", 2017; what Optimizely's Stats Engine uses) with a normal mixing distribution N(0, tau^2) over the
difference of means. For the estimated difference ``d = mean_B - mean_A`` with variance ``V = s_A^2/n_A +
s_B^2/n_B``, the likelihood ratio against "no difference" is

    Lambda = sqrt(V / (V + tau^2)) * exp(d^2 tau^2 / (2 V (V + tau^2)))

and the experiment declares a difference the first time ``Lambda >= 1/alpha``. The probability that this ever happens
when there is no difference is at most ``alpha`` however often one looks (Ville's inequality), so people may watch
every day. Inverting the test gives an always-valid confidence sequence for the difference,

    d +/- sqrt(V (V + tau^2) / tau^2 * (log((V + tau^2) / V) - 2 log alpha)),

which is intersected with every earlier look's interval (each holds simultaneously with the others).

**Planning.** ``tau^2`` is chosen once, when the experiment is planned, to make the test most powerful at the minimum
detectable effect (MDE); ``planned_sample`` is the smallest sample per arm at which the test alone, looked at only
once, detects the MDE with 80 % power. Every earlier look can only add to that, so at least 80 % of experiments at
the MDE reach a verdict within the planned sample. ``fixed_horizon_sample`` is the classical two-sided z-test's
sample for comparison (what a one-look test would need).

**Sample-ratio mismatch.** A chi-squared goodness-of-fit test of the assignment counts against the configured
split; p < 0.001 invalidates the experiment (a bug in assignment or logging, not a finding about the models). The
counts are of units (routing keys or subjects; a request without either is its own unit), never of requests: a sticky
user sending fifty requests is one assignment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

SRM_P = 0.001
POWER = 0.8
MIN_PER_ARM = 30  # below this many outcomes an arm's variance estimate is too rough to test on


@dataclass(frozen=True)
class Arm:
    """Sufficient statistics of one arm's outcomes."""

    n: float
    total: float
    squares: float

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def variance(self) -> float:
        """Sample variance (n - 1 in the denominator), never below a floor that keeps a constant arm testable."""
        if self.n < 2:
            return math.nan
        var = (self.squares - self.total * self.total / self.n) / (self.n - 1)
        return max(var, 1e-12)


@dataclass(frozen=True)
class Look:
    """What one look at the data says."""

    n_a: float
    n_b: float
    difference: float  # mean_B - mean_A
    variance: float  # of the difference
    likelihood_ratio: float
    p_value: float  # always valid: 1 / max(1, Lambda) (callers take the running minimum)
    low: float  # this look's always-valid interval (callers intersect with the earlier ones)
    high: float
    significant: bool


def msprt(a: Arm, b: Arm, *, tau2: float, alpha: float) -> Look:
    """One look of the mSPRT at arms ``a`` (champion) and ``b`` (challenger)."""
    if a.n < MIN_PER_ARM or b.n < MIN_PER_ARM:
        return Look(a.n, b.n, b.mean - a.mean if a.n and b.n else math.nan, math.nan, 1.0, 1.0, -math.inf, math.inf,
                    False)
    d = b.mean - a.mean
    v = a.variance / a.n + b.variance / b.n
    log_lr = 0.5 * math.log(v / (v + tau2)) + d * d * tau2 / (2 * v * (v + tau2))
    lr = math.exp(min(log_lr, 700.0))
    half = math.sqrt(v * (v + tau2) / tau2 * (math.log((v + tau2) / v) - 2 * math.log(alpha)))
    return Look(a.n, b.n, d, v, lr, min(1.0, 1.0 / lr), d - half, d + half, log_lr >= -math.log(alpha))


def msprt_arrays(n_a: np.ndarray, sum_a: np.ndarray, sq_a: np.ndarray, n_b: np.ndarray, sum_b: np.ndarray,
                 sq_b: np.ndarray, *, tau2: float, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``msprt`` on arrays of looks at once (any shape): (significant, low, high). The same formulas, vectorised for
    the simulations and for a whole experiment's history."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_a, mean_b = sum_a / n_a, sum_b / n_b
        var_a = np.maximum((sq_a - sum_a * sum_a / n_a) / (n_a - 1), 1e-12)
        var_b = np.maximum((sq_b - sum_b * sum_b / n_b) / (n_b - 1), 1e-12)
        d = mean_b - mean_a
        v = var_a / n_a + var_b / n_b
        log_lr = 0.5 * np.log(v / (v + tau2)) + d * d * tau2 / (2 * v * (v + tau2))
        half = np.sqrt(v * (v + tau2) / tau2 * (np.log((v + tau2) / v) - 2 * math.log(alpha)))
    enough = (n_a >= MIN_PER_ARM) & (n_b >= MIN_PER_ARM)
    significant = enough & (log_lr >= -math.log(alpha))
    low = np.where(enough, d - half, -np.inf)
    high = np.where(enough, d + half, np.inf)
    return significant, low, high


def segment_msprt(n_a: np.ndarray, sum_a: np.ndarray, sq_a: np.ndarray, n_b: np.ndarray, sum_b: np.ndarray,
                  sq_b: np.ndarray, *, tau2: float, alpha: float,
                  segments: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``msprt_arrays`` per segment (segments on the last axis), each at ``alpha / k`` (Bonferroni over ``k``
    segments, by default the last axis's length): the chance that any segment of an A/A experiment is ever declared
    different stays at most ``alpha`` however often one looks. The intervals are at ``1 - alpha / k`` and hold for
    all segments together with at least ``1 - alpha``."""
    k = max(1, int(segments if segments is not None else np.shape(n_a)[-1]))
    return msprt_arrays(n_a, sum_a, sq_a, n_b, sum_b, sq_b, tau2=tau2, alpha=alpha / k)


def _threshold_z(v: float, tau2: float, alpha: float) -> float:
    """The |z| at which the mSPRT rejects when the difference's variance is ``v``."""
    return math.sqrt((v + tau2) / tau2 * (math.log((v + tau2) / v) - 2 * math.log(alpha)))


def fixed_horizon_sample(*, sd: float, mde: float, alpha: float, power: float = POWER, share: float = 0.5) -> int:
    """Per-arm sample (of the smaller arm) of a two-sided z-test with ``power`` at ``mde``: the classical answer."""
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    small = min(share, 1 - share)
    # n_small = z^2 sd^2 (1 + small/large) / mde^2
    return max(MIN_PER_ARM, math.ceil(z * z * sd * sd * (1 + small / (1 - small)) / (mde * mde)))


def _power_at(n_small: float, *, sd: float, mde: float, alpha: float, tau2: float, ratio: float) -> float:
    """The mSPRT's power at ``mde`` from one look at ``n_small`` per smaller arm (``ratio`` = large/small)."""
    v = sd * sd * (1 / n_small + 1 / (n_small * ratio))
    c = _threshold_z(v, tau2, alpha)
    shift = mde / math.sqrt(v)
    return float(sps.norm.sf(c - shift) + sps.norm.cdf(-c - shift))


def _planned_for(tau2: float, *, sd: float, mde: float, alpha: float, power: float, ratio: float) -> int:
    lo, hi = float(MIN_PER_ARM), float(MIN_PER_ARM)
    while _power_at(hi, sd=sd, mde=mde, alpha=alpha, tau2=tau2, ratio=ratio) < power:
        hi *= 2
        if hi > 1e12:
            return math.inf  # type: ignore[return-value]
    while hi - lo > 1:
        mid = (lo + hi) / 2
        if _power_at(mid, sd=sd, mde=mde, alpha=alpha, tau2=tau2, ratio=ratio) >= power:
            hi = mid
        else:
            lo = mid
    return math.ceil(hi)


def planned_sample(*, tau2: float, sd: float, mde: float, alpha: float, share: float,
                   power: float = POWER) -> int:
    """The sample per (smaller) arm at which the test with this ``tau2`` reaches ``power`` at ``mde`` when the
    challenger gets ``share`` of the traffic: a share changed mid-experiment keeps the planned ``tau2``."""
    small = min(share, 1 - share)
    return int(_planned_for(tau2, sd=sd, mde=mde, alpha=alpha, power=power, ratio=(1 - small) / small))


@dataclass(frozen=True)
class Plan:
    tau2: float
    planned_sample: int  # per arm (the smaller one): the sequential test's 80 % power at the MDE
    fixed_horizon_sample: int  # per arm: what a test looked at once would need


def plan(*, sd: float, mde: float, alpha: float, share: float = 0.5, power: float = POWER) -> Plan:
    """Choose the mixing variance that makes the test most powerful at ``mde`` and the sample that needs.
    ``share`` is the challenger's share of traffic; sizes are for the smaller arm."""
    if not (sd > 0 and mde > 0 and 0 < alpha < 1 and 0 < share < 1):
        raise ValueError("plan needs sd > 0, mde > 0, 0 < alpha < 1 and 0 < share < 1")
    small = min(share, 1 - share)
    ratio = (1 - small) / small
    best: tuple[int, float] | None = None
    # tau is searched on a grid around the MDE (the optimum lies within a factor of a few of it)
    for factor in np.geomspace(0.1, 10, 41):
        tau2 = float((mde * factor) ** 2)
        n = _planned_for(tau2, sd=sd, mde=mde, alpha=alpha, power=power, ratio=ratio)
        if best is None or n < best[0]:
            best = (n, tau2)
    assert best is not None
    return Plan(tau2=best[1], planned_sample=int(best[0]),
                fixed_horizon_sample=fixed_horizon_sample(sd=sd, mde=mde, alpha=alpha, power=power, share=share))


def srm_p_value(observed: list[float], shares: list[float]) -> float:
    """Chi-squared goodness of fit of assignment counts against the configured shares (1.0 with nothing assigned)."""
    total = float(sum(observed))
    if total <= 0:
        return 1.0
    expected = [total * s / sum(shares) for s in shares]
    return float(sps.chisquare(observed, expected).pvalue)


def srm_p_value_expected(observed: Sequence[float], expected: Sequence[float]) -> float:
    """Chi-squared (one degree of freedom) of assignment counts against expected counts, which may mix several
    splits (units assigned while the share was 10 % and others while it was 20 %): each unit's expected side is its
    own split's, and the Pearson statistic on the summed counts is then conservative (its variance is at most the
    one-split binomial's). 1.0 with nothing assigned."""
    total = float(sum(observed))
    if total <= 0 or any(e <= 0 for e in expected):
        return 1.0
    scale = total / float(sum(expected))
    return float(sps.chisquare(observed, [e * scale for e in expected]).pvalue)


def srm_mismatch(observed: list[float], shares: list[float]) -> bool:
    return srm_p_value(observed, shares) < SRM_P


def bernoulli_sd(p: float) -> float:
    p = min(max(p, 0.01), 0.99)
    return math.sqrt(p * (1 - p))
