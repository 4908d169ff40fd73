"""Summaries over seeds against NumPy, paired intervals against SciPy's paired t-test and a hand computation."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from featkd import stats


def test_summary_matches_numpy():
    values = [8.1, 7.7, 8.4, 7.9, 8.0]
    s = stats.Summary.of(values)
    assert (s.mean, s.median, s.n) == (pytest.approx(np.mean(values)), 8.0, 5)
    assert s.std == pytest.approx(np.std(values, ddof=1))
    assert stats.Summary.of([3.0]).std == 0.0
    for empty in (stats.Summary.of, stats.t_interval):
        with pytest.raises(ValueError, match="at least one value"):
            empty([])


def test_paired_delta_matches_scipy_ttest_rel_interval():
    rng = np.random.default_rng(0)
    base = rng.normal(80, 1, 5)
    method = base + rng.normal(0.8, 0.3, 5)
    got = stats.paired_delta(method, base)
    ci = scipy_stats.ttest_rel(method, base).confidence_interval(0.95)
    assert got.low == pytest.approx(ci.low, rel=1e-12) and got.high == pytest.approx(ci.high, rel=1e-12)
    assert got.excludes_zero and stats.verdict(got) == "beyond noise"


def test_t_interval_by_hand():
    values = [1.0, 2.0, 4.0]
    got = stats.t_interval(values)
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert got.mean == pytest.approx(7 / 3)
    assert got.half_width == pytest.approx(4.302652729911275 * sd / math.sqrt(3))  # t_{2, 0.975}


def test_interval_containing_zero_is_inside_noise_and_one_seed_has_none():
    assert stats.verdict(stats.paired_delta([1.0, -1.0, 0.5], [0.0, 0.0, 0.0])) == "inside noise"
    single = stats.paired_delta([2.0], [1.0])
    assert math.isnan(single.half_width) and stats.verdict(single) == "too few seeds" and not single.excludes_zero


def test_two_seeds_or_equal_differences_are_too_few_to_call():
    # issue #19: two identical differences gave a zero-width interval printed as "beyond noise"
    equal = stats.paired_delta([76.0, 76.0, 76.0], [80.0, 80.0, 80.0])
    assert equal.half_width == 0 and not equal.excludes_zero and stats.verdict(equal) == "too few seeds"
    two = stats.paired_delta([90.0, 91.0], [80.0, 80.5])
    assert two.low > 0 and not two.excludes_zero and stats.verdict(two) == "too few seeds"


def test_pairing_removes_the_shared_seed_variance():
    # Large seed-to-seed spread shared by both methods, a constant +1 gain: paired interval is tight.
    base = [70.0, 80.0, 90.0, 75.0, 85.0]
    method = [b + 1.0 + e for b, e in zip(base, [0.1, -0.1, 0.05, -0.05, 0.0])]
    paired = stats.paired_delta(method, base)
    unpaired_half = stats.t_interval(method).half_width
    assert paired.excludes_zero and paired.half_width < 0.2 < unpaired_half


def test_unequal_seed_counts_are_refused():
    with pytest.raises(ValueError, match="one value per seed"):
        stats.paired_delta([1.0, 2.0], [1.0])


def test_comparison_table_rows_and_verdicts():
    table = stats.comparison_table({"student": [80.0, 81.0, 79.0], "KD": [82.0, 83.1, 81.2], "AT": [80.5, 80.0, 79.9]},
                                   [0, 1, 2], teacher=92.0)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 + 1
    assert "| KD |" in lines[3] and "beyond noise" in lines[3] and "Holm, 2 comparisons" in lines[0]
    assert "| AT |" in lines[4] and "inside noise" in lines[4]
    assert lines[-1].startswith("| teacher | 92.00")


def test_a_table_of_the_baseline_alone_has_no_comparison_columns():
    table = stats.comparison_table({"student": [80.0, 81.0, 79.0]}, [0, 1, 2], teacher=92.0)
    lines = table.splitlines()
    assert lines[0] == "| method | test accuracy %: mean ± 95% CI | per seed [0, 1, 2] |"
    half = scipy_stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd of 80, 81, 79 is 1
    assert lines[2] == f"| student | 80.00 ± {half:.2f} | 80.00, 81.00, 79.00 |"
    assert lines[3] == "| teacher | 92.00 | — |" and "Holm" not in table


def test_holm_by_hand():
    # m = 4, alpha = 0.05: thresholds 0.0125, 0.0167, 0.025, 0.05 in the order of the sorted p-values
    assert stats.holm([0.01, 0.04, 0.015, 0.03]) == [True, False, True, False]  # 0.03 > 0.025 stops the steps
    assert stats.holm([0.2, 0.001]) == [False, True]
    assert stats.holm([0.013, 0.001]) == [True, True]  # 0.001 <= 0.05 / 2, then 0.013 <= 0.05 / 1
    assert stats.holm([0.06, 0.001]) == [False, True]
    assert stats.holm([math.nan, 0.001]) == [False, True]


def test_p_value_is_scipys_paired_t_test():
    rng = np.random.default_rng(1)
    base, method = rng.normal(80, 1, 6), rng.normal(80.5, 1, 6)
    assert stats.p_value(method - base) == pytest.approx(scipy_stats.ttest_rel(method, base).pvalue, rel=1e-12)


def test_detectable_effect_has_the_stated_power():
    # the power of a two-sided paired t-test at the detectable effect, from the noncentral t distribution
    differences = [0.3, -0.8, 1.1, 0.2, -0.4, 0.9]
    n, sd = len(differences), float(np.std(differences, ddof=1))
    effect = stats.detectable_effect(differences)
    crit = scipy_stats.t.ppf(0.975, n - 1)
    nc = effect / (sd / math.sqrt(n))
    power = scipy_stats.nct.sf(crit, n - 1, nc) + scipy_stats.nct.cdf(-crit, n - 1, nc)
    assert power == pytest.approx(0.8, abs=0.03)
    assert math.isnan(stats.detectable_effect([1.0]))


def test_the_paired_delta_plot_agrees_with_the_table_and_names_too_few_seeds():
    from featkd import plots

    accuracies = {"student": [80.0, 81.0, 79.0], "KD": [82.0, 83.1, 81.2], "AT": [80.5, 80.0, 79.9]}
    fig = plots.paired_deltas(accuracies)
    ax = fig.axes[0]
    filled = {c.get_gid(): c.get_facecolors()[0][3] > 0 and tuple(c.get_facecolors()[0][:3]) != (1.0, 1.0, 1.0)
              for c in ax.collections if c.get_gid()}
    assert filled == {"mean:KD": True, "mean:AT": False}  # the table's verdicts: KD beyond, AT inside
    two = plots.paired_deltas({"student": [80.0, 81.0], "KD": [82.0, 83.0]})
    assert [t.get_text() for t in two.axes[0].get_xticklabels()] == ["KD\n(too few seeds)"]


def test_seeds_to_detect_is_where_the_detectable_effect_first_reaches_the_effect():
    differences = [0.3, -0.8, 1.1, 0.2, -0.4, 0.9]
    sd = float(np.std(differences, ddof=1))
    needed = stats.seeds_to_detect(differences, 0.5)

    def with_spread(n):  # n differences with the measured sd
        z = np.linspace(-1.0, 1.0, n)
        return list(z / z.std(ddof=1) * sd)

    assert stats.detectable_effect(with_spread(needed)) <= 0.5 < stats.detectable_effect(with_spread(needed - 1))
    # at that many seeds a paired t-test has about the stated power (noncentral t)
    crit = scipy_stats.t.ppf(0.975, needed - 1)
    nc = 0.5 / (sd / math.sqrt(needed))
    assert scipy_stats.nct.sf(crit, needed - 1, nc) == pytest.approx(0.8, abs=0.02)
    assert stats.seeds_to_detect(differences, 1e-3) is None  # beyond MOST_SEEDS
    assert stats.seeds_to_detect([1.0], 0.5) is None


def test_reference_effect_lines_say_which_methods_the_seeds_can_judge():
    accuracies = {"student": [80.0, 81.0, 79.0, 80.0], "AT": [81.0, 82.1, 80.0, 80.9],
                  "NST-poly": [79.0, 83.0, 78.0, 82.0], "Gram": [80.0, 81.0, 79.5, 80.2]}
    gains = {"AT": (0.84, "paper A"), "NST": (0.42, "paper B")}
    lines = stats.reference_effect_lines(accuracies, lambda name: gains.get(name.split("-")[0]))
    assert len(lines) == 2  # neither the baseline nor Gram (no reference) has a line
    at_detectable = stats.detectable_effect([1.0, 1.1, 1.0, 0.9])
    assert lines[0] == f"- AT: +0.84 (paper A) is above the {at_detectable:.2f} these 4 seeds detect."
    needed = stats.seeds_to_detect([-1.0, 2.0, -1.0, 2.0], 0.42)
    assert lines[1].startswith("- NST-poly: +0.42 (paper B) is below the") and f"about {needed} seeds" in lines[1]
