"""The statistics of a study report, numpy only: mean and sd over seeds, and the ratio of
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


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample sd (ddof = 1; nan for fewer than 2 values)."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return math.nan, math.nan
  return float(np.mean(x)), float(np.std(x, ddof=1)) if x.size > 1 else math.nan


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the incomplete beta function (modified Lentz)."""
  tiny, eps = 1e-300, 1e-15
  qab, qap, qam = a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 10_000):
    m2 = 2 * m
    aa = m * (b - m) * x / ((qam + m2) * (a + m2))
    d = 1.0 + aa * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + aa / c
    c = c if abs(c) > tiny else tiny
    h *= d * c
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
    d = 1.0 + aa * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + aa / c
    c = c if abs(c) > tiny else tiny
    delta = d * c
    h *= delta
    if abs(delta - 1.0) < eps:
      break
  return h


def incomplete_beta(a: float, b: float, x: float) -> float:
  """The regularized incomplete beta function I_x(a, b)."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                   + a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1.0) / (a + b + 2.0):
    return front * _betacf(a, b, x) / a
  return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
  """P(T <= t) for Student's t with df (> 0, not necessarily integer) degrees of freedom."""
  tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
  return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
  """The t value with P(T <= t) = p (bisection on t_cdf; |error| < 1e-10)."""
  if not 0.0 < p < 1.0:
    raise ValueError(f"p={p} is not in (0, 1).")
  if p < 0.5:
    return -t_quantile(1.0 - p, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:
    lo, hi = hi, hi * 2.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if t_cdf(mid, df) < p:
      lo = mid
    else:
      hi = mid
    if hi - lo < 1e-12 * max(1.0, hi):
      break
  return 0.5 * (lo + hi)


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
  """num / den with a Welch-t interval on log(num) - log(den) (values must be > 0)."""
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
  half = t_quantile(0.5 + level / 2.0, df) * se
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
