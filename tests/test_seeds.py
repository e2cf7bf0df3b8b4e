"""Tests over seeds: Student's t against a numerical integral and printed tables, the paired
test against a textbook example, the random-effects and crossed estimates against slow
references and against each other where they must agree, and the crossed interval's coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bctool.errors import ConfigError
from bctool.evaluate.seeds import (
    crossed_test,
    minimum_detectable_effect,
    paired_seed_test,
    random_effects,
    t_cdf,
    t_quantile,
)


def _slow_t_cdf(t: float, df: float, steps: int = 20_000) -> float:
    """P(T <= t) as 1/2 plus or minus Simpson's rule over the density from 0 to |t| (symmetry)."""
    x = np.linspace(0.0, abs(t), steps + 1)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
    h = abs(t) / steps
    area = float(h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum()))
    return 0.5 + math.copysign(area, t)


@pytest.mark.parametrize("df", [2, 4, 9, 30])
@pytest.mark.parametrize("t", [-3.1, -0.4, 0.0, 1.2, 2.5])
def test_t_cdf_matches_the_integral_of_the_density(t: float, df: int) -> None:
    assert t_cdf(t, df) == pytest.approx(_slow_t_cdf(t, df), abs=1e-10)


def test_t_quantiles_match_printed_tables() -> None:
    assert t_quantile(0.975, 4) == pytest.approx(2.776445105, abs=1e-8)
    assert t_quantile(0.975, 9) == pytest.approx(2.262157163, abs=1e-8)
    assert t_quantile(0.975, 2) == pytest.approx(4.302652730, abs=1e-8)
    assert t_quantile(0.8, 4) == pytest.approx(0.940964577, abs=1e-8)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959963985, abs=1e-8)


def test_the_paired_test_gives_students_sleep_example() -> None:
    """Cushny and Peebles' sleep data as Student analysed it (R: t.test(..., paired = TRUE)):
    t = 4.0621, df = 9, p = 0.002833, 95% interval [0.7001, 2.4599]."""
    extra_sleep = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]
    test = paired_seed_test(extra_sleep)
    assert (test.mean, test.df) == (pytest.approx(1.58), 9)
    assert test.t == pytest.approx(4.062128, abs=1e-6) and test.p == pytest.approx(0.0028329, abs=1e-7)
    assert (test.low, test.high) == (pytest.approx(0.7001142, abs=1e-7), pytest.approx(2.4598858, abs=1e-7))
    assert test.shown


def test_three_seeds_of_two_points_are_not_shown_and_the_mde_says_how_far() -> None:
    test = paired_seed_test([3.61, 1.49, 2.02])  # the recipe's emoji deltas on seeds 0-2, in mAP points
    assert test.p == pytest.approx(0.065, abs=0.001) and not test.shown
    assert test.mde == pytest.approx((t_quantile(0.975, 2) + t_quantile(0.8, 2)) * test.se)
    assert minimum_detectable_effect(1.0, math.inf) == pytest.approx(1.959964 + 0.841621, abs=1e-5)


def _slow_random_effects(y: list[float], v: list[float]) -> tuple[float, float, float]:
    k = len(y)
    w = [1 / vi for vi in v]
    fixed = sum(wi * yi for wi, yi in zip(w, y)) / sum(w)
    q = sum(wi * (yi - fixed) ** 2 for wi, yi in zip(w, y))
    c = sum(w) - sum(wi * wi for wi in w) / sum(w)
    tau2 = max(0.0, (q - (k - 1)) / c)
    ws = [1 / (vi + tau2) for vi in v]
    mean = sum(wi * yi for wi, yi in zip(ws, y)) / sum(ws)
    se = math.sqrt(sum(wi * (yi - mean) ** 2 for wi, yi in zip(ws, y)) / ((k - 1) * sum(ws)))
    return mean, se, tau2


def test_random_effects_matches_a_slow_reference_and_equal_variances_give_the_paired_test() -> None:
    y, v = [-0.11, 1.92, -0.59, 0.8, 2.2], [0.3, 0.5, 0.2, 0.4, 0.6]
    test = random_effects(y, v)
    mean, se, tau2 = _slow_random_effects(y, v)
    assert (test.mean, test.se, test.extra["tau2"]) == (pytest.approx(mean), pytest.approx(se), pytest.approx(tau2))
    same = random_effects(y, [0.5] * 5)
    paired = paired_seed_test(y)
    assert (same.mean, same.se, same.low, same.high) == pytest.approx((paired.mean, paired.se, paired.low, paired.high))
    with pytest.raises(ConfigError, match="one positive, finite variance a seed"):
        random_effects(y, [0.5] * 4)


def _slow_crossed(table: np.ndarray) -> tuple[float, float, float]:
    s, q = table.shape
    grand = sum(table[i, j] for i in range(s) for j in range(q)) / (s * q)
    rows = [sum(table[i]) / q for i in range(s)]
    cols = [sum(table[:, j]) / s for j in range(q)]
    ms_s = q * sum((r - grand) ** 2 for r in rows) / (s - 1)
    ms_q = s * sum((c - grand) ** 2 for c in cols) / (q - 1)
    ms_e = sum((table[i, j] - rows[i] - cols[j] + grand) ** 2 for i in range(s) for j in range(q)) / ((s - 1) * (q - 1))
    var = (ms_s + ms_q - ms_e) / (s * q)
    df = (ms_s + ms_q - ms_e) ** 2 / (ms_s**2 / (s - 1) + ms_q**2 / (q - 1) + ms_e**2 / ((s - 1) * (q - 1)))
    return grand, math.sqrt(var), df


def test_the_crossed_estimate_matches_a_slow_reference() -> None:
    rng = np.random.default_rng(0)
    table = 0.02 + rng.normal(0, 0.01, (5, 1))[:, :] + rng.normal(0, 0.2, (1, 40)) + rng.normal(0, 0.1, (5, 40))
    test = crossed_test(table)
    mean, se, df = _slow_crossed(table)
    assert (test.mean, test.se, test.df) == (pytest.approx(mean), pytest.approx(se), pytest.approx(df))


def test_rows_that_differ_only_by_seed_give_the_paired_test_of_their_means() -> None:
    seed_deltas = np.array([0.031, 0.012, 0.025, 0.004, 0.018])
    table = np.repeat(seed_deltas[:, None], 30, axis=1)
    crossed, paired = crossed_test(table), paired_seed_test(seed_deltas)
    assert (crossed.mean, crossed.se, crossed.df) == (pytest.approx(paired.mean), pytest.approx(paired.se),
                                                      pytest.approx(paired.df))


def test_the_crossed_interval_covers_the_true_difference_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(1)
    truth, covered, runs = 0.01, 0, 400
    for _ in range(runs):
        table = (truth + rng.normal(0, 0.02, (5, 1)) + rng.normal(0, 0.15, (1, 60))
                 + rng.normal(0, 0.1, (5, 60)))
        test = crossed_test(table)
        covered += test.low <= truth <= test.high
    assert 0.91 <= covered / runs <= 0.99, covered / runs


def test_bad_inputs_name_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match="at least 2 seeds"):
        paired_seed_test([1.0])
    with pytest.raises(ConfigError, match="NaN or inf"):
        paired_seed_test([1.0, float("nan")])
    with pytest.raises(ConfigError, match="S, Q >= 2"):
        crossed_test(np.zeros((1, 5)))
