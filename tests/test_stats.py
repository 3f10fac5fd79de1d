"""stats.py against scipy's Welch t-test and hand-computed values."""
import math
import warnings

import numpy as np
import pytest

import scipy.stats as scipy_stats

from sparse_jax import stats

def test_mean_sd():
  assert stats.mean_sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3)))
  mean, sd = stats.mean_sd([0.3])
  assert mean == 0.3 and math.isnan(sd)


def test_welch_ratio_ci_by_hand():
  # log values: a = ln 2 + (-d, 0, d), b = (-d, 0, d) with d = 0.1: equal variances
  # d^2 = 0.01 each, se = sqrt(2 * 0.01 / 3), df = 4 (Welch with equal n and variance).
  d = 0.1
  a = np.exp(np.log(2.0) + np.array([-d, 0.0, d]))
  b = np.exp(np.array([-d, 0.0, d]))
  ci = stats.welch_ratio_ci(a, b)
  se = math.sqrt(2 * d * d / 3)
  assert ci.ratio == pytest.approx(2.0)
  assert ci.df == pytest.approx(4.0)
  assert ci.low == pytest.approx(2.0 * math.exp(-2.776445 * se), rel=1e-6)
  assert ci.high == pytest.approx(2.0 * math.exp(2.776445 * se), rel=1e-6)


def test_welch_ratio_ci_matches_scipy():
  # The numbers: configs/default.py seeds 0-3.
  sparsified = [0.314, 0.281, 0.271, 0.290]
  vanilla = [0.310, 0.279, 0.302, 0.271]
  ci = stats.welch_ratio_ci(sparsified, vanilla)
  ref = scipy_stats.ttest_ind(np.log(sparsified), np.log(vanilla), equal_var=False)
  interval = ref.confidence_interval(0.95)
  assert ci.df == pytest.approx(ref.df)
  assert ci.low == pytest.approx(math.exp(interval.low))
  assert ci.high == pytest.approx(math.exp(interval.high))
  assert stats.verdict(ci) == ("no difference in sparsified eval density detectable at "
                               "n = 4 + 4 (ratio 0.995, 95% CI 0.892-1.110)")


def test_verdicts():
  lower = stats.welch_ratio_ci([0.20, 0.21, 0.19], [0.30, 0.31, 0.29])
  assert stats.verdict(lower).startswith("sparsified eval density is lower by 33% (95% CI ")
  assert stats.verdict(lower).endswith(", n = 3 + 3)")
  higher = stats.welch_ratio_ci([0.30, 0.31, 0.29], [0.20, 0.21, 0.19])
  assert stats.verdict(higher, "x").startswith("x is higher by 50% (95% CI ")
  single = stats.welch_ratio_ci([0.2], [0.3, 0.31])
  assert not single.has_ci
  assert stats.verdict(single) == ("no CI can be computed with n = 1 + 2 (ratio 0.656); "
                                   "run at least 2 seeds per variant")
  same = stats.welch_ratio_ci([0.2, 0.2], [0.2, 0.2])
  assert (same.ratio, same.low, same.high) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("num, den", [([0.0, 0.2], [0.3, 0.31]), ([0.2, 0.21], [0.0, 0.0]),
                                      ([-0.1, 0.2], [0.3, 0.31])])
def test_zero_or_negative_values_give_no_ratio_and_no_numpy_warning(num, den):
  # A study with a zero density (e.g. a metric that stayed 0) printed numpy's raw
  # "divide by zero encountered in log"; the report shows "-" for it.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ci = stats.welch_ratio_ci(num, den)
  assert math.isnan(ci.ratio) and not ci.has_ci
  assert stats.verdict(ci).startswith("no ratio can be computed")
