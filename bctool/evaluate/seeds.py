"""Is a difference real over training seeds? Tests for claims like "the recipe's M(n,o) beats
M(o,o)", made from several training runs.

Within one trained model, the paired bootstrap over queries (:func:`bctool.evaluate.scores.paired_delta`)
says whether that model's difference is more than query sampling: that is the release gate.
Across training seeds it is not enough: seeds differ by more than their query noise, and every
seed is scored on the same queries. Three estimates of the mean seed difference D and its
uncertainty, from least to most data:

* :func:`paired_seed_test`: the seed differences D_s = M_s(new) - M_s(old) alone: their mean, the
  standard error s_D / sqrt(S) and Student's t with S - 1 degrees of freedom. The default for a
  claim "over seeds", and the one this project's results pages report;
* :func:`random_effects`: the seed differences with each seed's own (bootstrap) variance:
  DerSimonian-Laird's between-seed variance and the Hartung-Knapp interval (t with S - 1
  degrees of freedom), which stays honest with few seeds;
* :func:`crossed_test`: the per-query differences of every seed (an S x Q table): a two-way
  random-effects model, seeds and queries crossed, so the interval speaks of new seeds and new
  queries alike (method of moments; Satterthwaite's degrees of freedom).

:func:`minimum_detectable_effect` gives the difference a test of that standard error would
detect with 80% power: what "not shown" means in figures. Pure numpy; Student's t from the
regularized incomplete beta function, so nothing beyond numpy is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bctool.errors import ConfigError

LEVEL = 0.95  # two-sided confidence level of every interval here
POWER = 0.8  # the power at which a minimum detectable effect is reported
DEFAULT_SEEDS = 5  # seeds a claim over seeds is made from by default


# -- Student's t ------------------------------------------------------------------------------
def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz),
    converging for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x = {x} lies outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b  # the symmetry I_x(a,b) = 1 - I_1-x(b,a)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (df > 0; inf: the normal)."""
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p = {p} must lie in (0, 1)")
    low, high = -1.0, 1.0
    while t_cdf(low, df) > p:
        low *= 2.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, abs(middle)):
            break
    return 0.5 * (low + high)


# -- the tests ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedTest:
    """One estimate of a mean difference over seeds: the mean, its standard error, Student's t
    with ``df`` degrees of freedom, the two-sided p of "no difference", the interval at
    ``level``, and the minimum detectable effect at 80% power."""

    method: str
    seeds: int
    mean: float
    se: float
    df: float
    t: float
    p: float
    low: float
    high: float
    mde: float
    level: float = LEVEL
    extra: dict[str, float] | None = None  # the variance components of a model, where it has them

    @property
    def shown(self) -> bool:
        """The interval lies above 0: the difference is shown positive at ``level``."""
        return self.low > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``shown``."""
        return {**{k: v for k, v in asdict(self).items() if v is not None}, "shown": self.shown}


def minimum_detectable_effect(se: float, df: float, level: float = LEVEL, power: float = POWER) -> float:
    """The true difference that a two-sided t test at ``level`` with this standard error and
    ``df`` degrees of freedom detects with probability ``power``:
    (t_{1-(1-level)/2, df} + t_{power, df}) * se."""
    return (t_quantile(1.0 - (1.0 - level) / 2.0, df) + t_quantile(power, df)) * se


def _test(method: str, seeds: int, mean: float, se: float, df: float, level: float,
          extra: dict[str, float] | None = None) -> SeedTest:
    half = t_quantile(1.0 - (1.0 - level) / 2.0, df) * se
    if se > 0:
        t = mean / se
        p = 2.0 * t_cdf(-abs(t), df)
    else:  # every seed (and query) gave the same difference
        t = math.copysign(math.inf, mean) if mean else 0.0
        p = 0.0 if mean else 1.0
    return SeedTest(method, seeds, mean, se, df, t, p, mean - half, mean + half,
                    minimum_detectable_effect(se, df, level), level, extra)


def _seed_values(deltas: Sequence[float], what: str) -> np.ndarray:
    values = np.asarray(deltas, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ConfigError(f"{what} needs the differences of at least 2 seeds, got {values.shape}")
    if not np.isfinite(values).all():
        raise ConfigError(f"{what}: the seed differences hold NaN or inf ({values.tolist()})")
    return values


def paired_seed_test(deltas: Sequence[float], level: float = LEVEL) -> SeedTest:
    """The paired t test on the seed differences D_s: mean, s_D / sqrt(S), S - 1 degrees of freedom."""
    values = _seed_values(deltas, "paired_seed_test")
    seeds = len(values)
    return _test("paired t over seeds", seeds, float(values.mean()), float(values.std(ddof=1) / math.sqrt(seeds)),
                 seeds - 1, level)


def random_effects(deltas: Sequence[float], variances: Sequence[float], level: float = LEVEL) -> SeedTest:
    """The seed differences weighted by their own variances (a seed's bootstrap variance of its
    delta): DerSimonian-Laird's between-seed variance tau^2, then the Hartung-Knapp standard error
    and an interval from t with S - 1 degrees of freedom."""
    values = _seed_values(deltas, "random_effects")
    within = np.asarray(variances, dtype=np.float64)
    if within.shape != values.shape or (within <= 0).any() or not np.isfinite(within).all():
        raise ConfigError(f"random_effects needs one positive, finite variance a seed; got {within.tolist()} "
                          f"for {len(values)} seeds")
    seeds = len(values)
    weights = 1.0 / within
    fixed = float((weights * values).sum() / weights.sum())
    q = float((weights * (values - fixed) ** 2).sum())
    scale = float(weights.sum() - (weights**2).sum() / weights.sum())
    tau2 = max(0.0, (q - (seeds - 1)) / scale)
    pooled = 1.0 / (within + tau2)
    mean = float((pooled * values).sum() / pooled.sum())
    se = math.sqrt(float((pooled * (values - mean) ** 2).sum()) / ((seeds - 1) * float(pooled.sum())))
    return _test("random effects (DerSimonian-Laird, Hartung-Knapp)", seeds, mean, se, seeds - 1, level,
                 {"tau2": tau2, "q": q})


def crossed_test(differences: np.ndarray, level: float = LEVEL) -> SeedTest:
    """The per-query differences of every seed, an S x Q table (row s: seed s; column q: one
    query, the same in every row), as y_sq = mu + a_s + b_q + e_sq with seeds, queries and the
    residual random: Var(mean) = var_seed / S + var_query / Q + var_residual / (S Q), estimated
    from the mean squares as (MS_seed + MS_query - MS_residual) / (S Q), with Satterthwaite's
    degrees of freedom."""
    table = np.asarray(differences, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 2:
        raise ConfigError(f"crossed_test needs an S x Q table of differences with S, Q >= 2; got shape {table.shape}")
    if not np.isfinite(table).all():
        raise ConfigError("crossed_test: the table of per-query differences holds NaN or inf")
    seeds, queries = table.shape
    grand = float(table.mean())
    seed_means, query_means = table.mean(axis=1), table.mean(axis=0)
    ms_seed = queries * float(((seed_means - grand) ** 2).sum()) / (seeds - 1)
    ms_query = seeds * float(((query_means - grand) ** 2).sum()) / (queries - 1)
    residual = table - seed_means[:, None] - query_means[None, :] + grand
    ms_resid = float((residual**2).sum()) / ((seeds - 1) * (queries - 1))
    combined = max(ms_seed + ms_query - ms_resid, 0.0)
    se = math.sqrt(combined / (seeds * queries))
    df_den = ms_seed**2 / (seeds - 1) + ms_query**2 / (queries - 1) + ms_resid**2 / ((seeds - 1) * (queries - 1))
    df = combined**2 / df_den if df_den > 0 else math.inf
    df = max(df, 1.0)
    components = {"var_seed": max(0.0, (ms_seed - ms_resid) / queries),
                  "var_query": max(0.0, (ms_query - ms_resid) / seeds), "var_residual": ms_resid}
    return _test("crossed seeds x queries", seeds, grand, se, df, level, components)
