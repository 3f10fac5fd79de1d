"""The statistics of a study report: mean and sd over seeds, and the ratio of
two variants with a Welch-t confidence interval on the log scale.

Why Welch on the log ratio and not a bootstrap: studies have 3-5 seeds per variant. A
bootstrap over 3 values has 10 distinct resamples and its percentile interval is far too
narrow at that size; the t interval accounts for the few samples, Welch's form does not
assume equal spread in the two variants, and the log scale turns the ratio of
(geometric) means into a difference of means, with an interval that stays positive.
"""
import dataclasses
import math
from typing import Sequence

import numpy as np
import scipy.stats


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample sd (ddof = 1; nan for fewer than 2 values)."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return math.nan, math.nan
  return float(np.mean(x)), float(np.std(x, ddof=1)) if x.size > 1 else math.nan


@dataclasses.dataclass(frozen=True)
class RatioCI:
  """Ratio of the geometric means of two samples, with its confidence interval
  (low/high None where none can be computed: fewer than 2 values on a side)."""
  ratio: float
  low: float | None
  high: float | None
  n_num: int
  n_den: int
  df: float | None
  level: float

  @property
  def has_ci(self) -> bool:
    return self.low is not None


def welch_ratio_ci(num: Sequence[float], den: Sequence[float],
                   level: float = 0.95) -> RatioCI:
  """num / den with a Welch-t interval on log(num) - log(den) (values must be > 0; a
  sample with a zero or negative value gives a nan ratio and no interval)."""
  # A density of 0 (a run whose units all died, a metric never logged as nonzero) is
  # a case the caller shows as "-", not a warning from numpy's log.
  with np.errstate(divide="ignore", invalid="ignore"):
    a, b = np.log(np.asarray(num, np.float64)), np.log(np.asarray(den, np.float64))
  if a.size == 0 or b.size == 0 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    return RatioCI(math.nan, None, None, a.size, b.size, None, level)
  diff = float(np.mean(a) - np.mean(b))
  ratio = math.exp(diff)
  if a.size < 2 or b.size < 2:
    return RatioCI(ratio, None, None, a.size, b.size, None, level)
  va, vb = np.var(a, ddof=1) / a.size, np.var(b, ddof=1) / b.size
  se = math.sqrt(va + vb)
  if se == 0.0:
    return RatioCI(ratio, ratio, ratio, a.size, b.size, None, level)
  df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  half = float(scipy.stats.t.ppf(0.5 + level / 2.0, df)) * se
  return RatioCI(ratio, math.exp(diff - half), math.exp(diff + half), a.size, b.size,
                 float(df), level)


def _pct(x: float) -> str:
  x = abs(x) * 100.0
  return f"{x:.0f}" if x >= 9.5 else f"{x:.1f}"


def verdict(ci: RatioCI, subject: str = "sparsified eval density") -> str:
  """One sentence stating what the interval allows, e.g. 'sparsified eval density is
  lower by 12% (95% CI 4-19%, n = 5 + 5)'."""
  n = f"n = {ci.n_num} + {ci.n_den}"
  level = f"{ci.level * 100:.0f}%"
  if math.isnan(ci.ratio):
    return f"no ratio can be computed for {subject} ({n})"
  if not ci.has_ci:
    return (f"no CI can be computed with {n} (ratio {ci.ratio:.3f}); run at least 2 "
            f"seeds per variant")
  if ci.high < 1.0:
    return (f"{subject} is lower by {_pct(1 - ci.ratio)}% ({level} CI "
            f"{_pct(1 - ci.high)}-{_pct(1 - ci.low)}%, {n})")
  if ci.low > 1.0:
    return (f"{subject} is higher by {_pct(ci.ratio - 1)}% ({level} CI "
            f"{_pct(ci.low - 1)}-{_pct(ci.high - 1)}%, {n})")
  return (f"no difference in {subject} detectable at {n} (ratio {ci.ratio:.3f}, "
          f"{level} CI {ci.low:.3f}-{ci.high:.3f})")
